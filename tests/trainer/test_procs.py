"""The trainer as real processes: kill -9 + restart is deterministic, two JAX processes equal one.

Three runs of the same tiny on-policy config (rl.max_staleness=0, fixed seeds), each with its
own inference worker (A first, to fill the shared compilation cache; then B and C together):
  A: one process, 4 devices, uninterrupted;
  B: one process, 4 devices, kill -9 after a mid-run checkpoint, then restarted;
  C: two processes x 2 devices (jax.distributed over gloo), the same global mesh as A.
"""

import os
import signal
import socket

import pytest

from tests.helpers import trainer_procs as tp

pytestmark = pytest.mark.slow
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = {k: str(tmp_path_factory.mktemp(f"run{k}")) for k in "ABC"}
    # A runs first and fills the compilation cache that B's processes and every worker then use.
    workers = [tp.start_worker(d["A"], tp.TINY)]
    trainers = {"A": tp.start_trainer(d["A"], tp.TINY, devices=4)}
    multi, info = [], {}
    try:
        assert tp.wait(trainers["A"], 300, d["A"], "trainer.log") == 0, tp.tail(d["A"], "trainer.log")
        workers += [tp.start_worker(d[k], tp.TINY) for k in "BC"]
        trainers["B"] = tp.start_trainer(d["B"], tp.TINY, devices=4)
        port = _free_port()
        multi = [tp.start_trainer(d["C"], tp.TINY, devices=2, log=f"trainer{i}.log",
                                  extra=(f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                         f"--process_id={i}"))
                 for i in range(2)]
        # B: kill -9 once step 2 is trained and a checkpoint after step 0 is committed.
        tp.wait_for(lambda: 1 in tp.batches(d["B"]) and max(tp.checkpoint_steps(d["B"]) or [0]) >= 1,
                    300, "run B to reach step 2", [trainers["B"]])
        trainers["B"].send_signal(signal.SIGKILL)
        trainers["B"].wait()
        info["B_killed_with_checkpoints"] = tp.checkpoint_steps(d["B"])
        info["B_steps_before_kill"] = sorted(tp.batches(d["B"]))
        trainers["B"] = tp.start_trainer(d["B"], tp.TINY, devices=4, log="trainer_restart.log")
        for k, p in trainers.items():
            log = "trainer_restart.log" if k == "B" else "trainer.log"
            assert tp.wait(p, 300, d[k], log) == 0, tp.tail(d[k], log)
        for i, p in enumerate(multi):
            assert tp.wait(p, 300, d["C"], f"trainer{i}.log") == 0, tp.tail(d["C"], f"trainer{i}.log")
    finally:
        for p in [*trainers.values(), *multi]:
            if p.poll() is None:
                p.kill()
        for w in workers:
            tp.stop(w)
    yield d, info


def _same_rollouts(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) == list(range(STEPS))
    for s in range(STEPS):
        for field in ("task_ids", "prompt_ids", "weights_steps", "rewards", "tokens_crc"):
            assert a[s][field] == b[s][field], (s, field)
        assert all(v == s for group in a[s]["weights_steps"] for v in group)  # on-policy


def test_kill9_and_restart_reaches_the_same_params(runs):
    d, info = runs
    assert max(info["B_killed_with_checkpoints"]) >= 1, info
    assert len(info["B_steps_before_kill"]) < STEPS, info
    log = tp.tail(d["B"], "trainer_restart.log", 100_000)
    assert "resumed from checkpoint" in log
    _same_rollouts(tp.batches(d["A"]), tp.batches(d["B"]))
    step_a, params_a = tp.published(d["A"])
    step_b, params_b = tp.published(d["B"])
    assert step_a == step_b == STEPS
    assert tp.max_diff(params_a, params_b) <= 1e-6


def test_two_processes_equal_one(runs):
    d, _ = runs
    for i in range(2):
        log = tp.tail(d["C"], f"trainer{i}.log", 100_000)
        assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in log, log[-2000:]
    assert os.path.isfile(os.path.join(d["C"], "batches.jsonl"))  # process 0 logs the batches
    _same_rollouts(tp.batches(d["A"]), tp.batches(d["C"]))
    assert tp.checkpoint_steps(d["C"])[-1] == STEPS
    step_a, params_a = tp.published(d["A"])
    step_c, params_c = tp.published(d["C"])
    assert step_c == STEPS
    assert tp.max_diff(params_a, params_c) <= 1e-5
