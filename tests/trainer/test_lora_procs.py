"""LoRA RL as real processes under kill -9 (the LoRA variant of the chaos test, on the smaller
process-test config: the full chaos run twice would double the suite's slowest test).

One trainer and one inference worker on the tiny config with lora.rank=2. The trainer is killed
(-9) after a checkpoint, then once more in the middle of its first adapter publish after the
restart (RLAX_PS_FAULT: after a few of the adapter leaves are written); the worker is killed and
restarted too. Then: the run finishes at trainer.steps; the base was published once for all three
trainer incarnations; the killed publish left the previous adapter version the newest; every
version the worker logged as loaded is a committed adapter version of that step, and it merges
onto the base it names."""

from __future__ import annotations

import os
import re
import signal

import jax
import pytest

from param_server import faults
from tests.helpers import trainer_procs as tp

pytestmark = pytest.mark.slow
STEPS = 6
ARGS = [*[a for a in tp.TINY if not a.startswith("--config.trainer.steps")], f"--config.trainer.steps={STEPS}",
        "--config.trainer.checkpoint_every=2", "--config.lora.rank=2", "--config.lora.alpha=4.0",
        "--config.rl.kl_coef=0.05"]
LOADED_RE = re.compile(r"worker (\S+): weights v(\d+) \(step (\d+)\)")


def test_lora_run_survives_kill9_of_trainer_mid_publish_and_of_worker(tmp_path):
    wd = str(tmp_path)
    worker = tp.start_worker(wd, ARGS)
    trainer = tp.start_trainer(wd, ARGS, log="trainer0.log")
    try:
        tp.wait_for(lambda: 2 in tp.checkpoint_steps(wd) and 2 in tp.batches(wd), 300,
                    "the trainer to checkpoint step 2", [trainer, worker])
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        worker = tp.start_worker(wd, ARGS)
        before = _adapter_store(wd).latest_version()
        # The restart's first publish is an adapter version (the base is there already): die in it.
        env_fault = {faults.ENV: "after_leaves:3"}
        os.environ.update(env_fault)
        try:
            trainer = tp.start_trainer(wd, ARGS, log="trainer1.log")
        finally:
            os.environ.pop(faults.ENV)
        assert tp.wait(trainer, 300, wd, "trainer1.log") == -signal.SIGKILL, tp.tail(wd, "trainer1.log")
        assert _adapter_store(wd).latest_version() == before  # the killed publish exposed nothing
        trainer = tp.start_trainer(wd, ARGS, log="trainer2.log")
        assert tp.wait(trainer, 300, wd, "trainer2.log") == 0, tp.tail(wd, "trainer2.log")
    finally:
        if trainer.poll() is None:
            trainer.kill()
        tp.stop(worker)
    assert tp.checkpoint_steps(wd)[-1] == STEPS
    assert sorted(tp.batches(wd)) == list(range(STEPS))
    _check_weights(wd)


def _adapter_store(wd: str):
    from param_server import ParamStore
    from param_server.adapters import ADAPTER_TREE

    return ParamStore.open("", wd).tree(ADAPTER_TREE)


def _check_weights(wd: str) -> None:
    from inference_worker.bootstrap import open_run
    from rlax_tpu.config import load_config
    from tests.helpers import ROOT

    config = load_config(os.path.join(ROOT, "configs/arith_grpo.py") + ":smoke", ARGS[1:])
    run = open_run(config, wd, os.path.join(wd, "check"), wait_s=10)
    assert run.adapters is not None and run.adapters.base_store.versions() == [1]  # the base, once
    loaded: dict[int, int] = {}
    for name in os.listdir(wd):
        if name.startswith("w0") and name.endswith(".log"):
            with open(os.path.join(wd, name), errors="replace") as f:
                for m in LOADED_RE.finditer(f.read()):
                    assert loaded.setdefault(int(m.group(2)), int(m.group(3))) == int(m.group(3))
    assert len(loaded) >= 3, loaded
    for v, step in sorted(loaded.items()):
        assert run.store.version_info(v)["step"] == step
        merged, manifest = run.read(v)  # every chunk checks out; merged onto the base it names
        assert manifest["meta"]["base_hash"] == run.adapters.base_hash
        assert all(bool(jax.numpy.isfinite(x).all()) for x in jax.tree.leaves(merged))
