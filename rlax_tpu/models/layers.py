"""Building blocks: RMSNorm, RoPE (with Llama-3 scaling), grouped-query attention, SwiGLU MLP.

Every parameter is an ``nnx.Param`` whose ``out_sharding`` metadata holds *logical* axis names
(vocab, embed, q_heads, kv_heads, head_dim, mlp, norm); ``rlax_tpu.sharding`` maps them to mesh
axes with a rules table. ``eager_sharding=False`` because logical names are not mesh axes.
Weights keep the HF math but a head-split layout ([embed, heads, head_dim]) so heads shard.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlax_tpu import kernels
from rlax_tpu.models import lora as lora_lib
from rlax_tpu.models.config import ModelConfig

INIT_STD = 0.02  # transformers' default initializer_range


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype,
          init: str = "normal") -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    if init == "normal":
        value = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


def inv_rms(x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm's per-row factor 1 / sqrt(mean(x^2) + eps), [..., 1] in f32."""
    xf = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in f32 (as HF does), returned in the input dtype."""
    return (scale.astype(jnp.float32) * (x.astype(jnp.float32) * inv_rms(x, eps))).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, axis: str = "norm"):
        self.scale = param(None, (dim,), (axis,), dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


# -- rotary embeddings ---------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (f32), with Llama-3 scaling when configured."""
    d = cfg.head_dim
    inv = (1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))).astype(np.float32)
    rs = cfg.rope_scaling_dict
    if rs is None:
        return inv
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape positions.shape + [head_dim // 2], f32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF 'rotate_half' RoPE. x: [B, T, H, D]; cos/sin: [B, T, D/2]."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x.dtype)


# -- attention and MLP -----------------------------------------------------------------------
class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: lora_lib.LoraSpec | None = None):
        h, hq, hkv, d, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
        self.cfg = cfg
        self.q_proj = param(rngs, (h, hq, d), ("embed", "q_heads", "head_dim"), pd)
        self.k_proj = param(rngs, (h, hkv, d), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = param(rngs, (h, hkv, d), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = param(rngs, (hq, d, h), ("q_heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:
            self.q_bias = param(rngs, (hq, d), ("q_heads", "head_dim"), pd, init="zeros")
            self.k_bias = param(rngs, (hkv, d), ("kv_heads", "head_dim"), pd, init="zeros")
            self.v_bias = param(rngs, (hkv, d), ("kv_heads", "head_dim"), pd, init="zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, pd, axis="head_dim")
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, pd, axis="head_dim")
        self.lora_scale = lora.scale if lora is not None else 0.0
        self.lora_dropout = lora.dropout if lora is not None else 0.0
        lora_lib.add_adapters(self, cfg, lora, rngs, ("q_proj", "k_proj", "v_proj", "o_proj"))

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array, dropout_key: jax.Array | None = None):
        """x [B, T, H] -> q [B, T, Hq, D], k, v [B, T, Hkv, D] (RoPE and q/k norm applied).
        ``dropout_key``: the layer's adapter-dropout key (training's gradient pass only)."""
        dt = x.dtype

        def proj(name, bias):
            y = jnp.einsum("bth,hnd->btnd", x, getattr(self, name)[...].astype(dt))
            extra = lora_lib.adapter_term(self, name, x, 1, self.lora_scale, self.lora_dropout, dropout_key)
            if extra is not None:
                y = y + extra
            if self.cfg.qkv_bias:
                y = y + getattr(self, bias)[...].astype(dt)
            return y

        q, k, v = proj("q_proj", "q_bias"), proj("k_proj", "k_bias"), proj("v_proj", "v_bias")
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, attn: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        y = jnp.einsum("btnd,ndh->bth", attn, self.o_proj[...].astype(attn.dtype))
        extra = lora_lib.adapter_term(self, "o_proj", attn, 2, self.lora_scale, self.lora_dropout, dropout_key)
        return y if extra is None else y + extra

    def __call__(self, x, cos, sin, segment_ids, dropout_key=None):
        q, k, v = self.qkv(x, cos, sin, dropout_key)
        attn = kernels.flash_attention(
            q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=True,
            scale=self.cfg.head_dim**-0.5, impl=self.cfg.attention_impl)
        return self.out(attn, dropout_key)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: lora_lib.LoraSpec | None = None):
        h, i, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        self.gate_proj = param(rngs, (h, i), ("embed", "mlp"), pd)
        self.up_proj = param(rngs, (h, i), ("embed", "mlp"), pd)
        self.down_proj = param(rngs, (i, h), ("mlp", "embed"), pd)
        self.lora_scale = lora.scale if lora is not None else 0.0
        self.lora_dropout = lora.dropout if lora is not None else 0.0
        lora_lib.add_adapters(self, cfg, lora, rngs, ("gate_proj", "up_proj", "down_proj"))

    def _proj(self, name: str, x: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        y = jnp.einsum("...h,hi->...i", x, getattr(self, name)[...].astype(x.dtype))
        extra = lora_lib.adapter_term(self, name, x, 1, self.lora_scale, self.lora_dropout, dropout_key)
        return y if extra is None else y + extra

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        gate, up = self._proj("gate_proj", x, dropout_key), self._proj("up_proj", x, dropout_key)
        return self._proj("down_proj", jax.nn.silu(gate) * up, dropout_key)


class Block(nnx.Module):
    """Pre-norm decoder layer."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: lora_lib.LoraSpec | None = None):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
        self.attn = Attention(cfg, rngs, lora)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
        self.mlp = MLP(cfg, rngs, lora)

    def __call__(self, x, cos, sin, segment_ids, dropout_key=None):
        x = x + self.attn(self.input_norm(x), cos, sin, segment_ids, dropout_key)
        return x + self.mlp(self.post_norm(x), dropout_key)
