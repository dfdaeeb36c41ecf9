"""LoRA publishing: the base once, adapter versions naming it by hash; readers merge into a
pristine base, pull another base when a version names it, and refuse one they cannot get."""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest
from flax import nnx

from param_server import ParamStore, VariableClient
from param_server.adapters import AdapterPublisher, AdapterReader, BaseMismatchError
from rlax_tpu import models
from rlax_tpu.models import LoraSpec, ModelConfig, lora

SPEC = LoraSpec(2, 4.0, ("q", "v", "down"), 0.0)
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6, qkv_bias=False,
                  qk_norm=False, tie_embeddings=True, max_position_embeddings=64, arch="llama",
                  param_dtype="float32", dtype="float32", attention_impl="reference", logprob_chunk=64)


def _targets(tree):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, "float32", sharding=dev), tree)


@pytest.fixture
def setup(tmp_path):
    root = ParamStore.open(f"file://{tmp_path}/store/", publish_dtype="float32")
    root.acquire_epoch()  # as the trainer does: both trees publish under the run's one epoch
    base = nnx.to_pure_dict(nnx.state(models.init(CFG, 0)))
    adapters = models.init_adapters(CFG, SPEC, 1)
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # non-zero B: the merge changes weights
    return root, base, adapters


def test_base_once_adapters_only_and_merged_reads(setup):
    root, base, adapters = setup
    pub = AdapterPublisher(root)
    h = pub.publish_base(base)
    assert pub.publish_base(base) == h and pub.base_store.versions() == [1]  # not published twice
    for step in range(3):
        pub.store.publish(jax.tree.map(lambda x, s=step: x * (s + 1), adapters), step, meta=pub.meta(SPEC))
    m = pub.store.read_manifest(3)
    assert m["meta"]["base_hash"] == h and set(m["leaves"]) == {n for n, _ in _named(adapters)}
    assert m["total_bytes"] < 0.2 * pub.base_store.read_manifest(1)["total_bytes"]
    reader = AdapterReader(root, _targets(base), _targets(adapters), SPEC, name="w")
    merged, manifest = reader.read(3)
    want = lora.merge(base, jax.tree.map(lambda x: x * 3, adapters), SPEC.scale)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert manifest["step"] == 2 and reader.base_hash == h


def _named(tree):
    from param_server import layout

    return layout.flatten(tree)[0]


def test_a_new_base_is_pulled_and_an_unknown_one_refused(setup):
    root, base, adapters = setup
    pub = AdapterPublisher(root)
    pub.publish_base(base)
    pub.store.publish(adapters, 0, meta=pub.meta(SPEC))
    reader = AdapterReader(root, _targets(base), _targets(adapters), SPEC, name="w")
    first, _ = reader.read(1)
    other = jax.tree.map(lambda x: x * 2, base)  # a second base (e.g. a new starting checkpoint)
    pub.publish_base(other)
    pub.store.publish(adapters, 1, meta=pub.meta(SPEC))
    merged, _ = reader.read(2)
    want = lora.merge(other, adapters, SPEC.scale)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    pub.store.publish(adapters, 2, meta={**pub.meta(SPEC), "base_hash": "0" * 64})  # a base nobody has
    with pytest.raises(BaseMismatchError, match="needs base 000000000000"):
        reader.read(3)
    pub.store.publish(adapters, 3, meta={**pub.meta(SPEC), "lora": {"rank": 4}})
    with pytest.raises(BaseMismatchError, match="LoRA settings"):
        reader.read(4)


def test_variable_client_refuses_a_version_on_an_unknown_base(setup):
    root, base, adapters = setup
    pub = AdapterPublisher(root)
    pub.publish_base(base)
    pub.store.publish(adapters, 0, meta=pub.meta(SPEC))
    reader = AdapterReader(root, _targets(base), _targets(adapters), SPEC, name="w")
    client = VariableClient(reader.store, _targets(base), "w", read=reader.read, poll_interval_s=0.05)
    try:
        assert client.update_and_wait(timeout=30) and client.version == 1
        pub.store.publish(adapters, 1, meta={**pub.meta(SPEC), "base_hash": "f" * 64})
        deadline = time.time() + 30
        while 2 not in client.bad_versions and time.time() < deadline:
            time.sleep(0.05)
        assert 2 in client.bad_versions
        assert not client.update() and client.version == 1  # keeps serving the version it has
    finally:
        client.close()
