"""Helpers for tests that run real trainer and inference-worker processes on a tiny config."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from tests.helpers import ROOT

# The smoke config made smaller still: no SFT or eval, a 1-layer model, on-policy (staleness 0),
# an entropy bonus so every step changes the weights even when every reward is 0, no reference
# policy (its second sharded forward would add f32 reduction-order noise to the equality checks).
TINY = [
    "--config=configs/arith_grpo.py:smoke",
    "--config.sft.steps=0", "--config.eval.num_samples=0",
    "--config.model.hidden_size=32", "--config.model.intermediate_size=64", "--config.model.num_layers=1",
    "--config.inference.max_new_tokens=12",
    "--config.rl.max_staleness=0", "--config.rl.entropy_coef=0.05", "--config.rl.kl_coef=0.0",
    "--config.trainer.learning_rate=1e-3",
    "--config.trainer.steps=4", "--config.trainer.checkpoint_every=1",
    "--config.replay.collect_timeout_s=200",
]


# One JAX compilation cache for every process this test session starts: a later process with the
# same programs (a restarted trainer, another worker) loads them instead of compiling again.
CACHE_DIR = tempfile.mkdtemp(prefix="rlax_tpu_test_jax_cache_")
atexit.register(shutil.rmtree, CACHE_DIR, ignore_errors=True)


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT
    return env


def start(module: str, workdir: str, args: list[str], *, devices: int = 1, log: str) -> subprocess.Popen:
    out = open(os.path.join(workdir, log), "ab")
    return subprocess.Popen([sys.executable, "-m", module, f"--workdir={workdir}", *args], cwd=ROOT,
                            env=_env(devices), stdout=out, stderr=subprocess.STDOUT)


def start_trainer(workdir: str, args: list[str], *, devices: int = 1, log: str = "trainer.log",
                  extra: tuple[str, ...] = ()) -> subprocess.Popen:
    return start("trainer.main", workdir, [*args, *extra], devices=devices, log=log)


def start_worker(workdir: str, args: list[str], worker_id: str = "w0") -> subprocess.Popen:
    return start("inference_worker.main", workdir, [*args, f"--worker_id={worker_id}"], log=f"{worker_id}.log")


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(workdir: str, log: str, n: int = 3000) -> str:
    try:
        with open(os.path.join(workdir, log), errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def wait(proc: subprocess.Popen, timeout: float, workdir: str, log: str) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{log} did not finish in {timeout}s:\n{tail(workdir, log)}") from None


def batches(workdir: str) -> dict[int, dict]:
    """What each step trained on (the last record per step: a restart re-trains steps)."""
    out = {}
    path = os.path.join(workdir, "batches.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    out[rec["step"]] = rec
    return out


def wait_for(cond, timeout: float, what: str, procs=()) -> None:
    deadline = time.time() + timeout
    while not cond():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: a process exited early with {p.returncode}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def checkpoint_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def published(workdir: str) -> tuple[int, dict[str, np.ndarray]]:
    """(step, params as numpy) of the newest weights in the run's param store."""
    import jax

    from inference_worker.bootstrap import abstract_params
    from param_server import ParamStore
    from rlax_tpu import run_meta
    from rlax_tpu.kvstore import KVStore

    kv = KVStore.open("", workdir)
    model_cfg = run_meta.read_model_config(kv)
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    _, target = abstract_params(model_cfg, mesh)
    store = ParamStore.open(kv)
    params, version = store.pull(target)
    step = int(store.version_info(version)["step"])
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return step, {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
