"""Delta publishing, named trees, entries naming older dirs, gc by reference, leaf subsets."""

import glob
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from param_server import CorruptVersionError, ParamStore, TreeMismatchError, VariableClient, layout, publish
from rlax_tpu.config import ConfigError, get_base_config, validate
from tests.helpers import ps_child

DELTA = {"delta": True, "keyframe_every": 3, "delta_encoding": "sparse"}


def _mesh():
    return jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _publish(store, k, values=None):
    return store.publish(ps_child._build_values(_mesh(), ps_child.stepped_values(k) if values is None else values), k)


def _bf16(values):
    return [np.asarray(x).astype(jnp.bfloat16) for x in jax.tree.leaves(values)]


def _same_bits(pulled, values):
    for a, b in zip(jax.tree.leaves(pulled), _bf16(values), strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), b.view(np.uint16))


def _target():
    return ps_child.target(jax.make_mesh((8,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,)))


@pytest.mark.parametrize("encoding", ["sparse", "xor"])
def test_late_joiner_reconstructs_bit_for_bit(tmp_path, encoding):
    store = ParamStore.open(f"file://{tmp_path}/s", **{**DELTA, "delta_encoding": encoding})
    kinds = []
    for k in range(6):
        assert _publish(store, k) == k + 1
        kinds.append(store.last_publish_stats["kind"])
        m = store.read_manifest(k + 1)
        if m["kind"] == "delta" and encoding == "sparse":  # (xor's gain needs tiny updates: bench)
            assert m["written_bytes"] < m["total_bytes"] / 2, m["written_bytes"]
    assert kinds == ["keyframe", "delta", "delta", "keyframe", "delta", "delta"]
    late = ParamStore.open(f"file://{tmp_path}/s", **{**DELTA, "delta_encoding": encoding})
    for v in (6, 3, 4):  # end of a chain, a chain's middle, a keyframe
        _same_bits(late.pull(_target(), v)[0], ps_child.stepped_values(v - 1))
    # A reader that holds version 4 reads only version 5's delta to reach it.
    held = late.read_host(4, list(late.read_manifest(4)["leaves"]))
    got = late.read_host(5, list(held.arrays), held=held)
    _same_bits(list(got.arrays.values()), ps_child.stepped_values(4))


def _flip_last_payload_byte(tmp_path, dirname):
    paths = glob.glob(f"{tmp_path}/s/params/{dirname}/deltas/**/*", recursive=True)
    path = sorted(p for p in paths if os.path.isfile(p))[-1]
    raw = bytearray(open(path, "rb").read())
    raw[-1] ^= 0x40
    open(path, "wb").write(bytes(raw))


def test_variable_client_follows_deltas_and_refuses_a_corrupted_one(tmp_path, monkeypatch):
    url = f"file://{tmp_path}/s"
    store = ParamStore.open(url, **DELTA)
    _publish(store, 0)
    client = VariableClient(ParamStore.open(url, **DELTA), _target(), reader="w", poll_interval_s=0.02)
    try:
        assert client.update_and_wait(timeout=30) and client.version == 1
        _publish(store, 1)
        assert client.update_and_wait(timeout=30) and client.version == 2
        _same_bits(client.params, ps_child.stepped_values(1))
        commit = publish._commit

        def corrupt_then_commit(ps, plan, body):  # damage delta 3 before it becomes visible
            _flip_last_payload_byte(tmp_path, plan.dirname)
            commit(ps, plan, body)

        monkeypatch.setattr(publish, "_commit", corrupt_then_commit)
        _publish(store, 2)
        monkeypatch.setattr(publish, "_commit", commit)
        assert store.read_manifest(3)["kind"] == "delta"
        with pytest.raises(CorruptVersionError, match="version 3"):
            ParamStore.open(url, **DELTA).pull(_target(), 3)
        deadline = time.time() + 30
        while 3 not in client.bad_versions and time.time() < deadline:
            time.sleep(0.02)
        assert 3 in client.bad_versions
        client.update()
        assert client.version == 2  # keeps serving its previous version
        _same_bits(client.params, ps_child.stepped_values(1))
        _publish(store, 3)  # version 4 (keyframe) is good again
        assert client.update_and_wait(timeout=30) and client.version == 4
        _same_bits(client.params, ps_child.stepped_values(3))
    finally:
        client.close()


def test_reconstructed_checksum_catches_a_wrong_base(tmp_path):
    store = ParamStore.open(f"file://{tmp_path}/s", **DELTA)
    _publish(store, 0)
    _publish(store, 1)
    good = store.read_host(1, list(store.read_manifest(1)["leaves"]))
    name = next(iter(good.arrays))
    bad = {**good.arrays, name: good.arrays[name] + jnp.bfloat16(1)}  # a host copy gone wrong
    with pytest.raises(CorruptVersionError, match="checksum"):
        store.read_host(2, list(bad), held=type(good)(1, good.manifest, bad))


def test_unchanged_leaf_names_the_older_dir_and_gc_keeps_it(tmp_path):
    store = ParamStore.open(f"file://{tmp_path}/s", delta=True, keyframe_every=1)  # keyframes only
    base = ps_child.global_values(1)
    changed = lambda i: {**base, "embed": base["embed"] + np.float32(i)}  # noqa: E731
    for i in range(4):
        _publish(store, i, changed(i))
    m = store.read_manifest(4)
    first = store.committed_dir(1)
    assert m["leaves"]["embed"]["dir"] == m["dir"]
    assert m["leaves"]["layers/0/attn/q_proj/kernel"]["dir"] == first
    report = store.gc(keep=1)
    assert report["deleted"] == [1, 2, 3] and store.versions() == [4]
    assert glob.glob(f"{tmp_path}/s/params/{first}/arrays/layers/*")  # still named by version 4
    assert not glob.glob(f"{tmp_path}/s/params/{store.committed_dir(4)}/arrays/layers")
    _same_bits(store.pull(_target())[0], changed(3))
    # Once no kept version names it, the directory goes.
    store2 = ParamStore.open(f"file://{tmp_path}/s", delta=False)
    store2.publish(ps_child._build_values(_mesh(), ps_child.global_values(5)), 9)
    store2.gc(keep=1)
    assert not glob.glob(f"{tmp_path}/s/params/{first}/*")


def test_gc_keeps_the_chain_of_a_pinned_version(tmp_path):
    store = ParamStore.open(f"file://{tmp_path}/s", **DELTA)
    for k in range(3):
        _publish(store, k)  # 1 keyframe, 2 and 3 deltas
    store.pin(3, "slow-reader")
    for k in range(3, 8):
        _publish(store, k)
    report = store.gc(keep=1)
    assert store.versions() == [1, 2, 3, 7, 8], report  # 8 is a delta of keyframe 7
    _same_bits(ParamStore.open(f"file://{tmp_path}/s", **DELTA).pull(_target(), 3)[0], ps_child.stepped_values(2))
    store.unpin("slow-reader")
    store.gc(keep=1)
    assert store.versions() == [7, 8]
    _same_bits(store.pull(_target())[0], ps_child.stepped_values(7))


def test_named_trees_have_their_own_latest(tmp_path):
    url = f"file://{tmp_path}/s"
    default = ParamStore.open(url)
    base = default.tree("base")
    _publish(base, 0)
    _publish(base, 1)
    adapter = ParamStore.open(url, tree="adapter")
    _publish(adapter, 5)
    assert default.latest_version() is None and base.latest_version() == 2 and adapter.versions() == [1]
    assert ParamStore.open(url, tree="base").read_manifest(2)["step"] == 1
    assert json.loads(open(f"{tmp_path}/s/params/base/LATEST").read())["version"] == 2
    _same_bits(adapter.pull(_target())[0], ps_child.stepped_values(5))
    base.pin(1, "w")
    assert list(base.pins()) == ["params/base/pins/w"] and not default.pins()
    for bad in ("v00000001-e1", "pins", "Base", "a/b"):
        with pytest.raises(ValueError, match="bad tree name"):
            default.tree(bad)


def test_pull_a_subset_of_leaves(tmp_path):
    store = ParamStore.open(f"file://{tmp_path}/s", **DELTA)
    _publish(store, 0)
    _publish(store, 1)  # a delta: the subset is reconstructed too
    for v in (1, 2):
        got, _ = store.pull(_target(), v, leaves=["layers/1/", "embed"])
        want = ps_child.stepped_values(v - 1)
        assert got["layers"][0]["attn"]["q_proj"]["kernel"] is None and got["layers"][2]["norm"]["scale"] is None
        np.testing.assert_array_equal(np.asarray(got["embed"]), want["embed"].astype(jnp.bfloat16))
        np.testing.assert_array_equal(np.asarray(got["layers"][1]["norm"]["scale"]),
                                      want["layers"][1]["norm"]["scale"].astype(jnp.bfloat16))
    sub = {"embed": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=NamedSharding(_mesh(), P()))}
    got, _ = store.pull(sub, leaves=["embed"])  # a partial target tree
    assert got["embed"].dtype == jnp.float32
    with pytest.raises(TreeMismatchError, match="no target leaf"):
        store.pull(_target(), leaves=["nothing/"])


def test_format_1_manifest_still_reads(tmp_path):
    store = ParamStore.open(f"file://{tmp_path}/s")
    _publish(store, 0)
    key = store.keys.manifest_key(store.committed_dir(1))
    body = layout.decode_manifest(store.kv.get(key))
    body = {**body, "format": 1, "leaves": {n: {f: e[f] for f in ("key", "shape", "dtype", "source_dtype", "chunks")}
                                          for n, e in body["leaves"].items()}}
    for f in ("kind", "base", "chain", "written_bytes"):
        body.pop(f)
    store.kv.put(key, layout.encode_manifest(body))
    _same_bits(store.pull(_target())[0], ps_child.stepped_values(0))
    _publish(store, 1)  # and the next version (written by a delta publisher) builds on it
    assert store.gc(keep=1)["deleted"] == [1]


@pytest.mark.parametrize("field,value", [("keyframe_every", 0), ("delta_encoding", "zip")])
def test_bad_delta_config_names_the_field(field, value):
    c = get_base_config()
    c.store[field] = value
    with pytest.raises(ConfigError, match=f"store.{field}"):
        validate(c)


def test_direct_file_reads_refuse_a_truncated_chunk_and_match_tensorstore(tmp_path, monkeypatch):
    from param_server import file_reads

    store = ParamStore.open(f"file://{tmp_path}/s", chunk_mib=2**-10)  # 1 KiB chunks: several per shard
    _publish(store, 0)
    direct, _ = store.pull(_target())
    monkeypatch.setattr(file_reads, "supported", lambda *a: False)
    via_ts, _ = store.pull(_target())
    _same_bits(direct, ps_child.stepped_values(0))
    _same_bits(via_ts, ps_child.stepped_values(0))
    monkeypatch.undo()
    chunk = sorted(p for p in glob.glob(f"{tmp_path}/s/params/{store.committed_dir(1)}/arrays/embed/c/**",
                                        recursive=True) if os.path.isfile(p))[0]
    open(chunk, "r+b").truncate(10)
    with pytest.raises(CorruptVersionError, match="version 1: leaf 'embed'.*wrong size"):
        store.pull(_target())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float32])
def test_sparse_and_xor_encodings_are_exact(dtype):
    from param_server import delta

    rng = np.random.default_rng(0)
    old = rng.standard_normal((300, 700)).astype(dtype)
    for changed_at in (rng.random(old.shape) < 0.01, np.zeros(old.shape, bool)):
        changed_at.flat[[0, 5, 200_000]] = True  # a gap of ~200k does not fit uint16: flat indices
        new = old.copy()
        new[changed_at] = np.array([np.nan, -0.0, 1.5] * changed_at.sum(), dtype)[: changed_at.sum()]
        idx = delta.changed(new, old)
        kind, pos = delta.positions(idx, new.size)
        got = delta.apply_sparse(old, delta.encode_sparse(new, idx, pos), idx.size, kind)
        np.testing.assert_array_equal(delta.bits(got), delta.bits(new))
        np.testing.assert_array_equal(delta.bits(delta.apply_xor(old, delta.xor(new, old))), delta.bits(new))
    assert kind == "flat32"
    idx = delta.changed(new, old)[1:-1]  # without the far one: gaps fit
    assert delta.positions(idx, new.size)[0] == "gap16"
    with pytest.raises(ValueError, match="does not hold"):
        delta.apply_sparse(old, b"\0" * 7, 1, "gap16")


@pytest.mark.parametrize("encoding", ["sparse", "xor"])
def test_deltas_on_a_memory_store(encoding):
    store = ParamStore.open("memory://", **{**DELTA, "delta_encoding": encoding})
    for k in range(3):
        _publish(store, k)
    late = ParamStore.open(store.kv, **{**DELTA, "delta_encoding": encoding})  # memory:// is per KVStore
    _same_bits(late.pull(_target())[0], ps_child.stepped_values(2))



def test_segmented_reads_direct_buffered_and_refused_odirect_agree(tmp_path, monkeypatch):
    import errno

    from param_server import delta, file_reads

    monkeypatch.setattr(file_reads, "SEGMENT_BYTES", 4096)  # 16 KiB chunks: 5 segments each, the last short
    w = np.random.default_rng(0).standard_normal((64, 512)).astype(jnp.bfloat16)
    target = {"w": jax.ShapeDtypeStruct(w.shape, jnp.bfloat16)}
    url = f"file://{tmp_path}/s"
    ParamStore.open(url, chunk_mib=2**-6).publish({"w": w}, 0)  # 4 chunks of 16 KiB

    def evict():  # out of the page cache: reads go to the device (O_DIRECT where on)
        for p in glob.glob(f"{tmp_path}/s/**", recursive=True):
            if os.path.isfile(p):
                fd = os.open(p, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)

    for direct in (True, False):
        evict()
        reader = ParamStore.open(url, direct_io=direct)
        np.testing.assert_array_equal(delta.bits(np.asarray(reader.pull(target)[0]["w"])), delta.bits(w))
        assert reader._direct.direct is direct
    real_open = os.open

    def no_odirect(path, flags, *a):  # a file system that refuses O_DIRECT
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(file_reads.os, "open", no_odirect)
    evict()
    refused = ParamStore.open(url, direct_io=True)
    np.testing.assert_array_equal(delta.bits(np.asarray(refused.pull(target)[0]["w"])), delta.bits(w))
    assert refused._direct.direct is False  # fell back to buffered reads for good
    monkeypatch.setattr(file_reads.os, "open", real_open)
    chunks = sorted(p for p in glob.glob(f"{tmp_path}/s/params/*/arrays/w/c/**", recursive=True)
                    if os.path.isfile(p))
    assert len(chunks) == 4 and all(os.path.getsize(c) == 16 * 1024 + 4 for c in chunks)
    with open(chunks[2], "r+b") as f:  # a flipped byte in a later segment
        f.seek(3 * 4096 + 7)
        b = f.read(1)
        f.seek(3 * 4096 + 7)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(CorruptVersionError, match="version 1: leaf 'w'.*checksum"):
        ParamStore.open(url, direct_io=True).pull(target)
    os.truncate(chunks[1], 2 * 4096)  # short in its third segment
    with pytest.raises(CorruptVersionError, match="version 1: leaf 'w'.*wrong size"):
        ParamStore.open(url, direct_io=True).pull(target)
