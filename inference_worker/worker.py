"""The inference worker loop: pull weights, lease tasks, run their episodes, write rollout groups.

A worker holds no state of its own: the model config and tokenizer come from the run's store
(written by the trainer), weights from the param server through a VariableClient, work from the
replay queue. Killing it at any moment loses nothing (its leases expire and another worker takes
the tasks); SIGTERM gives its leases back at once. A worker that starts late or restarts joins
with the newest weights.
"""

from __future__ import annotations

import logging
import os
import time

from inference_worker.bootstrap import open_run
from inference_worker.engine import SamplingParams
from inference_worker.replay_client import ReplayWorker, install_sigterm_handler
from inference_worker.rollout import EpisodeGroup, Rollouts
from param_server import VariableClient

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, config, workdir: str, worker_id: str):
        self.config, self.worker_id = config, worker_id
        inf = config.inference
        run = open_run(config, workdir, os.path.join(workdir, "workers", worker_id), wait_s=inf.meta_timeout_s)
        self.kv, self.store, self.tokenizer = run.kv, run.store, run.tokenizer
        self.client = VariableClient(self.store, run.target, reader=worker_id)
        log.info("worker %s: waiting for weights in %s", worker_id, self.store.url)
        while not self.client.update_and_wait(timeout=inf.weights_timeout_s):
            log.info("worker %s: no weights yet (%s)", worker_id, self.client.error or "none published")
        self.engine = run.engine(config, self.client.params)
        self.engine_version = self.client.version
        self.weights_step = self.client.step
        log.info("worker %s: weights v%d (step %d)", worker_id, self.client.version, self.weights_step)
        self.rollouts = Rollouts.from_config(config, self.engine, self.tokenizer)
        self.replay = ReplayWorker.from_config(self.kv, config, worker_id)
        self.groups_done = 0

    def _refresh_weights(self) -> None:
        self.client.update()  # swaps in what the background thread fetched (update_and_wait may have)
        if self.client.version != self.engine_version:
            self.engine.update_params(self.client.params)
            self.engine_version = self.client.version
            self.weights_step = self.client.step
            self.replay.weights_step = self.weights_step
            log.info("worker %s: weights v%d (step %d)", self.worker_id, self.client.version, self.weights_step)

    def _wait_for_step(self, step: int) -> None:
        """Tasks name the trainer step whose weights (or newer) they must be generated with."""
        while self.weights_step < step:
            self.client.update_and_wait(timeout=self.config.replay.poll_seconds * 10)
            self._refresh_weights()

    def _sampling(self, task) -> SamplingParams:
        # The controller writes every field into the task; a task without one gets this worker's
        # config.inference value.
        s, inf = dict(task.spec.get("sampling", {})), self.config.inference
        return SamplingParams(temperature=float(s.get("temperature", inf.temperature)),
                              top_k=int(s.get("top_k", inf.top_k)), top_p=float(s.get("top_p", inf.top_p)),
                              max_new_tokens=int(s.get("max_new_tokens", inf.max_new_tokens)),
                              n=task.n_samples, seed=task.seed, stop_token_ids=(self.tokenizer.eos_id,))

    def step(self) -> int:
        """One round: lease up to worker_max_leases tasks, run their episodes together, submit."""
        self._refresh_weights()
        leases = self.replay.lease(max_tasks=self.config.replay.worker_max_leases)
        if not leases:
            return 0
        self._wait_for_step(max(lease.task.weights_step for lease in leases))
        t0 = time.time()
        rollouts = self.rollouts.run([EpisodeGroup(lease.task.spec.get("problem", {}),
                                                   lease.task.prompt_tokens.tolist(), self._sampling(lease.task))
                                      for lease in leases])
        gen_s = time.time() - t0
        # Behavior log-probs under the sampling distribution (logits / temperature; RL refuses
        # truncation): what the trainer recomputes at the same temperature.
        results = [(lease, [r.sample(self.weights_step) for r in group],
                    {"generate_s": gen_s, "worker_weights_version": self.client.version})
                   for lease, group in zip(leases, rollouts, strict=True)]
        self.replay.submit_many(results)
        self.groups_done += len(results)
        return len(results)

    def run(self, max_groups: int = 0) -> None:
        self.replay.weights_step = self.weights_step
        self.replay.start()
        install_sigterm_handler(self.replay)
        log.info("worker %s: serving (weights step %d)", self.worker_id, self.weights_step)
        try:
            while not max_groups or self.groups_done < max_groups:
                if not self.step():
                    time.sleep(self.config.replay.poll_seconds)
        finally:
            self.replay.stop(release=True)
            self.rollouts.close()
            self.client.close()


def run(config, workdir: str, worker_id: str, max_groups: int = 0) -> None:
    Worker(config, workdir, worker_id).run(max_groups)
