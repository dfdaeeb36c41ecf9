"""trainer.checkpointing: reshard on restore, JSON items, commit tracking, kill -9 mid-write."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from tests.helpers import ROOT
from trainer.checkpointing import Checkpointer, CheckpointMismatchError

AUTO = jax.sharding.AxisType.Auto


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AUTO,) * len(shape))


def _state(mesh):
    w = jax.device_put(jnp.arange(64, dtype=jnp.float32).reshape(16, 4), NamedSharding(mesh, P("fsdp")))
    return {
        "params": {"w": w, "b": jnp.ones((4,), jnp.float32)},
        "opt": {"mu": w * 2},
        "step": jnp.int32(7),
        "rng": jax.random.key(3),
    }


def _abstract(sharding_w, sharding_rep):
    return {
        "params": {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=sharding_w),
                   "b": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding_rep)},
        "opt": {"mu": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=sharding_w)},
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding_rep),
        "rng": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding_rep),
    }


def test_save_restore_across_meshes_with_json_and_commits(tmp_path):
    mesh8 = _mesh((8,), ("fsdp",))
    state = _state(mesh8)
    commits = []
    ck = Checkpointer(str(tmp_path), keep=2)
    ck.on_commit(commits.append)
    assert ck.latest_step() is None
    assert ck.save(5, state, {"grain": {"pos": 3, "seed": 1}, "controller": {"consumed": [1, 2]}})
    ck.wait()
    assert commits == [5] and ck.committed_steps() == [5] and ck.latest_step() == 5
    # The same step again is skipped (with a warning), never silently overwritten.
    assert ck.save(5, state, {}) is False
    with pytest.raises(ValueError, match="newer checkpoint"):
        ck.save(4, state, {})
    ck.close()

    # Restore under fsdp=2, tensor=4 in a fresh manager (as after a restart).
    mesh24 = _mesh((2, 4), ("fsdp", "tensor"))
    ck2 = Checkpointer(str(tmp_path), keep=2)
    assert ck2.latest_step() == 5
    target = _abstract(NamedSharding(mesh24, P("fsdp", "tensor")), NamedSharding(mesh24, P()))
    got, js = ck2.restore(5, target, ["grain", "controller"])
    assert js == {"grain": {"pos": 3, "seed": 1}, "controller": {"consumed": [1, 2]}}
    assert got["params"]["w"].sharding == NamedSharding(mesh24, P("fsdp", "tensor"))
    np.testing.assert_array_equal(np.asarray(got["params"]["w"]), np.asarray(state["params"]["w"]))
    np.testing.assert_array_equal(np.asarray(got["opt"]["mu"]), np.asarray(state["opt"]["mu"]))
    assert int(got["step"]) == 7
    np.testing.assert_array_equal(jax.random.key_data(got["rng"]), jax.random.key_data(state["rng"]))

    # And into a single-device layout.
    one = SingleDeviceSharding(jax.devices()[0])
    got1, _ = ck2.restore(5, _abstract(one, one))
    assert got1["params"]["w"].sharding == one
    np.testing.assert_array_equal(np.asarray(got1["params"]["w"]), np.asarray(state["params"]["w"]))

    # keep=2: after two more commits only the newest two remain; callbacks saw each commit.
    seen = []
    ck2.on_commit(seen.append)
    for step in (6, 7):
        assert ck2.save(step, state, {"grain": {"pos": step}})
    ck2.wait()
    assert seen == [6, 7] and ck2.committed_steps() == [6, 7]
    with pytest.raises(FileNotFoundError, match="step 5"):
        ck2.restore(5, target)
    with pytest.raises(FileNotFoundError, match="nope"):
        ck2.restore(7, target, ["nope"])
    ck2.close()


def test_mismatched_tree_names_leaf_and_shapes(tmp_path):
    mesh8 = _mesh((8,), ("fsdp",))
    with Checkpointer(str(tmp_path), keep=1, async_save=False) as ck:
        ck.save(1, _state(mesh8), {})
    rep = NamedSharding(mesh8, P())
    target = _abstract(NamedSharding(mesh8, P("fsdp")), rep)
    target["params"]["w"] = jax.ShapeDtypeStruct((32, 4), jnp.float32, sharding=rep)
    ck = Checkpointer(str(tmp_path), keep=1)
    with pytest.raises(CheckpointMismatchError, match=r"params/w.*\(16, 4\).*\(32, 4\)"):
        ck.restore(1, target)
    target = _abstract(NamedSharding(mesh8, P("fsdp")), rep)
    target["params"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=rep)
    with pytest.raises(CheckpointMismatchError, match="params/extra"):
        ck.restore(1, target)
    ck.close()


def test_a_checkpoint_with_the_old_rng_leaf_restores_into_the_state_without_it(tmp_path):
    mesh8 = _mesh((8,), ("fsdp",))
    rep = NamedSharding(mesh8, P())
    old = _state(mesh8)
    old["rng"] = jax.random.key_data(jax.random.key(3))  # how the train state used to hold it
    with Checkpointer(str(tmp_path), keep=1, async_save=False) as ck:
        ck.save(1, old, {})
    target = _abstract(NamedSharding(mesh8, P("fsdp")), rep)
    del target["rng"]
    with Checkpointer(str(tmp_path), keep=1) as ck:
        got, _ = ck.restore(1, target)
    assert set(got) == {"params", "opt", "step"} and int(got["step"]) == 7
    np.testing.assert_array_equal(np.asarray(got["params"]["w"]), np.asarray(old["params"]["w"]))


_CHILD = textwrap.dedent("""
    import os, sys, time
    import jax, jax.numpy as jnp
    import orbax.checkpoint as ocp
    from trainer.checkpointing import Checkpointer
    workdir = sys.argv[1]
    ck = Checkpointer(workdir, keep=3)
    state = {"w": jnp.arange(8.0), "step": jnp.int32(1)}
    ck.save(1, state, {"meta": {"step": 1}})
    ck.wait()
    # Simulate a slow storage backend: the finalize (commit) of the next save never finishes.
    orig = ocp.CheckpointManager._finalize
    def slow_finalize(self, *a, **k):
        time.sleep(600)
        return orig(self, *a, **k)
    ocp.CheckpointManager._finalize = slow_finalize
    ck.save(2, {"w": jnp.arange(8.0) + 1, "step": jnp.int32(2)}, {"meta": {"step": 2}})
    deadline = time.time() + 60
    while time.time() < deadline:
        names = os.listdir(os.path.join(workdir, "checkpoints"))
        if any(n.startswith("2") and n != "2" for n in names):
            break
        time.sleep(0.05)
    print("MIDWRITE", sorted(names), flush=True)
    time.sleep(600)
""")


def test_kill9_mid_write_is_not_picked_up(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("MIDWRITE"), line
        assert "2" not in eval(line.split(" ", 1)[1])  # only a temporary dir for step 2
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    ck = Checkpointer(str(tmp_path), keep=3)
    assert ck.latest_step() == 1 and ck.committed_steps() == [1]
    one = SingleDeviceSharding(jax.devices()[0])
    target = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=one),
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=one)}
    got, js = ck.restore(1, target, ["meta"])
    assert int(got["step"]) == 1 and js == {"meta": {"step": 1}}
    # The run carries on: step 2 can be saved again after the interrupted attempt.
    t0 = time.time()
    assert ck.save(2, got, {"meta": {"step": 2}})
    ck.wait()
    assert ck.committed_steps() == [1, 2], time.time() - t0
    ck.close()


_MULTIHOST = textwrap.dedent("""
    import os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from trainer.checkpointing import Checkpointer
    mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    full = np.arange(16, dtype=np.float32).reshape(8, 2)
    w = jax.make_array_from_callback((8, 2), NamedSharding(mesh, P("fsdp")), lambda i: full[i])
    commits = []
    ck = Checkpointer(workdir, keep=2)
    ck.on_commit(commits.append)
    # host-local leaves (a step made outside jit, a typed key) are globalized for the save
    ck.save(1, {"w": w, "step": jnp.int32(1), "rng": jax.random.key(5)}, {"meta": {"n": 1}})
    ck.save(2, {"w": w + 1, "step": jnp.int32(2), "rng": jax.random.key(6)}, {"meta": {"n": 2}})
    ck.wait()
    assert commits == [1, 2], commits
    ck.close()
    ck = Checkpointer(workdir, keep=2)
    assert ck.latest_step() == 2
    rep = NamedSharding(mesh, P())
    target = {"w": jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=rep),
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
              "rng": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)}
    got, js = ck.restore(2, target, ["meta"])
    assert (np.asarray(got["w"].addressable_shards[0].data) == full + 1).all()
    key = np.asarray(jax.random.key_data(got["rng"]).addressable_shards[0].data)
    assert (key == np.asarray(jax.random.key_data(jax.random.key(6)))).all() and js == {"meta": {"n": 2}}
    ck.close()
    print("OK", pid, flush=True)
""")


def test_two_process_multihost_save_and_restore(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, "-c", _MULTIHOST, str(i), str(port), str(tmp_path)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0 and f"OK {i}" in out, out[-3000:]
