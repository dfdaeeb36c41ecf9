"""Trainer start-up and shutdown: bad input gets an error naming it; SIGTERM saves and exits 0."""

import os
import re
import signal
import time

import pytest

from rlax_tpu.config import ConfigError, finalize
from tests.helpers import trainer_procs as tp
from trainer.checkpointing import CheckpointMismatchError
from trainer.run import Trainer


def _config(**overrides):
    from configs.arith_grpo import get_config

    c = get_config("smoke")
    c.sft.steps = 0
    c.eval.num_samples = 0
    c.rl.mini_batches = 1  # the whole batch in one update: 8 rows over the 8 devices
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 1
    for key, value in overrides.items():
        section, field = key.split("__")
        c[section][field] = value
    return finalize(c)


def test_batch_that_does_not_divide_the_mesh(tmp_path):
    # 8 devices: fsdp=8; 3 prompts x 4 samples = 12 rows.
    with pytest.raises(ConfigError, match=r"trainer\.batch_size.*12 sequences.*data\*fsdp=8"):
        Trainer(_config(trainer__batch_size=3), str(tmp_path))


def test_bad_jsonl_line_names_file_line_and_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?", "solution": "4"}\n')
    c = _config(task__name="jsonl", task__path=str(path))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2.*'answer'"):
        Trainer(c, str(tmp_path / "w"))


def test_checkpoint_of_another_model_names_the_leaf(tmp_path):
    wd = str(tmp_path)
    first = Trainer(_config(), wd)
    state, _, _, resumed = first._init_or_restore()
    assert resumed is None
    first._save(0, state, None)
    first.ckpt.close()
    second = Trainer(_config(model__hidden_size=48), wd)
    try:
        with pytest.raises(CheckpointMismatchError, match=r"leaf '.*embed.*' has shape \(\d+, 32\)"):
            second._init_or_restore()
    finally:
        second.ckpt.close()


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_0(tmp_path):
    wd = str(tmp_path)
    # The smoke config's 20 s grace is tight for finishing a step, saving and exiting on a loaded
    # 2-core machine (past it the watchdog exits 75): give it room, and check the bound it promises.
    grace = 90
    args = [*tp.TINY, "--config.trainer.steps=1000", "--config.trainer.checkpoint_every=100",
            f"--config.trainer.sigterm_grace_s={grace}", f"--config.launch.grace_s={grace + 30}"]
    worker = tp.start_worker(wd, args)
    trainer = tp.start_trainer(wd, args)
    try:
        tp.wait_for(lambda: len(tp.batches(wd)) >= 2, 300, "two RL steps", [trainer])
        sent = time.monotonic()
        trainer.send_signal(signal.SIGTERM)
        rc = tp.wait(trainer, grace + 60, wd, "trainer.log")
        took = time.monotonic() - sent
    finally:
        tp.stop(trainer)
        tp.stop(worker)
    log = tp.tail(wd, "trainer.log", 100_000)
    assert rc == 0, log[-3000:]
    assert took < grace, took  # config.trainer.sigterm_grace_s
    reached = len(tp.batches(wd))  # steps trained before the stop (the step in progress finishes)
    assert f"trainer stopped at step {reached} (SIGTERM)" in log
    assert tp.checkpoint_steps(wd)[-1] == reached
    assert os.path.isdir(os.path.join(wd, "checkpoints", str(reached), "state"))
