"""Param server with real processes: kill -9 during publish, and a two-process (multi-host) publish."""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from param_server import ParamStore, faults
from tests.helpers import ROOT, ps_child

CHILD = os.path.join(ROOT, "tests", "helpers", "ps_child.py")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", faults.ENV)}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _target(mesh, spec_fn, seed=1):
    def make(path, x):
        from rlax_tpu.tree import path_str as leaf_name

        sharding = NamedSharding(mesh, spec_fn(leaf_name(path)))
        return jax.ShapeDtypeStruct(x.shape, np.float32, sharding=sharding)

    return jax.tree_util.tree_map_with_path(make, ps_child.global_values(seed))


def _assert_close(pulled, seed):
    want = ps_child.global_values(seed)
    for a, b in zip(jax.tree.leaves(pulled), jax.tree.leaves(want), strict=True):
        # published as bf16: compare to the bf16 rounding of the reference
        np.testing.assert_array_equal(np.asarray(a), b.astype(jax.numpy.bfloat16).astype(np.float32))


def _infer_mesh():
    return jax.make_mesh((8,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))


def _infer_spec(name):
    return P(None, "tensor") if name.endswith("kernel") else P()


POINTS = ["after_leaves:2", "after_manifest", "before_cas:pause", "after_cas"]


def test_kill_during_publish_leaves_previous_version(tmp_path):
    urls, procs = {}, {}
    for i, point in enumerate(POINTS):  # start all children at once: they share 2 cores
        urls[point] = f"file://{tmp_path}/s{i}"
        first = ParamStore.open(urls[point])
        mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        assert first.publish(ps_child.build(mesh, seed=1), step=1) == 1
        procs[point] = subprocess.Popen([sys.executable, CHILD, "publish", urls[point], "2"], cwd=ROOT,
                                        env=_env(**{faults.ENV: point}), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
    target = _target(_infer_mesh(), _infer_spec)
    for point, proc in procs.items():
        if point.endswith(":pause"):
            line = proc.stdout.readline()  # blocks until the child is parked at the point
            assert line.startswith("RLAX_PS_FAULT_AT before_cas"), (line, proc.stderr.read())
            os.kill(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=120)
        assert rc == -signal.SIGKILL, (point, rc, proc.stderr.read()[-2000:])
        store = ParamStore.open(urls[point])
        if point == "after_cas":
            # The CAS happened: the version is visible even though the index entry was not written.
            assert store.latest_version() == 2 and store.versions() == [1, 2]
            _assert_close(store.pull(target)[0], seed=2)
            continue
        assert store.latest_version() == 1, point
        assert store.versions() == [1]
        pulled, v = store.pull(target)
        assert v == 1
        _assert_close(pulled, seed=1)
        # The store stays usable: a new publisher commits version 2, gc removes the dead attempt.
        mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        assert store.publish(ps_child.build(mesh, seed=3), step=3) == 2
        _assert_close(store.pull(target)[0], seed=3)
        report = store.gc(keep=5)
        assert report["orphans"] == ["v00000002-e2"], report
        assert store.versions() == [1, 2]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multihost_publish_each_process_writes_own_shards(tmp_path):
    url = f"file://{tmp_path}/store"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, CHILD, "multihost", url, str(port), str(i)], cwd=ROOT,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-host publish timed out")
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert [o["process"] for o in outs] == [0, 1] and all(o["devices"] == 4 for o in outs)
    assert all(o["version"] == 1 for o in outs)
    # 7 leaves: 4 sharded over 4 devices (each process writes its 2 shards) and 3 replicated
    # (only replica 0 is written, by the process that holds it: process 0).
    assert outs[0]["pieces_written"] == 4 * 2 + 3 and outs[1]["pieces_written"] == 4 * 2
    total = sum(x.nbytes // 2 for x in jax.tree.leaves(ps_child.global_values(7)))  # bf16 bytes
    assert outs[0]["bytes_written"] + outs[1]["bytes_written"] == total
    store = ParamStore.open(url)
    assert store.latest_version() == 1
    pulled, _ = store.pull(_target(_infer_mesh(), _infer_spec, seed=7))
    _assert_close(pulled, seed=7)
    assert store.kv.list(f"params/{store.committed_dir(1)}/_done/") == [
        f"params/{store.committed_dir(1)}/_done/p0", f"params/{store.committed_dir(1)}/_done/p1"]


def _bits_equal(pulled, values):
    for a, b in zip(jax.tree.leaves(pulled), jax.tree.leaves(values), strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16),
                                      b.astype(jax.numpy.bfloat16).view(np.uint16))


def test_kill_during_delta_publish_leaves_previous_version(tmp_path):
    # The child publishes version 1 (keyframe) and 2 (delta), then dies publishing delta 3.
    procs = {point: subprocess.Popen([sys.executable, CHILD, "deltas", f"file://{tmp_path}/{i}", "2", point],
                                     cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, point in enumerate(["after_leaves:2", "before_cas:pause"])}
    target = ps_child.target(_infer_mesh())
    for i, (point, proc) in enumerate(procs.items()):
        lines = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert [x["kind"] for x in lines] == ["keyframe", "delta"], lines
        if point.endswith(":pause"):
            line = proc.stdout.readline()
            assert line.startswith("RLAX_PS_FAULT_AT before_cas"), (line, proc.stderr.read())
            os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=120) == -signal.SIGKILL, proc.stderr.read()[-2000:]
        store = ParamStore.open(f"file://{tmp_path}/{i}", **ps_child.delta_options())
        assert store.latest_version() == 2 and store.versions() == [1, 2], point
        assert store.read_manifest(2)["kind"] == "delta"
        _bits_equal(store.pull(target)[0], ps_child.stepped_values(1))  # late joiner: keyframe + delta
        assert store.gc()["deleted"] == [] and store.versions() == [1, 2]  # 2 needs its keyframe
        # A new publisher (no host copy: a keyframe) takes over; gc removes the dead attempt.
        mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        assert store.publish(ps_child._build_values(mesh, ps_child.stepped_values(5)), 5) == 3
        assert store.read_manifest(3)["kind"] == "keyframe"
        assert store.gc()["orphans"] == ["v00000003-e1"] and store.versions() == [3]


def test_gc_never_removes_a_link_of_a_pinned_chain(tmp_path):
    url = f"file://{tmp_path}/store"
    store = ParamStore.open(url, **ps_child.delta_options())
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    for k in range(2):
        store.publish(ps_child._build_values(mesh, ps_child.stepped_values(k)), k)
    reader = subprocess.Popen([sys.executable, CHILD, "hold", url], cwd=ROOT, env=_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        held = json.loads(reader.stdout.readline() or reader.stderr.read())
        want = ps_child.checksums(jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), ps_child.stepped_values(1)))
        assert held == {"version": 2, "crc": want}
        for k in range(2, 7):  # keyframes at versions 4 and 7
            store.publish(ps_child._build_values(mesh, ps_child.stepped_values(k)), k)
        report = store.gc(keep=1)
        assert store.versions() == [1, 2, 7], report  # the pinned delta 2 keeps its keyframe 1
        reader.stdin.write("again\n")
        reader.stdin.flush()
        assert json.loads(reader.stdout.readline() or reader.stderr.read()) == held  # re-read from scratch
    finally:
        reader.kill()
        reader.wait(timeout=30)
    store.unpin("holder")
    store.gc(keep=1)
    assert store.versions() == [7]
