"""LoRA on the model: step 0 is the base exactly, the factorized forward equals the merged
weights', merges from the pristine base never drift, adapter bytes are a few % of the model's,
adapter dropout is PEFT's (inverted, on the adapter's input) and only where a key is given.
The PEFT export against transformers + peft: tests/trainer/test_export_lora.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlax_tpu import models
from rlax_tpu.config import ConfigError, get_base_config
from rlax_tpu.config.sections import lora as lora_section
from rlax_tpu.models import LoraSpec, lora
from tests.helpers.hf_models import forward, left_padded_batch, make_hf_model

ALL = lora_section.TARGETS


def _perturbed(adapters: dict, seed: int, std: float = 0.05) -> dict:
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + std * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys, strict=True)])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf = make_hf_model("llama3_scaled", seed=5)
    path = str(tmp_path_factory.mktemp("llama"))
    hf.save_pretrained(path)
    model, cfg = models.load_hf(path)
    return hf, path, model, cfg


def test_step_zero_is_the_base_and_factorized_equals_merged(llama):
    _, _, model, cfg = llama
    spec = LoraSpec(4, 8.0, ALL, 0.0)
    base = nnx.to_pure_dict(nnx.state(model))
    adapters = models.init_adapters(cfg, spec, seed=1)
    assert all(np.all(np.asarray(b) == 0) for _, _, b in lora.pairs(adapters))  # B starts at zero
    graph = models.lora_graphdef(cfg, spec)
    tokens, mask, pos = left_padded_batch([7, 4], 7, seed=1)
    base_logits = np.asarray(forward(model, tokens, pos, mask))
    np.testing.assert_array_equal(np.asarray(forward(nnx.merge(graph, lora.combine(base, adapters)), tokens, pos,
                                                     mask)), base_logits)
    trained = _perturbed(adapters, 2)
    factorized = np.asarray(forward(nnx.merge(graph, lora.combine(base, trained)), tokens, pos, mask))
    merged = np.asarray(forward(nnx.merge(nnx.graphdef(model), lora.merge(base, trained, spec.scale)), tokens, pos,
                                mask))
    assert np.abs(factorized - base_logits).max() > 0.1  # the adapters do change the model
    np.testing.assert_allclose(factorized, merged, atol=1e-4, rtol=0)


def test_many_merges_from_the_pristine_base_equal_one_merge(llama):
    _, _, model, cfg = llama
    spec = LoraSpec(2, 4.0, ("q", "o", "down"), 0.0)
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.to_pure_dict(nnx.state(model)))
    pristine = jax.tree.map(np.asarray, base)
    merge = jax.jit(lambda b, a: lora.merge(b, a, spec.scale))
    start = models.init_adapters(cfg, spec, seed=1)
    versions = [_perturbed(start, s) for s in range(8)]
    held = None
    for adapters in versions:  # a worker swapping through 8 versions
        held = merge(base, adapters)
    once = merge(jax.tree.map(jnp.asarray, pristine), versions[-1])
    for a, b in zip(jax.tree.leaves(held), jax.tree.leaves(once), strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(pristine), strict=True):  # base untouched
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), b.view(np.uint16))


def _bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * 2 for x in jax.tree.leaves(tree))  # bf16 as published


def test_adapter_bytes_are_under_5_percent_of_the_model():
    """From shapes only (nothing allocated): SmolLM2-135M's architecture (30 layers, counted from
    one layer's shapes) at configs/arith_smollm2.py:lora's rank."""
    layers = 30
    smollm2 = models.ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=1, num_heads=9, num_kv_heads=3,
        head_dim=64, rope_theta=100000.0, rope_scaling=None, rms_norm_eps=1e-5, qkv_bias=False, qk_norm=False,
        tie_embeddings=True, max_position_embeddings=8192, arch="llama", param_dtype="float32", dtype="float32",
        attention_impl="reference", logprob_chunk=8192)
    from configs.arith_smollm2 import get_config

    c = get_config("lora").lora
    spec = LoraSpec.from_config(c)
    shapes = nnx.eval_shape(lambda: models.Transformer(smollm2, rngs=models.init_rngs(0), lora=spec))
    adapters = nnx.to_pure_dict(nnx.state(shapes, nnx.LoRAParam))
    full = nnx.to_pure_dict(nnx.state(shapes, nnx.Not(nnx.LoRAParam)))
    per_layer = spec.rank * (576 * 4 + (576 + 192) * 2 + (576 + 1536) * 3)  # q,o + k,v + gate,up,down
    assert _bytes(adapters) == 2 * per_layer
    outside = _bytes({k: v for k, v in full.items() if k != "layers"})  # embedding, final norm
    model_bytes = outside + layers * _bytes(full["layers"])
    assert 134e6 < model_bytes / 2 < 136e6  # SmolLM2-135M
    ratio = layers * _bytes(adapters) / model_bytes
    assert ratio < 0.05, ratio


@pytest.mark.parametrize("field,value,match", [("rank", -1, "lora.rank"), ("alpha", 0.0, "lora.alpha"),
                                               ("targets", "q,x", "lora.targets"), ("dropout", 1.0, "lora.dropout"),
                                               ("dropout", -0.1, "lora.dropout"), ("dropout", True, "lora.dropout")])
def test_bad_lora_config_names_the_field(field, value, match):
    c = get_base_config()
    c.lora[field] = value
    with pytest.raises(ConfigError, match=match):
        lora_section.validate(c.lora, c)


def test_targets_pick_projections():
    c = get_base_config().lora
    c.targets = "q, v"
    assert lora_section.target_names(c) == ("q", "v")
    c.rank = 2
    assert LoraSpec.from_config(c).projections() == {"q_proj", "v_proj"}


TINY = models.ModelConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
    rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-5, qkv_bias=False, qk_norm=False, tie_embeddings=True,
    max_position_embeddings=64, arch="llama", param_dtype="float32", dtype="float32", attention_impl="reference",
    logprob_chunk=64)


def test_dropout_is_inverted_dropout():
    x = jnp.ones((200, 100), jnp.float32)
    y = np.asarray(lora.dropout(x, 0.25, jax.random.key(0)))
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}  # kept values scaled by 1 / (1 - p)
    assert abs((y == 0).mean() - 0.25) < 0.01


def _graph(spec: LoraSpec | None):
    return nnx.graphdef(nnx.eval_shape(lambda: models.Transformer(TINY, rngs=models.init_rngs(0), lora=spec)))


def _adapted(spec: LoraSpec):
    """A tiny adapted model whose B are non-zero (at B = 0 dropout has nothing to change)."""
    model = models.Transformer(TINY, rngs=models.init_rngs(0), lora=spec)
    rng = np.random.default_rng(3)
    adapters = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                            nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    return lora.combine(nnx.to_pure_dict(nnx.state(model)), adapters), adapters


def test_dropout_only_with_a_key_and_never_in_the_merged_weights():
    tokens = np.random.default_rng(2).integers(0, TINY.vocab_size, (2, 6)).astype(np.int32)
    pos = np.broadcast_to(np.arange(6, dtype=np.int32), tokens.shape)
    params, adapters = _adapted(LoraSpec(2, 4.0, ALL, 0.0))
    graph0, graph5 = _graph(LoraSpec(2, 4.0, ALL, 0.0)), _graph(LoraSpec(2, 4.0, ALL, 0.5))

    @functools.partial(jax.jit, static_argnums=0)
    def logits(graph, key=None, params=params):
        m = nnx.merge(graph, params)
        return m.logits(m.hidden(tokens, pos, dropout_key=key))

    off = np.asarray(logits(graph0))
    np.testing.assert_array_equal(logits(graph5), off)  # the rate alone changes no forward
    np.testing.assert_array_equal(logits(graph0, jax.random.key(1)), off)  # nor a key at rate 0
    on = np.asarray(logits(graph5, jax.random.key(1)))
    assert np.abs(on - off).max() > 1e-3
    np.testing.assert_array_equal(logits(graph5, jax.random.key(1)), on)
    assert np.abs(logits(graph5, jax.random.key(2)) - on).max() > 1e-3
    base = nnx.to_pure_dict(nnx.state(nnx.merge(graph0, params), nnx.Not(nnx.LoRAParam)))
    merged = lora.merge(base, adapters, 2.0)  # alpha / rank: what workers run
    np.testing.assert_allclose(np.asarray(logits(_graph(None), params=merged)), off, atol=1e-5, rtol=0)


def test_adapter_gradient_under_dropout_is_the_hand_masked_forwards():
    """One projection (down) by hand: y = h W + s (dropout(h) A) B, dropout(h) = h * mask / (1 - p)
    with the mask the layer's key folded with the projection's index draws; the base branch sees h
    whole. Output and adapter gradients equal the model's."""
    p, spec = 0.4, LoraSpec(2, 4.0, ("down",), 0.4)
    model = nnx.merge(_graph(spec), _adapted(spec)[0])
    mlp = model.layers[0].mlp
    x = jax.random.normal(jax.random.key(4), (2, 5, TINY.hidden_size))
    cot = jax.random.normal(jax.random.key(5), (2, 5, TINY.hidden_size))
    key = jax.random.key(6)
    graph, st = nnx.split(mlp)
    pure = nnx.to_pure_dict(st)

    def ours(a, b):
        return jnp.sum(nnx.merge(graph, {**pure, "down_proj_lora_a": a, "down_proj_lora_b": b})(x, key) * cot)

    wg, wu, wd = mlp.gate_proj[...], mlp.up_proj[...], mlp.down_proj[...]
    h = jax.nn.silu(x @ wg) * (x @ wu)
    keep = jax.random.bernoulli(jax.random.fold_in(key, lora.PROJECTION_INDEX["down_proj"]), 1 - p, h.shape)

    def hand(a, b):
        return jnp.sum((h @ wd + spec.scale * ((h * keep / (1 - p)) @ a) @ b) * cot)

    a0, b0 = mlp.down_proj_lora_a[...], mlp.down_proj_lora_b[...]
    np.testing.assert_allclose(ours(a0, b0), hand(a0, b0), rtol=1e-5)
    for g_ours, g_hand in zip(jax.grad(ours, (0, 1))(a0, b0), jax.grad(hand, (0, 1))(a0, b0), strict=True):
        np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_hand), rtol=1e-5, atol=1e-6)
    unmasked = jax.grad(lambda a, b: jnp.sum((h @ wd + spec.scale * (h @ a) @ b) * cot), 0)(a0, b0)
    assert np.abs(np.asarray(jax.grad(ours, 0)(a0, b0) - unmasked)).max() > 1e-3
