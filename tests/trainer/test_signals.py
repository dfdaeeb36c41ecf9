"""trainer.signals: SIGTERM -> save a checkpoint and exit 0; watchdog; second SIGINT."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import ROOT
from trainer.signals import FORCED_EXIT_CODE, GracefulExit

_CHILD = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from trainer.checkpointing import Checkpointer
    from trainer.signals import GracefulExit
    workdir, hang = sys.argv[1], sys.argv[2] == "hang"
    ck = Checkpointer(workdir, keep=2)
    with GracefulExit(float(sys.argv[3])) as stop:
        step = 0
        while not stop.requested:
            step += 1
            time.sleep(0.02)  # "training"
            if step == 3:
                print("READY", flush=True)
        if hang:
            time.sleep(600)  # a save that never finishes
        ck.save(step, {"w": jnp.full((4,), float(step)), "step": jnp.int32(step)}, {"meta": {"step": step}})
        ck.wait()
        print("SAVED", step, flush=True)
    ck.close()
""")


def _start(tmp_path, mode, grace):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), mode, str(grace)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_saves_checkpoint_and_exits_zero(tmp_path):
    ok = _start(tmp_path / "ok", "ok", 60)
    hang = _start(tmp_path / "hang", "hang", 1.5)
    try:
        sent = {}
        for proc in (ok, hang):
            assert proc.stdout.readline().strip() == "READY"
            os.kill(proc.pid, signal.SIGTERM)
            sent[proc] = time.monotonic()
        # The hung child is force-exited by its 1.5 s watchdog, not after its 600 s sleep. Timed
        # alone: the ok child's save (and jax shutdown) may take long on a loaded machine.
        _, err = hang.communicate(timeout=120)
        assert hang.returncode == FORCED_EXIT_CODE, err
        assert "did not finish within 1.5s" in err and "sigterm_grace_s" in err
        assert time.monotonic() - sent[hang] < 60
        out, err = ok.communicate(timeout=120)
        assert ok.returncode == 0, err
        saved_step = int(out.split()[-1])
        assert saved_step >= 3
    finally:
        for proc in (ok, hang):
            if proc.poll() is None:
                proc.kill()
    from trainer.checkpointing import Checkpointer

    ck = Checkpointer(str(tmp_path / "ok"), keep=2)
    assert ck.latest_step() == saved_step
    ck.close()
    assert not os.path.exists(tmp_path / "hang" / "checkpoints" / "1")


def test_second_sigint_raises_keyboard_interrupt():
    before = signal.getsignal(signal.SIGINT)
    stop = GracefulExit(30.0).install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is before
    assert stop._watchdog is None  # cancelled: this test process is not force-exited
