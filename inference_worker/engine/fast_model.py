"""The engine's inference view of a Transformer: fused weights and a decode-friendly KV layout.

The model keeps one weight per HF tensor (its parameter tree is what the trainer, the param
server, load_hf and the sharding rules know). For generation that means many small matmuls per
step, and on CPU a step costs per op, not per FLOP. So the engine derives, once per weight update,
an ``InferenceWeights`` view:

- q, k, v projections fused into one ``[H, Hkv, G + 2, D]`` weight (per kv head: its G query
  heads, then k, then v), so one matmul makes q, k and v, and a split over kv heads (tensor
  parallelism) keeps each group's q, k and v together;
- gate and up fused into one ``[H, 2, I]`` weight (a split over I keeps gate and up together);
- the output projection stored as ``[H, V]`` (no transposed operand per step);
- everything already cast to the compute dtype (no per-step casts).

The same math as ``rlax_tpu.models.Transformer`` (tests check token parity with transformers).
On the jnp attention path (CPU) the K cache is stored transposed, ``[B, Hkv, D, S]``: the
per-step q.K dot then reduces over a non-minor dim and streams S contiguously, which XLA:CPU runs
about 2x faster than the ``[B, Hkv, S, D]`` form. The Pallas path keeps the kernels' layout.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlax_tpu import kernels
from rlax_tpu.kernels.dispatch import resolve_impl
from rlax_tpu.models.layers import apply_rope, rms_norm, rope_cos_sin

NEG_INF = -1e30


class LayerWeights(NamedTuple):
    input_norm: jax.Array  # [H]
    qkv: jax.Array  # [H, Hkv, G + 2, D]
    qkv_bias: jax.Array | None  # [Hkv, G + 2, D]
    q_norm: jax.Array | None  # [D]
    k_norm: jax.Array | None  # [D]
    o: jax.Array  # [Hq, D, H]
    post_norm: jax.Array  # [H]
    gate_up: jax.Array  # [H, 2, I]
    down: jax.Array  # [I, H]


class InferenceWeights(NamedTuple):
    embed: jax.Array  # [V, H]
    layers: tuple[LayerWeights, ...]
    final_norm: jax.Array  # [H]
    head: jax.Array  # [H, V]


class EngineCache(NamedTuple):
    """Per-layer K and V. v: [B, Hkv, S, D]; k: the same, or [B, Hkv, D, S] when transposed."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def max_len(self) -> int:
        return self.v[0].shape[2]


def k_transposed(cfg) -> bool:
    """Whether the engine stores K as [B, Hkv, D, S] (the jnp attention path) for this model."""
    return resolve_impl(cfg.attention_impl) == "reference"


def init_cache(cfg, batch: int, max_len: int) -> EngineCache:
    v_shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, max_len) if k_transposed(cfg) else v_shape
    zeros = lambda shape: tuple(jnp.zeros(shape, cfg.jnp_dtype) for _ in range(cfg.num_layers))
    return EngineCache(zeros(k_shape), zeros(v_shape))


# -------------------------------------------------------------------------------- weights
def build_weights(graphdef, params, cfg) -> InferenceWeights:
    """The fused view of nnx params (a pure function: jit it)."""
    model = nnx.merge(graphdef, params)
    dt = cfg.jnp_dtype
    h, hq, hkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = hq // hkv
    layers = []
    for blk in model.layers:
        a = blk.attn
        qkv = jnp.concatenate([a.q_proj[...].reshape(h, hkv, g, d), a.k_proj[...][:, :, None],
                               a.v_proj[...][:, :, None]], axis=2).astype(dt)
        bias = None
        if cfg.qkv_bias:
            bias = jnp.concatenate([a.q_bias[...].reshape(hkv, g, d), a.k_bias[...][:, None],
                                    a.v_bias[...][:, None]], axis=1).astype(dt)
        layers.append(LayerWeights(
            input_norm=blk.input_norm.scale[...], qkv=qkv, qkv_bias=bias,
            q_norm=a.q_norm.scale[...] if cfg.qk_norm else None,
            k_norm=a.k_norm.scale[...] if cfg.qk_norm else None,
            o=a.o_proj[...].astype(dt), post_norm=blk.post_norm.scale[...],
            gate_up=jnp.stack([blk.mlp.gate_proj[...], blk.mlp.up_proj[...]], axis=1).astype(dt),
            down=blk.mlp.down_proj[...].astype(dt)))
    return InferenceWeights(embed=model.embed[...].astype(dt), layers=tuple(layers),
                            final_norm=model.norm.scale[...], head=model.output_weight().T.astype(dt))


def weight_shardings(cfg, mesh: jax.sharding.Mesh | None):
    """Tensor parallelism for the view (kv heads, q heads, mlp, vocab on 'tensor' where they divide),
    matching sharding.INFERENCE_RULES; None without a mesh."""
    if mesh is None:
        return None
    t = mesh.shape.get("tensor", 1)

    def spec(*axes_and_sizes):
        return NamedSharding(mesh, PartitionSpec(*[
            "tensor" if (a and t > 1 and size % t == 0) else None for a, size in axes_and_sizes]))

    heads_ok = cfg.num_kv_heads % t == 0  # q heads split the same way (whole groups per device)
    hq, hkv, i, v = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size
    rep = spec()
    layer = LayerWeights(
        input_norm=rep, qkv=spec((0, 0), (heads_ok, hkv)),
        qkv_bias=spec((heads_ok, hkv)) if cfg.qkv_bias else None,
        q_norm=rep if cfg.qk_norm else None, k_norm=rep if cfg.qk_norm else None,
        o=spec((heads_ok, hq)), post_norm=rep, gate_up=spec((0, 0), (0, 0), (1, i)),
        down=spec((1, i)))
    return InferenceWeights(embed=spec((1, v)), layers=(layer,) * cfg.num_layers, final_norm=rep,
                            head=spec((0, 0), (1, v)))


# -------------------------------------------------------------------------------- pieces
def _qkv(cfg, w: LayerWeights, x: jax.Array):
    """x [..., H] -> q [..., Hkv, G, D], k, v [..., Hkv, D] (no RoPE yet)."""
    g = cfg.num_heads // cfg.num_kv_heads
    y = jnp.einsum("...h,hkjd->...kjd", x, w.qkv)
    if w.qkv_bias is not None:
        y = y + w.qkv_bias
    q, k, v = y[..., :g, :], y[..., g, :], y[..., g + 1, :]
    if cfg.qk_norm:
        q, k = rms_norm(q, w.q_norm, cfg.rms_norm_eps), rms_norm(k, w.k_norm, cfg.rms_norm_eps)
    return q, k, v


def _mlp(w: LayerWeights, x: jax.Array) -> jax.Array:
    gu = jnp.einsum("...h,hji->...ji", x, w.gate_up)
    return jnp.einsum("...i,ih->...h", jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :], w.down)


def _out(w: LayerWeights, attn: jax.Array) -> jax.Array:
    """attn [..., Hq, D] -> [..., H]."""
    return jnp.einsum("...nd,ndh->...h", attn, w.o)


def _logits(cfg, weights: InferenceWeights, x: jax.Array) -> jax.Array:
    x = rms_norm(x, weights.final_norm, cfg.rms_norm_eps)
    return jnp.einsum("...h,hv->...v", x, weights.head, preferred_element_type=jnp.float32)


def _attend(cfg, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array) -> jax.Array:
    """One query per sequence over a cache: q [B, Hkv, G, D] -> [B, Hq, D]."""
    b, hkv, g, d = q.shape
    scale = d**-0.5
    if not k_transposed(cfg):
        return kernels.decode_attention(q.reshape(b, hkv * g, d), k_cache, v_cache, lengths, scale=scale,
                                        impl=cfg.attention_impl)
    s = v_cache.shape[2]
    logits = jnp.einsum("bkgd,bkds->bkgs", q, k_cache, preferred_element_type=jnp.float32) * scale
    mask = (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
    probs = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1), 0.0)
    out = jnp.einsum("bkgs,bksd->bkgd", probs.astype(v_cache.dtype), v_cache,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, hkv * g, d).astype(q.dtype)


def _rope_rows(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE for one token per row: x [B, ..., D], cos/sin [B, D/2]."""
    flat = x.reshape(x.shape[0], 1, -1, x.shape[-1])
    return apply_rope(flat, cos[:, None], sin[:, None]).reshape(x.shape)


# -------------------------------------------------------------------------------- entry points
def prefill(cfg, weights: InferenceWeights, tokens: jax.Array, lengths: jax.Array):
    """Right-padded prompts [B, P] with lengths [B] -> (f32 logits [B, V] at each last prompt token,
    the prompt's K and V per layer in the engine's cache layout, with S = P)."""
    b, p = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
    cos, sin = rope_cos_sin(cfg, positions)
    x = jnp.take(weights.embed, tokens, axis=0)
    rows = jnp.arange(b)
    last = lengths - 1
    transposed = k_transposed(cfg)
    ks, vs = [], []
    for i, w in enumerate(weights.layers):
        q, k, v = _qkv(cfg, w, rms_norm(x, w.input_norm, cfg.rms_norm_eps))  # [B, P, Hkv, (G,) D]
        q = apply_rope(q.reshape(b, p, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k, cos, sin)
        kc, vc = k.transpose(0, 2, 3, 1) if transposed else k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        ks.append(kc)
        vs.append(vc)
        if i < cfg.num_layers - 1:
            attn = kernels.flash_attention(
                q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=True,
                scale=cfg.head_dim**-0.5, impl=cfg.attention_impl)
            x = x + _out(w, attn)
            x = x + _mlp(w, rms_norm(x, w.post_norm, cfg.rms_norm_eps))
        else:
            # Only the last prompt token's output is needed past the last layer's K/V: attend
            # from it alone (it sees its whole prompt) and skip the other tokens' MLP.
            q_last = q[rows, last].reshape(b, cfg.num_kv_heads, -1, cfg.head_dim)
            attn = _attend(cfg, q_last, kc, vc, lengths)
            x = x[rows, last] + _out(w, attn)
            x = x + _mlp(w, rms_norm(x, w.post_norm, cfg.rms_norm_eps))
    return _logits(cfg, weights, x), EngineCache(tuple(ks), tuple(vs))


def decode_step(cfg, weights: InferenceWeights, tokens: jax.Array, positions: jax.Array,
                cache: EngineCache):
    """One token per row: writes its K/V at ``positions`` and attends over positions + 1 entries.
    Returns (f32 logits [B, V], cache)."""
    b = tokens.shape[0]
    rows = jnp.arange(b)
    cos, sin = rope_cos_sin(cfg, positions)  # [B, D/2]
    lengths = positions + 1
    transposed = k_transposed(cfg)
    x = jnp.take(weights.embed, tokens, axis=0)  # [B, H]
    ks, vs = list(cache.k), list(cache.v)
    for i, w in enumerate(weights.layers):
        q, k, v = _qkv(cfg, w, rms_norm(x, w.input_norm, cfg.rms_norm_eps))  # [B, Hkv, G, D], [B, Hkv, D]
        q, k = _rope_rows(q, cos, sin), _rope_rows(k, cos, sin)
        if transposed:
            ks[i] = ks[i].at[rows, :, :, positions].set(k.astype(ks[i].dtype))
        else:
            ks[i] = ks[i].at[rows, :, positions].set(k.astype(ks[i].dtype))
        vs[i] = vs[i].at[rows, :, positions].set(v.astype(vs[i].dtype))
        x = x + _out(w, _attend(cfg, q, ks[i], vs[i], lengths))
        x = x + _mlp(w, rms_norm(x, w.post_norm, cfg.rms_norm_eps))
    return _logits(cfg, weights, x), EngineCache(tuple(ks), tuple(vs))
