"""The trainer: ``run(config, workdir)``.

Start-up: fence older trainers (epoch in run.json), build the tokenizer and model, write the run
metadata workers need, then resume from the newest complete checkpoint or warm-start with SFT.
Loop: issue tasks and wait for admitted rollout groups, recompute proximal log-probs, take one RL
step, publish weights every ``publish_every`` steps without blocking, checkpoint every
``checkpoint_every`` steps (acknowledging consumed rollouts once that checkpoint is committed).
Evaluation is another role's (inference_worker.evaluator): the trainer only keeps the versions it
will evaluate. SIGTERM/SIGINT: stop at the next step boundary, save, exit 0.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import zlib

import jax
import numpy as np

from param_server import ParamStore
from param_server.adapters import AdapterPublisher, as_stored
from rlax_tpu import canary, rl, run_meta, sharding, store_layout
from rlax_tpu import tasks as tasks_lib
from rlax_tpu.config import ConfigError
from rlax_tpu.config.sections import eval as eval_section
from rlax_tpu.kvstore import KVStore
from rlax_tpu.models import lora
from trainer import batching, bootstrap
from trainer.checkpointing import Checkpointer
from trainer.controller import Controller
from trainer.learner import Learner, LearnerSpec, check_batch_divides_mesh, to_host
from trainer.metrics import MetricsWriter, Timer, histogram_fields
from trainer.optim import make_optimizer
from trainer.signals import GracefulExit
from trainer.state import abstract_state, reset_optimizer

log = logging.getLogger(__name__)
JSON_ITEMS = ("controller", "meta")
# The console's one progress line (every metric is in metrics.jsonl and TensorBoard).
CONSOLE_KEYS = ("reward/mean", "entropy", "clip_frac", "staleness/mean", "time/wait_rollouts", "time/train")


class Trainer:
    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.primary = jax.process_index() == 0
        self.local = run_meta.local_dir(workdir)
        os.makedirs(self.local, exist_ok=True)
        self.mesh = sharding.make_mesh(config.mesh)
        self.rows = config.trainer.batch_size * config.rl.group_size
        check_batch_divides_mesh(self.rows // config.rl.mini_batches, self.mesh, config.trainer.micro_batches,
                                 "trainer.batch_size")
        self.updates_per_step = config.rl.ppo_epochs * config.rl.mini_batches
        self.kv = KVStore.open(config.store.url, workdir)
        self.store = ParamStore.open(self.kv, config=config)
        self.epoch = self.store.acquire_epoch(workdir=workdir, pid=os.getpid()) if self.primary else None
        # LoRA: the base goes to tree "base" once, policy versions (adapters only) to tree "adapter".
        if config.lora.rank and jax.process_count() > 1:
            raise ConfigError("lora.rank", "LoRA publishing hashes the base on one host: run it single-host")
        self.adapters = AdapterPublisher(self.store) if config.lora.rank else None
        if self.adapters is not None:
            self.store = self.adapters.store
        self.task = tasks_lib.get_task(config.task)
        self.tok = bootstrap.build_tokenizer(config, workdir, self.task, self.kv)
        self.model_cfg = bootstrap.model_config(config, self.tok)
        self.loss = rl.build_loss(config.rl)
        self.optimizer, self.schedule = make_optimizer(config.trainer, total_steps=config.trainer.steps,
                                                       updates_per_step=self.updates_per_step)
        self.ckpt = Checkpointer(workdir, keep=config.trainer.keep_checkpoints,
                                 async_save=config.trainer.async_checkpoint)
        # A fresh run tells workers its model now (they start compiling during SFT); a resumed one
        # only once its checkpoint restored, so another model's checkpoint is reported by leaf.
        self._meta_pending = self.primary
        if self.ckpt.latest_step() is None:
            self._write_meta()
        self.metrics = MetricsWriter(self.local, total_steps=config.trainer.steps,
                                     log_every=config.trainer.log_every, tensorboard=config.trainer.tensorboard,
                                     is_primary=self.primary, console_keys=CONSOLE_KEYS)
        self.stop = GracefulExit(config.trainer.sigterm_grace_s)
        self._pending_acks: dict[int, dict] = {}
        self._saved: set[int] = set()
        self._publish = None
        self._lora_ref = None  # LoRA with KL: zero adapters over the frozen base
        self._base, self._merge = None, None  # LoRA: the frozen base and the readers' merge (canary)
        self.published_step = 0  # the newest step published (or being published): what tasks ask for

    def _write_meta(self) -> None:
        if self._meta_pending:
            run_meta.write_model_config(self.kv, self.model_cfg)
            self._meta_pending = False

    # ------------------------------------------------------------------ state
    def _init_or_restore(self):
        state, layout = bootstrap.initial_state(self.config, self.model_cfg, self.mesh, self.optimizer)
        # LoRA: the KL reference is the frozen base (zero adapters: B = 0 adds nothing), no copy.
        with_ref = self.config.rl.kl_coef > 0 and layout.lora is None
        if self.config.rl.kl_coef > 0 and layout.lora is not None:
            self._lora_ref = jax.tree.map(jax.numpy.zeros_like, state["params"]["model"])
        base = state.pop("base", None)  # frozen, rebuilt at start-up: never checkpointed
        latest = self.ckpt.latest_step()
        if latest is not None:
            target = abstract_state({**state, "ref": state["params"]["model"]} if with_ref else state)
            state, items = self.ckpt.restore(latest, target, JSON_ITEMS)
            if base is not None:
                state["base"] = base
            items["controller"] = items.get("controller") or None
            log.info("resumed from checkpoint %d in %s", latest, self.workdir)
            return state, layout, items.get("controller"), latest
        if base is not None:
            state["base"] = base
        if self.config.sft.steps > 0:
            sft_metrics = MetricsWriter(os.path.join(self.local, "sft"), total_steps=self.config.sft.steps,
                                        log_every=max(1, self.config.sft.steps // 20), tensorboard=False,
                                        is_primary=self.primary, console_keys=("sft/nll", "sft/lr"))
            with sft_metrics:
                state = bootstrap.run_sft(self.config, self.model_cfg, state, layout, self.mesh, self.task, self.tok,
                                          sft_metrics, lambda: self.stop.requested)
            state = bootstrap.zero_step(state)
        state = reset_optimizer(state, self.optimizer, layout)
        if with_ref:  # a frozen copy of the starting policy for the KL term
            state["ref"] = jax.tree.map(lambda x: x.copy(), state["params"]["model"])
        return state, layout, None, None

    def _save(self, step: int, state, controller: Controller | None) -> None:
        ctl = controller.state_dict() if controller is not None else None
        # Every process saves the same items (orbax writes them once); non-primary ones have no
        # controller, and process 0's state is the one that counts.
        items = {"meta": {"step": step, "epoch": self.epoch, "time": time.time()}, "controller": ctl or {}}
        self._saved.add(step)
        if self.ckpt.save(step, {k: v for k, v in state.items() if k != "base"}, items):
            if ctl is not None:
                self._pending_acks[step] = ctl["replay"]

    def _on_commit(self, controller: Controller):
        def ack(step: int) -> None:
            ctl = self._pending_acks.pop(step, None)
            if ctl is not None and self.primary:
                n = controller.replay.ack(ctl)
                log.info("checkpoint %d committed; acknowledged %d consumed rollouts", step, n)
        return ack

    def _keep(self, step: int) -> dict:
        """Publish arguments that pin a version due for evaluation until the evaluator is done."""
        if not eval_section.due(self.config, step):
            return {}
        return {"keep_for": store_layout.eval_keep_reader(step), "keep_s": self.config.eval.keep_s}

    def _publish_args(self, model_params, step: int) -> dict:
        """Eval pinning, the canary figures workers check each swap against (rlax_tpu.canary) and,
        with LoRA, the adapter version's manifest facts."""
        return {**self._keep(step), **self._meta(),
                "canary": canary.figures(self.config.store, self.model_cfg, self._served(model_params))}

    def _served(self, model_params):
        """The weights a worker serves for this version: with LoRA, the adapters merged into the base
        as both are stored (publish dtype), by the same merge the readers run."""
        if self.adapters is None:
            return model_params
        dtype = self.config.store.publish_dtype
        if self._merge is None:
            self._merge = jax.jit(functools.partial(lora.merge, scale=self.layout.lora.scale))
        return self._merge(as_stored(self._base, dtype), as_stored(model_params, dtype))

    def _publish_async(self, params, step: int) -> None:
        if self._publish is not None:
            self._publish.result()  # a failed publish surfaces here, in the trainer
        self._publish = self.store.publish_async(params["model"], step, **self._publish_args(params["model"], step))
        self.published_step = step

    def _meta(self) -> dict:
        """A LoRA version's manifest facts: its base's content hash and the adapters' settings."""
        return {} if self.adapters is None else {"meta": self.adapters.meta(self.layout.lora)}

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        c = self.config
        self.stop.install()
        try:
            state, self.layout, ctl_state, resumed = self._init_or_restore()
        except bootstrap.StoppedDuringSFT as e:
            log.info("trainer stopped (%s): %s", self.stop.signal_name, e)
            return 0
        self._write_meta()
        step = int(to_host(state["step"]))
        info = bootstrap.describe(self.model_cfg, state)
        log.info("model %s; mesh %s; epoch %s; starting at step %d", info, dict(self.mesh.shape), self.epoch,
                 step)
        controller = Controller(c, self.kv, self.tok, self.task, epoch=self.epoch, state=ctl_state) \
            if self.primary else None
        self.ckpt.on_commit(self._on_commit(controller))
        if self.stop.requested:
            return self._finish(state, step, controller)
        if resumed is None and step == 0:
            self._save(0, state, controller)  # the SFT result: a restart never redoes SFT
        if self.adapters is not None:  # the frozen base, once per base (a collective, like publish)
            self.adapters.publish_base(state["base"])
            self._base = state["base"]
        # Workers may hold weights of a discarded future: publish this step's weights (new epoch).
        self.store.publish(state["params"]["model"], step, **self._publish_args(state["params"]["model"], step))
        self.published_step = step
        spec = LearnerSpec(micro_batches=c.trainer.micro_batches, logprob_chunk=c.model.logprob_chunk,
                           remat=c.trainer.remat, compute_entropy=True, temperature=c.inference.temperature,
                           ppo_epochs=c.rl.ppo_epochs, mini_batches=c.rl.mini_batches, pack_len=c.trainer.pack_len)
        learner = Learner(self.mesh, self.layout, self.optimizer, spec, self.loss)
        timer = Timer()
        while step < c.trainer.steps and not self.stop.requested:
            with timer("wait_rollouts"):
                groups, cstats = self._collect(controller, step)
            if self.stop.requested:
                break
            host = batching.rl_batch(groups, c.inference.max_seq_len) if self.primary else \
                batching.empty_rl_batch(self.rows, c.inference.max_seq_len)
            host = _broadcast(host)
            weights_steps = host.pop("weights_steps")
            batch = learner.place(host)
            with timer("recompute"):
                # The proximal policy: this step's parameters before its first update (decoupled
                # PPO's pi_prox; the PPO ratio's denominator for every update of the batch), the
                # frozen reference (kept out of the donated train state) and the advantages.
                ref = state.get("ref", self._lora_ref)
                batch = learner.prepare(state["params"], batch, ref, state.get("base"))
                prox = batch["proximal_logp"]
            with timer("train"):
                train_state, m = learner.rl_update({k: v for k, v in state.items() if k != "ref"}, batch,
                                                   seed=c.seed * 1_000_003 + step, host=host)
                state = train_state if "ref" not in state else {**train_state, "ref": ref}
            step += 1
            with timer("publish"):
                if step % c.trainer.publish_every == 0 or step == c.trainer.steps:
                    self._base = state.get("base")  # the train step donates and returns it
                    self._publish_async(state["params"], step)
            prox_host = to_host(prox)  # a collective on several hosts: every process calls it
            record = {**m, **timer.pop(), "lr": float(self.schedule(step * self.updates_per_step - 1))}
            if self.primary:
                record.update(controller.group_metrics(groups))
                # The lineage of admitted tasks (checked by tests/test_chaos.py: each at most once).
                record["replay/task_ids"] = " ".join(a.task.task_id for a in groups if not a.reused)
                if any(a.reused for a in groups):
                    record["reuse/task_ids"] = " ".join(a.task.task_id for a in groups if a.reused)
                record.update({k if "/" in k else f"collect/{k}": v for k, v in cstats.items()})
                record.update(histogram_fields([int(step - 1 - v) for v in weights_steps], prefix="staleness"))
                record.update(_mismatch(host, prox_host, weights_steps == step - 1))
                record.update(canary.fleet_metrics(self.kv))  # workers' policy-landed checks
                self._log_batch(step - 1, groups)
            self.metrics.write(step, record, tokens=float(host["mask"].sum()))
            if step % c.trainer.checkpoint_every == 0:
                self._save(step, state, controller)
            self.ckpt.poll()
        return self._finish(state, step, controller)

    def _log_batch(self, step: int, groups) -> None:
        """<workdir>/batches.jsonl: what step ``step`` trained on (a restart appends its redo)."""
        rec = {"step": step, "task_ids": [a.task.task_id for a in groups], "reused": [a.reused for a in groups],
               "prompt_ids": [a.task.prompt_id for a in groups],
               "weights_steps": [[int(s.weights_step) for s in a.group.samples] for a in groups],
               "rewards": [[float(s.reward) for s in a.group.samples] for a in groups],
               "tokens_crc": [[zlib.crc32(np.asarray(s.tokens, np.int32).tobytes()) for s in a.group.samples]
                              for a in groups]}
        with open(os.path.join(self.local, "batches.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _collect(self, controller, step):
        if controller is None:
            return [], {}
        c = self.config
        return controller.collect(step, c.trainer.batch_size, weights_step=self.published_step,
                                  should_stop=lambda: self.stop.requested, timeout_s=c.replay.collect_timeout_s,
                                  poll_s=c.replay.poll_seconds)

    def _finish(self, state, step: int, controller) -> int:
        """Final (or SIGTERM) checkpoint of the current step, published weights, clean shutdown."""
        if step not in self._saved and step not in self.ckpt.committed_steps():
            self._save(step, state, controller)
        self.ckpt.wait()
        self.ckpt.poll()
        if self._publish is not None:
            self._publish.result()
        self.metrics.flush()
        if controller is not None:
            controller.close()
        why = f" ({self.stop.signal_name})" if self.stop.requested else ""
        log.info("trainer stopped at step %d%s; checkpoint saved", step, why)
        return step


def _mismatch(host: dict, prox: np.ndarray, same_weights: np.ndarray) -> dict:
    """Engine (behavior) vs trainer (proximal) log-probs of the same tokens under the same weights:
    the RLAX drift check. Rows generated from older weights (staleness > 0) differ by the policy
    change too, so they are left out; the loss's mismatch_kl covers all rows."""
    mask = host["mask"] & same_weights[:, None]
    if not mask.any():
        return {"mismatch/on_policy_rows": 0}
    diff = (prox - host["behavior_logp"])[mask]
    ratio = np.exp(diff)
    return {"mismatch/max_abs_logp_diff": float(np.abs(diff).max()),
            "mismatch/max_abs_ratio_minus_1": float(np.abs(ratio - 1).max()),
            "mismatch/mean_logp_diff": float(diff.mean()),
            "mismatch/on_policy_rows": int(same_weights.sum())}


def _broadcast(host: dict) -> dict:
    if jax.process_count() == 1:
        return host
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(host))


def run(config, workdir: str) -> int:
    trainer = Trainer(config, workdir)
    try:
        return trainer.run()
    finally:
        trainer.stop.uninstall()
        trainer.metrics.close()
        trainer.ckpt.close()
