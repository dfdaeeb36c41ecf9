"""The controller with a simulated trainer loop and worker thread: tasks ask only for published
weights (the publish_every deadlock of the old rule, and a property test over accepted configs),
timeouts name their cause, and rollout reuse (bounded uses, importance weights, restarts)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference_worker.replay_client import ReplayWorker
from rlax_tpu import store_layout as keys
from rlax_tpu import tasks as tasks_lib
from rlax_tpu.config import ConfigError, finalize, get_base_config
from rlax_tpu.kvstore import KVStore
from rlax_tpu.replay import Sample
from rlax_tpu.tasks.base import stable_hash
from trainer.controller import CollectTimeout, Controller


class _Tok:
    def encode_prompt(self, prompt):
        return [ord(ch) % 250 + 1 for ch in prompt[:16]]


def _config(**rl):
    c = get_base_config()
    c.task.name, c.task.num_train = "arith", 64
    c.rl.group_size, c.trainer.batch_size = 2, 2
    c.replay.poll_seconds, c.replay.heartbeat_seconds, c.replay.lease_seconds = 0.01, 0.2, 5.0
    c.rl.off_policy = "tis"
    for k, v in rl.items():
        (c.trainer if k in ("publish_every",) else c.rl)[k] = v
    return c


class _Sim:
    """A worker thread: leases tasks, generates only with published weights (it never sees a step
    before the trainer publishes it), stamps samples with the step it holds."""

    def __init__(self, kv: KVStore):
        self.kv, self.published, self.stop = kv, 0, threading.Event()
        self.waited_for_unpublished = 0
        self.worker = ReplayWorker(kv, "sim", lease_seconds=5.0, max_leases=4, heartbeat_seconds=0.2)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            self.worker.weights_step = self.published
            self.worker.heartbeat()
            for lease in self.worker.lease(4):
                while lease.task.weights_step > self.published and not self.stop.is_set():
                    self.waited_for_unpublished += 1  # the worker waits for weights not out yet
                    self.worker.weights_step = self.published
                    self.worker.heartbeat()
                    time.sleep(0.01)
                if self.stop.is_set():
                    return
                rng = np.random.default_rng(lease.task.seed)
                samples = [Sample(rng.integers(1, 50, 4).astype(np.int32), np.full(4, -1.0, np.float32),
                                  self.published, float(i % 2), {"correct": bool(i % 2)}, "eos")
                           for i in range(lease.task.n_samples)]
                self.worker.submit(lease, samples)
            time.sleep(0.005)


def _train(config, steps: int, rule: str, timeout_s: float = 3.0, state=None, kv=None, start: int = 0):
    """The trainer's loop around the controller: collect, 'train', publish every publish_every."""
    kv = kv or KVStore.open("memory://")
    task = tasks_lib.get_task(config.task)
    ctl = Controller(config, kv, _Tok(), task, epoch=None, state=state)
    sim = _Sim(kv)
    sim.published = start
    sim.thread.start()
    batches = []
    try:
        for step in range(start, start + steps):
            want = sim.published if rule == "published" else step
            groups, stats = ctl.collect(step, config.trainer.batch_size, weights_step=want, should_stop=lambda: False,
                                        timeout_s=timeout_s, poll_s=0.01)
            batches.append((groups, stats))
            if (step + 1) % config.trainer.publish_every == 0:
                sim.published = step + 1
    finally:
        sim.stop.set()
        sim.thread.join(5)
    return ctl, sim, batches


def test_the_old_rule_deadlocks_on_publish_every_and_the_timeout_says_why():
    config = finalize(_config(publish_every=2, max_staleness=1))
    with pytest.raises(CollectTimeout, match=r"waits for the weights of step \d*[13579]\b"):
        _train(config, 60, rule="trainer_step")
    ctl, sim, batches = _train(config, 6, rule="published")
    assert len(batches) == 6 and sim.waited_for_unpublished == 0
    assert all(g.task.weights_step <= step for step, (gs, _) in enumerate(batches) for g in gs)
    assert all(s.weights_step <= step for step, (gs, _) in enumerate(batches) for g in gs for s in g.group.samples)


def test_timeouts_name_no_worker_and_dropped_groups():
    config = finalize(_config(max_staleness=0, off_policy="none"))
    ctl = Controller(config, KVStore.open("memory://"), _Tok(), tasks_lib.get_task(config.task), epoch=None)
    with pytest.raises(CollectTimeout, match="no inference worker is alive"):
        ctl.collect(0, 2, weights_step=0, should_stop=lambda: False, timeout_s=0.3, poll_s=0.01)
    config = finalize(_config(dynamic_sampling=True))
    kv = KVStore.open("memory://")
    ctl = Controller(config, kv, _Tok(), tasks_lib.get_task(config.task), epoch=None)
    worker = ReplayWorker(kv, "flat", lease_seconds=5.0, max_leases=8, heartbeat_seconds=10.0)
    stop = threading.Event()

    def flat_rewards():  # every sample of every group gets the same reward
        while not stop.is_set():
            for lease in worker.lease(8):
                worker.submit(lease, [Sample(np.ones(3, np.int32), np.zeros(3, np.float32), 0, 1.0, {}, "eos")
                                      for _ in range(lease.task.n_samples)])
            time.sleep(0.01)

    t = threading.Thread(target=flat_rewards, daemon=True)
    t.start()
    try:
        with pytest.raises(CollectTimeout, match="dropped: [1-9][0-9]* by dynamic sampling"):
            ctl.collect(0, 2, weights_step=0, should_stop=lambda: False, timeout_s=2.0, poll_s=0.01)
    finally:
        stop.set()
        t.join(5)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(publish_every=st.integers(1, 4), max_staleness=st.integers(0, 4), dynamic=st.booleans(),
       difficulty=st.booleans(), reuse=st.sampled_from([0.0, 0.5]))
def test_no_accepted_config_makes_a_task_wait_for_an_unpublished_step(publish_every, max_staleness, dynamic,
                                                                       difficulty, reuse):
    config = _config(publish_every=publish_every, max_staleness=max_staleness, dynamic_sampling=dynamic,
                     difficulty_filter=difficulty, reuse_fraction=reuse)
    try:
        config = finalize(config)
    except ConfigError:
        return  # validation refuses it: nothing to run
    _, sim, batches = _train(config, 2 * publish_every + 1, rule="published", timeout_s=5.0)
    assert sim.waited_for_unpublished == 0
    assert len(batches) == 2 * publish_every + 1


def test_reuse_is_bounded_in_uses_and_age_and_survives_a_restart():
    config = finalize(_config(max_staleness=1, reuse_fraction=0.5, reuse_max_uses=2, reuse_max_age=3))
    kv = KVStore.open("memory://")
    ctl, _, batches = _train(config, 6, rule="published", kv=kv)
    seen: dict[str, int] = {}
    for step, (groups, stats) in enumerate(batches):
        for g in groups:
            seen[g.task.task_id] = seen.get(g.task.task_id, 0) + 1
            assert g.staleness <= 3
        assert stats.get("reuse/groups", 0) == (1 if step > 0 else 0)
    assert max(seen.values()) <= 1 + 2 and any(n > 1 for n in seen.values())
    # A checkpointed state: acks keep the retained groups' records, a new controller reloads them.
    state = ctl.state_dict()
    retained = set(state["replay"]["retained"])
    assert retained and retained == {e[0] for e in state["reuse"]["entries"]}
    ctl.replay.ack(state["replay"])
    for tid in retained:
        assert kv.get(keys.ROLLOUTS + tid) is not None
    ctl.close()
    ctl2, _, batches2 = _train(config, 7, rule="published", kv=kv, state=state, start=6)
    reused_after = [g for g in batches2[0][0] if g.task.task_id in retained]
    assert reused_after and all(g.group.samples for g in reused_after)
    # Once evicted, the next acknowledged state lets its records go.
    state2 = ctl2.state_dict()
    gone = retained - set(state2["replay"]["retained"])
    ctl2.replay.ack(state2["replay"])
    assert gone and all(kv.get(keys.ROLLOUTS + t) is None for t in gone)


def _difficulty_run(difficulty: bool, steps: int = 24):
    """Groups admitted per step with a worker that solves every sample of the 'easy' prompts and
    half the samples of the others."""
    config = _config(difficulty_filter=difficulty, difficulty_min_groups=2, max_staleness=0, off_policy="none")
    config.task.num_train = 8
    config = finalize(config)
    kv = KVStore.open("memory://")
    ctl = Controller(config, kv, _Tok(), tasks_lib.get_task(config.task), epoch=None)
    worker = ReplayWorker(kv, "w", lease_seconds=5.0, max_leases=4, heartbeat_seconds=0.2)
    easy = lambda pid: stable_hash(pid) % 2 == 0
    stop = threading.Event()

    def work():
        while not stop.is_set():
            worker.heartbeat()
            for lease in worker.lease(4):
                solved = [easy(lease.task.prompt_id) or i % 2 == 1 for i in range(lease.task.n_samples)]
                w = lease.task.weights_step  # generated with the weights it asks for
                worker.submit(lease, [Sample(np.ones(3, np.int32), np.zeros(3, np.float32), w, float(s),
                                             {"correct": s}, "eos") for s in solved])
            time.sleep(0.005)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        batches = [ctl.collect(step, 2, weights_step=step, should_stop=lambda: False, timeout_s=5.0, poll_s=0.01)[0]
                   for step in range(steps)]
    finally:
        stop.set()
        t.join(5)
    return ctl, [[easy(a.task.prompt_id) for a in groups] for groups in batches]


def test_difficulty_aware_selection_skips_prompts_that_are_always_solved():
    from rlax_tpu.config import load_config

    assert load_config("configs/arith_dapo.py").rl.difficulty_filter  # a shipped config uses it
    ctl, easy = _difficulty_run(True)
    per_prompt = {pid: g[0] for pid, g in ctl.difficulty.stats.items()}
    solved_always = [pid for pid, (groups, solved, samples) in ctl.difficulty.stats.items() if solved == samples]
    assert solved_always and ctl.difficulty.skipped > 0
    # An always-solved prompt is issued again only while its first groups are still in flight.
    assert all(per_prompt[pid] <= 2 + 2 for pid in solved_always), per_prompt
    late = [e for groups in easy[-len(easy) // 3:] for e in groups]
    assert late and not any(late), easy
    _, unfiltered = _difficulty_run(False)  # without the filter the easy prompts keep coming
    assert any(e for groups in unfiltered[-len(unfiltered) // 3:] for e in groups)
