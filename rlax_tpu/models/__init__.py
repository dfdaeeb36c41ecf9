"""Decoder-only transformers (Llama / Qwen2 / Qwen3) in Flax NNX, with checkpoint interop.

    model_cfg = models.config_from_section(config.model, vocab_size)   # the trainer's: f32 params
    model = models.build(config.model, model_cfg, seed, mesh=mesh)     # weights: checkpoint or init
    model, model_cfg = models.load(path, mesh=mesh)                    # HF directory or .gguf file
    model_cfg = models.read_model_config(path)                         # the same, without weights
    model, model_cfg = models.load_hf(path, mesh=mesh)                 # HF safetensors + config.json
    model, model_cfg = models.load_gguf(path, mesh=mesh)               # llama.cpp GGUF (dequantized)
    models.save_hf(model, model_cfg, path)
    spec = models.LoraSpec.from_config(config.lora)                   # None when lora.rank is 0
    adapters = models.init_adapters(model_cfg, spec, seed, mesh=mesh)  # pure dict of LoRA A/B
    logits = model(tokens, positions, segment_ids)                     # [B, T] -> f32 [B, T, V]

The model is the training forward and log-probs; generation has its own view of the same weights
(inference_worker.engine).
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from rlax_tpu import sharding
from rlax_tpu.models.config import MASTER_DTYPE, ModelConfig, resolve_dtype
from rlax_tpu.models.gguf import load_gguf, read_gguf_config
from rlax_tpu.models.hf import CheckpointError, load_hf, read_config, save_hf
from rlax_tpu.models.lora import LoraSpec
from rlax_tpu.models.transformer import Transformer

__all__ = ["MASTER_DTYPE", "CheckpointError", "LoraSpec", "ModelConfig", "Transformer", "build", "config_from_section",
           "init", "init_adapters", "init_rngs", "is_gguf", "load", "load_gguf", "load_hf", "lora_graphdef",
           "overrides", "read_config", "read_model_config", "resolve_dtype", "save_hf"]


def is_gguf(path: str) -> bool:
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
    return (load_gguf if is_gguf(path) else load_hf)(path, **kw)


def read_model_config(path: str, **kw) -> ModelConfig:
    """The ModelConfig that ``load(path, **kw)`` builds, without reading the weights
    (kw: dtype, overrides)."""
    return (read_gguf_config if is_gguf(path) else read_config)(path, **kw)


def init_rngs(seed: int) -> nnx.Rngs:
    """Init RNGs on the 'rbg' key implementation: threefry's unrolled rounds, one copy per param,
    take XLA:CPU about a second each to compile; RngBitGenerator compiles in milliseconds."""
    return nnx.Rngs(params=jax.random.key(seed, impl="rbg"))


def init(model_cfg: ModelConfig, seed: int = 0, *, mesh: jax.sharding.Mesh | None = None,
         rules: sharding.Rules | None = None, strict: bool = False) -> Transformer:
    """Random init inside one jit (one compilation, not one per param shape). With a mesh every
    param is created directly in its sharding (rules default to TRAIN_RULES): none is ever whole
    on one device."""
    make = lambda: Transformer(model_cfg, rngs=init_rngs(seed))
    gdef, abstract = nnx.split(nnx.eval_shape(make))
    out = None
    if mesh is not None:
        out = sharding.param_shardings(abstract, mesh, sharding.TRAIN_RULES if rules is None else rules,
                                       strict=strict)
    return nnx.merge(gdef, jax.jit(lambda: nnx.state(make()), out_shardings=out)())


def overrides(section) -> dict:
    """The config.model fields applied on top of a checkpoint's own config (numerics only: they
    never change the weights)."""
    return dict(dtype=resolve_dtype(section.dtype), attention_impl=section.attention_impl,
                logprob_chunk=section.logprob_chunk)


def config_from_section(section, vocab_size: int | None = None) -> ModelConfig:
    """The trainer's ModelConfig of ``config.model``: the checkpoint's architecture when
    ``hf_path`` is set, else the section's fields, with ``vocab_size`` (a trained tokenizer's)
    when given; float32 params (the master weights) and the section's compute dtype and numerics."""
    if section.hf_path:
        return read_model_config(section.hf_path, dtype=MASTER_DTYPE, overrides=overrides(section))
    cfg = ModelConfig.from_config(section)
    return cfg if vocab_size is None else cfg.replace(vocab_size=vocab_size)


def build(section, model_cfg: ModelConfig, seed: int = 0, *, mesh: jax.sharding.Mesh | None = None,
          rules: sharding.Rules | None = None) -> Transformer:
    """The weights of ``model_cfg`` (from ``config_from_section``): loaded from ``hf_path`` when
    set, else randomly initialized; placed in their shardings with a mesh."""
    if not section.hf_path:
        return init(model_cfg, seed, mesh=mesh, rules=rules)
    model, loaded = load(section.hf_path, dtype=MASTER_DTYPE, mesh=mesh, rules=rules, overrides=overrides(section))
    if loaded != model_cfg:
        raise CheckpointError(f"{section.hf_path}: the checkpoint describes {loaded}, not {model_cfg}")
    return model


def lora_graphdef(model_cfg: ModelConfig, spec: LoraSpec):
    """The graph of the adapted model: ``nnx.merge`` it with ``lora.combine(base, adapters)``."""
    return nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=init_rngs(0), lora=spec)))


def init_adapters(model_cfg: ModelConfig, spec: LoraSpec, seed: int = 0, *, mesh: jax.sharding.Mesh | None = None,
                  rules: sharding.Rules | None = None) -> dict:
    """The adapters' initial values (A random, B zero; float32) as a pure dict, in one jit (the
    base weights it would build alongside are never computed: only the adapters are outputs)."""
    make = lambda: Transformer(model_cfg, rngs=init_rngs(seed), lora=spec)
    abstract = nnx.eval_shape(make)
    out = None
    if mesh is not None:
        shardings = sharding.param_shardings(abstract, mesh, sharding.TRAIN_RULES if rules is None else rules)
        out = nnx.to_pure_dict(nnx.state(shardings, nnx.LoRAParam))
    return jax.jit(lambda: nnx.to_pure_dict(nnx.state(make(), nnx.LoRAParam)), out_shardings=out)()
