"""Decoder-only transformers (Llama / Qwen2 / Qwen3) in Flax NNX, with HF interop.

    model, model_cfg = models.build(config.model, seed)          # load(hf_path) if set, else init
    model, model_cfg = models.load(path, mesh=mesh)              # HF directory or .gguf file
    model_cfg = models.read_model_config(path)                   # the same, without the weights
    model, model_cfg = models.load_hf(path, mesh=mesh)           # HF safetensors + config.json
    model, model_cfg = models.load_gguf(path, mesh=mesh)         # llama.cpp GGUF (dequantized)
    models.save_hf(model, model_cfg, path)
    logits = model(tokens, positions, segment_ids)               # [B, T] -> f32 [B, T, V]
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from rlax_tpu.models.config import ModelConfig
from rlax_tpu.models.gguf import load_gguf, read_gguf_config
from rlax_tpu.models.hf import CheckpointError, load_hf, read_config, save_hf
from rlax_tpu.models.transformer import KVCache, Transformer

__all__ = ["CheckpointError", "KVCache", "ModelConfig", "Transformer", "build", "hf_overrides", "init", "load",
           "load_gguf", "load_hf", "read_model_config", "save_hf"]


def _is_gguf(path: str) -> bool:
    """True for a GGUF file, False for a directory (HF); CheckpointError for anything else."""
    if os.path.isdir(path):
        return False
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint (expected a HF directory or a .gguf file)")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic) nor a HF checkpoint directory")
    return True


def load(path: str, **kw) -> tuple[Transformer, ModelConfig]:
    """(model, model_cfg) from a HF checkpoint directory (load_hf) or a GGUF file (load_gguf);
    keyword arguments (dtype, mesh, rules, overrides) as for those."""
    return (load_gguf if _is_gguf(path) else load_hf)(path, **kw)


def read_model_config(path: str, **kw) -> ModelConfig:
    """The ModelConfig that ``load(path, **kw)`` builds, without reading the weights
    (kw: dtype, overrides)."""
    return (read_gguf_config if _is_gguf(path) else read_config)(path, **kw)


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
    """(model, model_cfg) from ``config.model``: load(hf_path) when set, else random init.

    rngs: an int seed (or nnx.Rngs, only without a mesh). With a mesh, params are created or
    loaded directly in their shardings (rules default to sharding.TRAIN_RULES).
    """
    c = config_model_section
    if c.hf_path:
        return load(c.hf_path, dtype=c.param_dtype, mesh=mesh, rules=rules, overrides=hf_overrides(c))
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
