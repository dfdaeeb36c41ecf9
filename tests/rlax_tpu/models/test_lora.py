"""LoRA on the model: step 0 is the base exactly, the factorized forward equals the merged
weights', merges from the pristine base never drift, adapter bytes are a few % of the model's.
The PEFT export against transformers + peft: tests/trainer/test_export_lora.py."""

from __future__ import annotations

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
                                               ("targets", "q,x", "lora.targets")])
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
