"""LoRA adapters on the transformer's projections: spec, forward term, merge, PEFT export.

An adapter on a projection W (our head-split layout, input dims then output dims) is a pair of
``nnx.LoRAParam``: ``<proj>_lora_a`` [*in_dims, r] and ``<proj>_lora_b`` [r, *out_dims], with
the update (alpha / r) * A @ B. A starts random and B at zero, so an adapted model at step 0 is
the base model exactly. Training runs the factorized form (x W + s (x A) B: no full-size weight
gradient); inference runs on merged weights W0 + s A @ B, always merged from the pristine base.
Adapter dropout (PEFT's lora_dropout) drops the adapter branch's input, s * (dropout(x) A) B,
only when the forward is given a key: the training gradient pass; every other forward and the
merged weights have none.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlax_tpu.models.config import ModelConfig

# Our projection names by config.lora target, with the HF module each one is.
PROJECTIONS = {"q": ("attn", "q_proj", "self_attn"), "k": ("attn", "k_proj", "self_attn"),
               "v": ("attn", "v_proj", "self_attn"), "o": ("attn", "o_proj", "self_attn"),
               "gate": ("mlp", "gate_proj", "mlp"), "up": ("mlp", "up_proj", "mlp"),
               "down": ("mlp", "down_proj", "mlp")}
A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"
# A fixed number per projection: each one's dropout mask is its layer's key folded with it.
PROJECTION_INDEX = {v[1]: i for i, v in enumerate(PROJECTIONS.values())}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Rank, scale numerator, targeted projections and adapter-input dropout probability
    (config.lora); hashable, jit-static."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def projections(self) -> set[str]:
        return {PROJECTIONS[t][1] for t in self.targets}

    @classmethod
    def from_config(cls, section) -> LoraSpec | None:
        """The spec of config.lora, or None when the rank is 0 (off)."""
        from rlax_tpu.config.sections import lora as lora_section

        if not section.rank:
            return None
        return cls(int(section.rank), float(section.alpha), lora_section.target_names(section),
                   float(section.dropout))


def in_out_dims(cfg: ModelConfig, proj: str) -> tuple[tuple, tuple, tuple, tuple]:
    """(input dims, their logical axes, output dims, their axes) of a projection's weight."""
    h, i, hq, hkv, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return {"q_proj": ((h,), ("embed",), (hq, d), ("q_heads", "head_dim")),
            "k_proj": ((h,), ("embed",), (hkv, d), ("kv_heads", "head_dim")),
            "v_proj": ((h,), ("embed",), (hkv, d), ("kv_heads", "head_dim")),
            "o_proj": ((hq, d), ("q_heads", "head_dim"), (h,), ("embed",)),
            "gate_proj": ((h,), ("embed",), (i,), ("mlp",)),
            "up_proj": ((h,), ("embed",), (i,), ("mlp",)),
            "down_proj": ((i,), ("mlp",), (h,), ("embed",))}[proj]


def add_adapters(module: nnx.Module, cfg: ModelConfig, spec: LoraSpec | None, rngs: nnx.Rngs,
                 projs: tuple[str, ...]) -> None:
    """Gives ``module`` an (A, B) pair for each of ``projs`` that ``spec`` targets. A is PEFT's
    default (Kaiming-uniform, bound 1/sqrt(fan_in)), B zero; both float32 (trainable masters)."""
    if spec is None:
        return
    for proj in projs:
        if proj not in spec.projections():
            continue
        din, ain, dout, aout = in_out_dims(cfg, proj)
        bound = 1.0 / math.sqrt(math.prod(din))
        a = jax.random.uniform(rngs.params(), (*din, spec.rank), jnp.float32, -bound, bound)
        setattr(module, proj + A_SUFFIX, nnx.LoRAParam(a, out_sharding=(*ain, None), eager_sharding=False))
        b = jnp.zeros((spec.rank, *dout), jnp.float32)
        setattr(module, proj + B_SUFFIX, nnx.LoRAParam(b, out_sharding=(None, *aout), eager_sharding=False))


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout (torch's and PEFT's): each element zeroed with probability ``rate``, the
    kept ones scaled by 1 / (1 - rate), so the expectation is x."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


def adapter_term(module: nnx.Module, proj: str, x: jax.Array, n_in: int, scale: float, rate: float,
                 key: jax.Array | None) -> jax.Array | None:
    """s * (x A) B for the last ``n_in`` dims of x, or None when ``proj`` has no adapter. With a
    ``key`` (the layer's dropout key) and ``rate`` > 0, x is dropped out first (its own mask per
    projection, as PEFT's per-module dropout); the base branch x W always sees x whole."""
    a = getattr(module, proj + A_SUFFIX, None)
    if a is None:
        return None
    b = getattr(module, proj + B_SUFFIX)
    dt = x.dtype
    if key is not None and rate > 0:
        x = dropout(x, rate, jax.random.fold_in(key, PROJECTION_INDEX[proj]))
    xa = jnp.tensordot(x, a[...].astype(dt), axes=n_in)
    return scale * jnp.tensordot(xa, b[...].astype(dt), axes=1)


# -- pure-dict helpers ---------------------------------------------------------------------
def _walk(tree: dict, prefix: tuple = ()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _walk(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def _get(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def combine(base: dict, adapters: dict) -> dict:
    """One pure dict of the adapted model: the base's leaves with the adapters' beside them."""
    out: dict = {}
    for path, v in _walk(base):
        _set(out, path, v)
    for path, v in _walk(adapters):
        _set(out, path, v)
    return out


def pairs(adapters: dict) -> list[tuple[tuple, Any, Any]]:
    """(path of the adapted weight, A, B) for every adapter pair of a pure dict."""
    out = []
    for path, a in _walk(adapters):
        if str(path[-1]).endswith(A_SUFFIX):
            stem = str(path[-1])[:-len(A_SUFFIX)]
            out.append(((*path[:-1], stem), a, _get(adapters, (*path[:-1], stem + B_SUFFIX))))
    return out


def merge(base: dict, adapters: dict, scale: float) -> dict:
    """W0 + scale * A @ B for every adapted weight (f32 arithmetic, W0's dtype out), the other
    leaves as they are. Pure: call it on the pristine base every time (never on a merged tree),
    so merges are exact whatever came before."""
    out: dict = {}
    for path, v in _walk(base):
        _set(out, path, v)
    for path, a, b in pairs(adapters):
        w0 = _get(base, path)
        delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
        _set(out, path, (w0.astype(jnp.float32) + scale * delta).astype(w0.dtype))
    return out


def content_hash(tree: dict) -> str:
    """sha256 over every leaf's name, shape, dtype and C-order bytes, as the holder has them: a
    base is named by what it is, so a worker can tell whether it holds the one an adapter needs."""
    import hashlib

    h = hashlib.sha256()
    for path, v in sorted(_walk(tree), key=lambda kv: "/".join(map(str, kv[0]))):
        arr = np.ascontiguousarray(np.asarray(v))
        h.update(("/".join(map(str, path)) + f"|{arr.shape}|{arr.dtype}|").encode())
        h.update(arr.tobytes())
    return h.hexdigest()


# -- PEFT export -------------------------------------------------------------------------------
def peft_tensors(adapters: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The adapters under PEFT's key names and layouts: lora_A.weight [r, in], lora_B.weight
    [out, r] (torch's [out, in] weight convention; in/out flattened as HF's projections are)."""
    out = {}
    for path, a, b in pairs(adapters):
        layer, group, proj = path[1], path[2], path[3]
        hf_group = "self_attn" if group == "attn" else "mlp"
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        r = a.shape[-1]
        key = f"base_model.model.model.layers.{layer}.{hf_group}.{proj}"
        out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
        out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
    return out


def save_peft(adapters: dict, spec: LoraSpec, cfg: ModelConfig, out: str, base_model: str = "") -> list[str]:
    """Writes ``out``/adapter_config.json and adapter_model.safetensors (PEFT's format: ``peft``'s
    ``PeftModel.from_pretrained(hf_model, out)`` loads it); returns the file names."""
    from safetensors.numpy import save_file

    os.makedirs(out, exist_ok=True)
    save_file(peft_tensors(adapters, cfg), os.path.join(out, "adapter_model.safetensors"))
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "target_modules": sorted(spec.projections()), "init_lora_weights": True,
            "base_model_name_or_path": base_model or None, "inference_mode": True,
            "modules_to_save": None}
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    return ["adapter_config.json", "adapter_model.safetensors"]
