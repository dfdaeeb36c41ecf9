"""`python -m param_server.main` shows the status of a store a test published to, and runs gc."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp

from param_server import ParamStore
from tests.helpers import ROOT

CONFIG = os.path.join(ROOT, "configs", "param_server_status.py")


def _main(workdir, *flags):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "param_server.main", f"--config={CONFIG}",
                           f"--workdir={workdir}", *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_status_and_janitor(tmp_path):
    workdir = str(tmp_path / "run")
    store = ParamStore.open("", workdir=workdir)
    params = {"layers": [{"kernel": jnp.ones((64, 32))}], "bias": jnp.zeros((32,))}
    for step in (10, 20, 30):
        store.publish(params, step=step)
    store.pin(1, "worker-7", ttl_s=300)
    store.kv.put("workers/worker-7", json.dumps({"time": 0.0, "weights_step": 10, "rollouts": 12}).encode())
    store.kv.put("workers/worker-8", b"\x00not json")

    res = _main(workdir, "--mode=status")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert f"store: file://{workdir}/store/" in out
    assert "LATEST: version 3 step 30 epoch 1 age" in out
    assert "v1: step 10 epoch 1 0.00 MiB pinned by worker-7" in out
    assert "v3: step 30" in out
    assert "worker-7: version 1 (expires in" in out
    assert '"rollouts": 12' in out and "worker-8: ERROR corrupt heartbeat" in out

    res = _main(workdir, "--mode=janitor", "--iterations=1", "--config.store.gc_keep=1", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert json.loads(lines[0])["gc"]["deleted"] == [2]  # v1 is pinned, v3 is LATEST
    snap = json.loads(lines[1])
    assert [v["version"] for v in snap["versions"]] == [1, 3]
    assert store.versions() == [1, 3]

    res = _main(workdir, "--config.store.gc_keep=0")
    assert res.returncode != 0 and "config.store.gc_keep" in res.stderr
