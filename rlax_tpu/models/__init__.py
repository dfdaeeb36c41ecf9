"""Decoder-only transformers (Llama / Qwen2 / Qwen3) in Flax NNX, with HF interop.

    model, model_cfg = models.build(config.model, seed)          # load_hf if hf_path else init
    model, model_cfg = models.load_hf(path, mesh=mesh)           # HF safetensors + config.json
    models.save_hf(model, model_cfg, path)
    logits = model(tokens, positions, segment_ids)               # [B, T] -> f32 [B, T, V]
"""

from __future__ import annotations

import jax
from flax import nnx

from rlax_tpu.models.config import ModelConfig
from rlax_tpu.models.hf import CheckpointError, load_hf, save_hf
from rlax_tpu.models.transformer import KVCache, Transformer

__all__ = ["CheckpointError", "KVCache", "ModelConfig", "Transformer", "build", "hf_overrides", "init", "load_hf",
           "save_hf"]


def init_rngs(seed: int) -> nnx.Rngs:
    """Init RNGs on the 'rbg' key implementation: threefry's unrolled rounds, one copy per param,
    take XLA:CPU about a second each to compile; RngBitGenerator compiles in milliseconds."""
    return nnx.Rngs(params=jax.random.key(seed, impl="rbg"))


def init(model_cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Random init inside one jit: one compilation instead of one per param shape (eager)."""
    make = lambda: Transformer(model_cfg, rngs=init_rngs(seed))
    gdef = nnx.graphdef(nnx.eval_shape(make))
    return nnx.merge(gdef, jax.jit(lambda: nnx.state(make()))())


def hf_overrides(config_model_section) -> dict:
    """The config.model fields that apply on top of a Hugging Face checkpoint's config.json."""
    c = config_model_section
    return dict(dtype=c.dtype, attention_impl=c.attention_impl, logprob_chunk=c.logprob_chunk,
                remat=bool(c.get("remat", False)))


def build(config_model_section, rngs: nnx.Rngs | int = 0, mesh=None, rules=None):
    """(model, model_cfg) from ``config.model``: load_hf(hf_path) when set, else random init.

    rngs: an int seed (or nnx.Rngs, only without a mesh). With a mesh, params are created or
    loaded directly in their shardings (rules default to sharding.TRAIN_RULES).
    """
    c = config_model_section
    if c.hf_path:
        return load_hf(c.hf_path, dtype=c.param_dtype, mesh=mesh, rules=rules, overrides=hf_overrides(c))
    cfg = ModelConfig.from_config(c)
    if mesh is not None:
        from rlax_tpu import sharding

        if not isinstance(rngs, int):
            raise TypeError("models.build with a mesh needs an int seed, not nnx.Rngs")
        return sharding.create_sharded(cfg, mesh, sharding.TRAIN_RULES if rules is None else rules,
                                       rngs), cfg
    if isinstance(rngs, nnx.Rngs):
        return Transformer(cfg, rngs=rngs), cfg
    return init(cfg, rngs), cfg
