"""ParamStore in one process: round trips, resharding, checksums, gc and pins, fencing, bad input."""

import glob
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from param_server import (
    CorruptVersionError,
    FencedError,
    IncompleteVersionError,
    ParamStore,
    PublishError,
    StoreError,
    TreeMismatchError,
    VariableClient,
    VersionNotFoundError,
)
from rlax_tpu.kvstore import KVStore

AUTO = jax.sharding.AxisType.Auto


def train_mesh():
    return jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(AUTO,) * 2)


def infer_mesh():
    return jax.make_mesh((8,), ("tensor",), axis_types=(AUTO,))


TRAIN_SPECS = {"kernel": P("fsdp", "tensor"), "embedding": P("fsdp", None), "scale": P(), "count": P()}
INFER_SPECS = {"kernel": P(None, "tensor"), "embedding": P(None, "tensor"), "scale": P(), "count": P()}


def make_params(seed=0, mesh=None):
    mesh = mesh or train_mesh()
    rng = np.random.default_rng(seed)
    tree = {
        "embed": {"embedding": rng.standard_normal((32, 16), np.float32)},
        "layers": [{"attn": {"q_proj": {"kernel": rng.standard_normal((16, 8), np.float32)}},
                    "norm": {"scale": np.zeros((16,), np.float32)}} for _ in range(2)],
        "count": np.array(seed, np.int32),
    }
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.device_put(x, NamedSharding(mesh, TRAIN_SPECS[_last(p)])), tree)


def _last(path):
    k = path[-1]
    return getattr(k, "key", None) or getattr(k, "name", None)


def target_for(params, mesh=None, specs=None, float_dtype=jnp.bfloat16):
    mesh = mesh or infer_mesh()
    specs = specs or INFER_SPECS

    def t(p, x):
        dtype = float_dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=NamedSharding(mesh, specs[_last(p)]))

    return jax.tree_util.tree_map_with_path(t, params)


def assert_equal_bf16(pulled, params):
    for a, b in zip(jax.tree.leaves(pulled), jax.tree.leaves(params), strict=True):
        want = np.asarray(b).astype(a.dtype) if a.dtype != b.dtype else np.asarray(b)
        np.testing.assert_array_equal(np.asarray(a), want)


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path):
    return ParamStore.open("memory://" if request.param == "memory" else f"file://{tmp_path}/store")


def test_round_trip(store):
    params = make_params(1)
    assert store.latest_version() is None and store.versions() == []
    assert store.publish(params, step=10) == 1
    target = target_for(params, mesh=train_mesh(), specs=TRAIN_SPECS)
    pulled, v = store.pull(target)
    assert v == 1
    assert_equal_bf16(pulled, params)
    leaf = pulled["layers"][1]["attn"]["q_proj"]["kernel"]
    assert leaf.dtype == jnp.bfloat16
    assert leaf.sharding == target["layers"][1]["attn"]["q_proj"]["kernel"].sharding
    assert pulled["count"].dtype == jnp.int32 and int(pulled["count"]) == 1
    manifest = store.read_manifest(1)
    assert manifest["step"] == 10
    assert manifest["leaves"]["layers/0/attn/q_proj/kernel"]["source_dtype"] == "float32"
    assert store.publish(make_params(2), step=20) == 2
    assert store.versions() == [1, 2] and store.latest()["step"] == 20
    assert_equal_bf16(store.pull(target, version=1)[0], params)


def test_pull_into_other_mesh_equals_original(store):
    """Training layout (fsdp x tensor) into inference layout (tensor only), read as f32."""
    params = make_params(3)
    store.publish(params, step=1)
    target = target_for(params, float_dtype=jnp.float32)
    pulled, _ = store.pull(target)
    for a, b in zip(jax.tree.leaves(pulled), jax.tree.leaves(params), strict=True):
        assert a.sharding.mesh.axis_names == ("tensor",)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)).astype(a.dtype))
    # each device got only its slice
    kernel = pulled["layers"][0]["attn"]["q_proj"]["kernel"]
    assert {s.data.shape for s in kernel.addressable_shards} == {(16, 1)}


def test_publish_float32(tmp_path):
    store = ParamStore.open(f"file://{tmp_path}/s", publish_dtype="float32", compression="zstd")
    params = make_params(4)
    store.publish(params, step=1)
    pulled, _ = store.pull(target_for(params, float_dtype=jnp.float32))
    for a, b in zip(jax.tree.leaves(pulled), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _chunk_files(tmp_path, version_dir, leaf="layers/0/attn/q_proj/kernel"):
    return sorted(glob.glob(f"{tmp_path}/store/params/{version_dir}/arrays/{leaf}/c/**/*", recursive=True))


def test_flipped_byte_is_detected_and_reader_falls_back(tmp_path):
    store = ParamStore.open(f"file://{tmp_path}/store")
    p1, p2 = make_params(1), make_params(2)
    store.publish(p1, step=1)
    store.publish(p2, step=2)
    chunk = [f for f in _chunk_files(tmp_path, store.committed_dir(2)) if os.path.isfile(f)][0]
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(chunk, "wb").write(bytes(data))
    target = target_for(p1)
    with pytest.raises(CorruptVersionError, match=r"version 2: leaf 'layers/0/attn/q_proj/kernel'.*checksum"):
        store.pull(target)
    pulled, v = store.pull(target, fallback=True)
    assert v == 1
    assert_equal_bf16(pulled, p1)


def test_missing_chunk_or_manifest_is_incomplete(tmp_path):
    store = ParamStore.open(f"file://{tmp_path}/store")
    p1 = make_params(1)
    store.publish(p1, step=1)
    store.publish(make_params(2), step=2)
    os.remove([f for f in _chunk_files(tmp_path, store.committed_dir(2)) if os.path.isfile(f)][-1])
    with pytest.raises(IncompleteVersionError, match="version 2: leaf 'layers/0/attn/q_proj/kernel'"):
        store.pull(target_for(p1))
    store.kv.delete(f"params/{store.committed_dir(2)}/MANIFEST.json")
    with pytest.raises(IncompleteVersionError, match="manifest"):
        store.pull(target_for(p1))
    assert store.pull(target_for(p1), fallback=True)[1] == 1


def test_altered_manifest_is_corrupt(store):
    p = make_params(1)
    store.publish(p, step=1)
    key = f"params/{store.committed_dir(1)}/MANIFEST.json"
    store.kv.put(key, store.kv.get(key).replace(b'"step": 1', b'"step": 9'))
    with pytest.raises(CorruptVersionError, match="digest"):
        store.pull(target_for(p))


def test_gc_keeps_pinned_and_latest(store):
    p = make_params(0)
    for step in range(1, 7):
        store.publish(p, step=step)
    store.pin(2, "worker-a", ttl_s=60)
    store.pin(3, "worker-b", ttl_s=-1)  # already expired: protects nothing
    report = store.gc(keep=2)
    assert store.versions() == [2, 5, 6]
    assert sorted(report["deleted"]) == [1, 3, 4] and report["expired_pins"] == ["worker-b"]
    assert [p["version"] for p in store.pins().values()] == [2]
    with pytest.raises(VersionNotFoundError, match="version 3"):
        store.pull(target_for(p), version=3)
    assert_equal_bf16(store.pull(target_for(p), version=2)[0], p)
    store.unpin("worker-a")
    store.gc(keep=1)
    assert store.versions() == [6]  # LATEST always stays


def test_stale_publisher_is_fenced(tmp_path):
    url = f"file://{tmp_path}/store"
    old, new = ParamStore.open(url), ParamStore.open(url)
    p = make_params(0)
    assert old.publish(p, step=1) == 1  # old acquires epoch 1
    assert new.acquire_epoch() == 2
    with pytest.raises(FencedError, match="epoch 1 is fenced out by epoch 2"):
        old.publish(p, step=2)
    assert new.publish(p, step=2) == 2
    assert old.latest()["epoch"] == 2
    with pytest.raises(FencedError):
        old.publish(p, step=3)
    assert new.latest_version() == 2


def test_async_publish_and_error_surfaces(tmp_path):
    url = f"file://{tmp_path}/store"
    trainer = ParamStore.open(url)
    p = make_params(1)
    futures = [trainer.publish_async(p, step=s) for s in (1, 2, 3)]
    assert [f.result(timeout=60) for f in futures] == [1, 2, 3]
    trainer.flush()
    ParamStore.open(url).acquire_epoch()  # a newer trainer takes over
    fut = trainer.publish_async(p, step=4)
    with pytest.raises(FencedError):
        fut.result(timeout=60)
    with pytest.raises(PublishError, match="earlier asynchronous publish failed"):
        trainer.publish_async(p, step=5)  # the failure surfaces in the trainer's next call


def test_variable_client(store):
    p1, p2 = make_params(1), make_params(2)
    client = VariableClient(store, target_for(p1), reader="worker-0", poll_interval_s=0.05)
    try:
        assert client.version is None and not client.update()
        store.publish(p1, step=1)
        assert client.update_and_wait(timeout=30) and client.version == 1
        assert_equal_bf16(client.params, p1)
        assert store.pins()["params/pins/worker-0"]["version"] == 1
        store.publish(p2, step=2)
        deadline = time.time() + 30
        while not client.update():  # non-blocking; the thread fetches in the background
            assert time.time() < deadline
            time.sleep(0.02)
        assert client.version == 2
        assert_equal_bf16(client.params, p2)
    finally:
        client.close()
    assert store.pins() == {}


def test_unknown_scheme_and_unreachable_path(tmp_path):
    with pytest.raises(StoreError, match="unknown scheme"):
        ParamStore.open("s3://bucket/run")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create directory"):
        ParamStore.open(f"file://{blocker}/store")
    with pytest.raises(StoreError, match="no workdir"):
        ParamStore.open("")
    assert ParamStore.open("", workdir=str(tmp_path)).url == f"file://{tmp_path}/store/"


def test_target_mismatch_names_the_leaf():
    store = ParamStore.open(KVStore.open("memory://"))
    p = make_params(0)
    store.publish(p, step=1)
    t = target_for(p)
    bad_shape = {**t, "embed": {"embedding": jax.ShapeDtypeStruct((32, 8), jnp.bfloat16)}}
    with pytest.raises(TreeMismatchError, match=r"leaf 'embed/embedding': target shape \(32, 8\)"):
        store.pull(bad_shape)
    bad_dtype = {**t, "embed": {"embedding": jax.ShapeDtypeStruct((32, 16), jnp.int32)}}
    with pytest.raises(TreeMismatchError, match="leaf 'embed/embedding': target dtype int32"):
        store.pull(bad_dtype)
    bad_name = {**t, "embed": {"table": t["embed"]["embedding"]}}
    with pytest.raises(TreeMismatchError, match="target leaf 'embed/table' is not in version 1"):
        store.pull(bad_name)
    missing = {k: v for k, v in t.items() if k != "count"}
    with pytest.raises(TreeMismatchError, match="leaves the target lacks: \\['count'\\]"):
        store.pull(missing)
    with pytest.raises(VersionNotFoundError, match="version 9"):
        store.pull(t, version=9)


def test_odd_leaf_names_round_trip():
    store = ParamStore.open("memory://")
    params = {"a b": {"MANIFEST.json": jnp.ones((2,))}, "..": jnp.arange(3), "x~y": jnp.zeros(())}
    store.publish(params, step=0)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype if x.dtype == jnp.int32 else jnp.bfloat16), params)
    pulled, _ = store.pull(target)
    assert_equal_bf16(pulled, params)


def test_nnx_state_and_pure_dict_share_leaf_names():
    from flax import nnx

    model = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    store = ParamStore.open("memory://")
    store.publish(state, step=0)
    assert sorted(store.read_manifest(1)["leaves"]) == ["bias", "kernel"]
    pure = nnx.to_pure_dict(state)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), pure)
    pulled, _ = store.pull(target)
    np.testing.assert_array_equal(np.asarray(pulled["kernel"]),
                                  np.asarray(pure["kernel"].astype(jnp.bfloat16)).astype(np.float32))


def test_variable_client_skips_a_corrupt_version(tmp_path):
    store = ParamStore.open(f"file://{tmp_path}/store")
    p1, p3 = make_params(1), make_params(3)
    store.publish(p1, step=1)
    store.publish(make_params(2), step=2)
    chunk = [f for f in _chunk_files(tmp_path, store.committed_dir(2)) if os.path.isfile(f)][0]
    with open(chunk, "r+b") as f:
        f.seek(3)
        byte = f.read(1)
        f.seek(3)
        f.write(bytes([byte[0] ^ 0xFF]))
    client = VariableClient(store, target_for(p1), reader="w", poll_interval_s=0.05)
    try:
        assert client.update_and_wait(timeout=30) and client.version == 1
        assert client.bad_versions == {2}
        assert_equal_bf16(client.params, p1)
        store.publish(p3, step=3)
        assert client.update_and_wait(timeout=30) and client.version == 3
        assert_equal_bf16(client.params, p3)
    finally:
        client.close()
