"""Mesh construction, logical-axis rules, sharded init and sharded HF loading on 8 fake devices."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlax_tpu import models, sharding
from rlax_tpu.config import ConfigError
from rlax_tpu.models import ModelConfig
from tests.helpers.hf_models import left_padded_batch, make_hf_model

CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=16, arch="qwen2", qkv_bias=True, qk_norm=False, tie_embeddings=False,
                  rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-6, max_position_embeddings=2048,
                  param_dtype="float32", dtype="float32", attention_impl="auto", logprob_chunk=1024)


def mesh_of(data=1, fsdp=-1, tensor=1):
    return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))


def test_make_mesh_fills_and_checks():
    assert dict(mesh_of().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(mesh_of(data=2, fsdp=2, tensor=-1).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="config.mesh.*multiply to 6"):
        mesh_of(data=1, fsdp=3, tensor=2)
    with pytest.raises(ConfigError, match="config.mesh.fsdp.*not a multiple of 3"):
        mesh_of(data=3, fsdp=-1)
    assert all(t == jax.sharding.AxisType.Auto for t in mesh_of().axis_types)


# (mesh sizes, rules, path -> expected spec)
EXPECTED = [
    (dict(fsdp=8), sharding.TRAIN_RULES, {
        ("embed",): P(None, "fsdp"), ("layers", 0, "attn", "q_proj"): P("fsdp", None, None),
        ("layers", 0, "mlp", "down_proj"): P(None, "fsdp"), ("norm", "scale"): P(None)}),
    (dict(fsdp=4, tensor=2), sharding.TRAIN_RULES, {
        ("embed",): P("tensor", "fsdp"), ("lm_head",): P("tensor", "fsdp"),
        ("layers", 0, "attn", "q_proj"): P("fsdp", "tensor", None),
        ("layers", 0, "attn", "k_proj"): P("fsdp", "tensor", None),
        ("layers", 0, "attn", "o_proj"): P("tensor", None, "fsdp"),
        ("layers", 0, "attn", "q_bias"): P("tensor", None),
        ("layers", 0, "mlp", "gate_proj"): P("fsdp", "tensor"), ("norm", "scale"): P(None)}),
    (dict(data=2, fsdp=2, tensor=2), sharding.TRAIN_RULES, {
        ("embed",): P("tensor", "fsdp"), ("layers", 0, "mlp", "down_proj"): P("tensor", "fsdp"),
        ("layers", 0, "attn", "v_proj"): P("fsdp", "tensor", None)}),
    # 2 KV heads on tensor=4: replicated (documented rule); the q heads still split.
    (dict(fsdp=2, tensor=4), sharding.INFERENCE_RULES, {
        ("embed",): P("tensor", None), ("layers", 0, "attn", "q_proj"): P(None, "tensor", None),
        ("layers", 0, "attn", "k_proj"): P(None, None, None),
        ("layers", 0, "mlp", "up_proj"): P(None, "tensor")}),
]


@pytest.fixture(scope="module")
def reference():
    model = models.init(CFG, seed=3)
    tokens, mask, pos = left_padded_batch([8, 5, 3, 8], 8, seed=9)
    fwd = jax.jit(lambda m, *a: m(*a))
    return model, (tokens, pos, mask), np.asarray(fwd(model, tokens, pos, mask))


@pytest.mark.parametrize("sizes,rules,expected", EXPECTED)
def test_sharded_init_layout_values_and_forward(reference, sizes, rules, expected):
    ref_model, (tokens, pos, mask), ref_logits = reference
    mesh = mesh_of(**{"fsdp": 1, **sizes})
    model = models.init(CFG, 3, mesh=mesh, rules=rules)
    flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    for path, spec in expected.items():
        arr = flat[path]
        assert arr.sharding.mesh.shape == mesh.shape
        assert arr.sharding.spec == spec, (path, arr.sharding.spec, spec)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(ref_model)),
                              strict=True):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))
    if sizes == dict(data=2, fsdp=2, tensor=2):  # one forward under jit with sharded params + batch
        batch = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in (tokens, pos, mask)]
        out = jax.jit(lambda m, *a: m(*a))(model, *batch)
        np.testing.assert_allclose(np.asarray(out), ref_logits, atol=1e-5)


def test_strict_mode_names_param_and_axis():
    mesh = mesh_of(fsdp=2, tensor=4)
    abstract = nnx.eval_shape(lambda: models.Transformer(CFG, rngs=nnx.Rngs(0)))
    with pytest.raises(sharding.ShardingError, match=r"layers/0/attn/k_bias: dimension 0 \(kv_heads, size 2\)"
                       r".*mesh axis \('tensor',\) of size 4"):
        sharding.param_shardings(abstract, mesh, sharding.INFERENCE_RULES, strict=True)


def test_batch_sharding():
    mesh = mesh_of(fsdp=4, tensor=2)
    assert sharding.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)


def test_load_hf_with_mesh_equals_unsharded(tmp_path):
    hf = make_hf_model("qwen3_untied", seed=2)
    hf.save_pretrained(str(tmp_path))
    plain, cfg = models.load_hf(str(tmp_path))
    mesh = mesh_of(data=2, fsdp=2, tensor=2)
    sharded, cfg2 = models.load_hf(str(tmp_path), mesh=mesh)
    assert cfg2 == cfg
    n_split = 0
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(plain)), nnx.to_flat_state(nnx.state(sharded)),
                              strict=True):
        b = b.get_value()
        assert b.sharding.mesh.shape == mesh.shape, p
        n_split += any(s is not None for s in b.sharding.spec)
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b), err_msg=str(p))
    assert n_split >= 10
    q = sharded.layers[0].attn.q_proj[...]
    assert q.sharding.spec == P("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (32, 2, 32)  # each device holds only its slice
