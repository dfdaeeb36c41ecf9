"""The engine's inference view of a Transformer: fused weights and a decode-friendly KV layout.

The model keeps one weight per HF tensor (its parameter tree is what the trainer, the param
server, load_hf and the sharding rules know). For generation that means many small matmuls per
step, and on CPU a step costs per op, not per FLOP. So the engine derives, once per weight update,
an ``InferenceWeights`` view:

- q, k, v projections fused into one ``[H, Hkv, G + 2, D]`` weight (per kv head: its G query
  heads, then k, then v), so one matmul makes q, k and v, and a split over kv heads (tensor
  parallelism) keeps each group's q, k and v together;
- gate and up fused into one ``[H, 2, I]`` weight (a split over I keeps gate and up together);
- the attention output projection stored as ``[Hq * D, H]`` and the LM head as ``[H, V]`` (no
  layout copy or transposed operand per step);
- RMSNorm scales and the softmax scale folded in (see ``build_weights``);
- everything already cast to the compute dtype (no per-step casts).

The same math as ``rlax_tpu.models.Transformer`` (tests check token parity with transformers).
Attention goes through ``rlax_tpu.kernels`` only (Pallas on TPU/GPU, the jnp reference on CPU),
on a ``[B, Hkv, S, D]`` cache.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlax_tpu import kernels
from rlax_tpu.models.layers import inv_rms, rms_norm, rope_cos_sin


class LayerWeights(NamedTuple):
    qkv: jax.Array  # [H, Hkv, G + 2, D]: per kv head its G q heads, then k, then v
    qkv_bias: jax.Array | None  # [Hkv, G + 2, D]
    q_norm: jax.Array | None  # [D]
    k_norm: jax.Array | None  # [D]
    o: jax.Array  # [Hq * D, H]
    gate_up: jax.Array  # [H, 2, I]
    down: jax.Array  # [I, H]


class InferenceWeights(NamedTuple):
    embed: jax.Array  # [V, H]
    layers: tuple[LayerWeights, ...]
    head: jax.Array  # [H, V]


class EngineCache(NamedTuple):
    """Per-layer K and V (RoPE applied), each [B, Hkv, S, D] in the compute dtype.

    One buffer per layer, so a decode step updates and reads each layer's cache in place (slicing
    a stacked [L, ...] array makes XLA copy every layer's slab on every step). Head-major, so each
    (sequence, kv head) slab [S, D] is contiguous: the kernels' layout.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def max_len(self) -> int:
        return self.v[0].shape[2]


def init_cache(cfg, batch: int, max_len: int) -> EngineCache:
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, cfg.jnp_dtype) for _ in range(cfg.num_layers))
    return EngineCache(zeros(), zeros())


# -------------------------------------------------------------------------------- weights
def _rotate_half(x: jax.Array) -> jax.Array:
    """HF's rotate_half on the last axis: [x1, x2] -> [-x2, x1]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def build_weights(graphdef, params, cfg) -> InferenceWeights:
    """The fused view of nnx params (a pure function: jit it).

    Folded in, once per weight update, so a decode step does not redo them: each RMSNorm's scale
    into the rows of the weight that consumes the normed activations (the step keeps only the
    per-row 1/rms factor, applied to the matmul's input rows); the softmax scale 1/sqrt(D) into the q
    columns (or the q norm's scale). (Folding RoPE's rotate_half in as extra q and k columns was
    measured: the larger matmul costs more than the elementwise rotation it saves.)"""
    model = nnx.merge(graphdef, params)
    dt = cfg.jnp_dtype
    h, hq, hkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = hq // hkv
    scale = d**-0.5
    f32 = lambda x: x.astype(jnp.float32)
    layers = []
    for blk in model.layers:
        a = blk.attn
        q_scale = 1.0 if cfg.qk_norm else scale  # after a q norm the scale goes into its weight
        q = f32(a.q_proj[...]).reshape(h, hkv, g, d) * q_scale
        k, v = f32(a.k_proj[...])[:, :, None], f32(a.v_proj[...])[:, :, None]
        qkv = jnp.concatenate([q, k, v], axis=2) * f32(blk.input_norm.scale[...])[:, None, None, None]
        bias = None
        if cfg.qkv_bias:
            bias = jnp.concatenate([f32(a.q_bias[...]).reshape(hkv, g, d) * q_scale,
                                    f32(a.k_bias[...])[:, None], f32(a.v_bias[...])[:, None]], axis=1)
        layers.append(LayerWeights(
            qkv=qkv.astype(dt), qkv_bias=bias,
            q_norm=f32(a.q_norm.scale[...]) * scale if cfg.qk_norm else None,
            k_norm=f32(a.k_norm.scale[...]) if cfg.qk_norm else None,
            o=a.o_proj[...].reshape(hq * d, h).astype(dt),
            gate_up=_gate_up(blk, dt),
            down=blk.mlp.down_proj[...].astype(dt)))
    head = f32(model.output_weight().T) * f32(model.norm.scale[...])[:, None]
    return InferenceWeights(embed=model.embed[...].astype(dt), layers=tuple(layers), head=head.astype(dt))


def _gate_up(blk, dt):
    """The MLP's gate and up weights as one [H, 2, I] weight (one matmul), with the
    post-attention norm's scale folded in."""
    scale = blk.post_norm.scale[...].astype(jnp.float32)[:, None]
    gate, up = (m[...].astype(jnp.float32) * scale for m in (blk.mlp.gate_proj, blk.mlp.up_proj))
    return jnp.stack([gate, up], axis=1).astype(dt)


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
        qkv=spec((0, 0), (heads_ok, hkv)), qkv_bias=spec((heads_ok, hkv)) if cfg.qkv_bias else None,
        q_norm=rep if cfg.qk_norm else None, k_norm=rep if cfg.qk_norm else None,
        o=spec((heads_ok, hq)), down=spec((1, i)),
        gate_up=spec((0, 0), (0, 0), (1, i)))
    return InferenceWeights(embed=spec((1, v)), layers=(layer,) * cfg.num_layers, head=spec((0, 0), (1, v)))


# -------------------------------------------------------------------------------- pieces
def _rope_tables(cfg, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin over the full head dim, [..., D] f32 (HF's duplicated halves)."""
    cos, sin = rope_cos_sin(cfg, positions)
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def _normed(cfg, x: jax.Array) -> jax.Array:
    """RMSNorm without its scale (folded into the consuming weight). Scaling the rows before the
    matmul lets XLA:CPU fuse the multiply into the matmul's input, one kernel fewer per norm than
    scaling the product."""
    return x * inv_rms(x, cfg.rms_norm_eps)


def _qkv(cfg, w: LayerWeights, x: jax.Array, cos: jax.Array, sin: jax.Array):
    """Pre-norm x [..., H] -> RoPE'd q [..., Hkv, G, D] (already times 1/sqrt(D)), RoPE'd k and v
    [..., Hkv, D], in the compute dtype. cos/sin: [..., D]."""
    g = cfg.num_heads // cfg.num_kv_heads
    y = jnp.einsum("...h,hkjd->...kjd", _normed(cfg, x), w.qkv, preferred_element_type=jnp.float32)
    if w.qkv_bias is not None:
        y = y + w.qkv_bias
    qk, v = y[..., : g + 1, :], y[..., g + 1, :]
    if cfg.qk_norm:
        qk = jnp.concatenate([rms_norm(qk[..., :g, :], w.q_norm, cfg.rms_norm_eps),
                              rms_norm(qk[..., g:, :], w.k_norm, cfg.rms_norm_eps)], axis=-2)
    qk = qk * cos[..., None, None, :] + _rotate_half(qk) * sin[..., None, None, :]
    dt = cfg.jnp_dtype
    return qk[..., :g, :].astype(dt), qk[..., g, :].astype(dt), v.astype(dt)


def _mlp(cfg, w: LayerWeights, x: jax.Array) -> jax.Array:
    """Pre-norm x -> the MLP's output (the post-attention norm is folded into gate_up)."""
    x = _normed(cfg, x)
    gu = jnp.einsum("...h,hji->...ji", x, w.gate_up, preferred_element_type=jnp.float32)
    gate, up = gu[..., 0, :], gu[..., 1, :]
    act = (jax.nn.silu(gate) * up).astype(w.down.dtype)
    return jnp.einsum("...i,ih->...h", act, w.down)


def _out(w: LayerWeights, attn: jax.Array) -> jax.Array:
    """attn [..., Hq, D] -> [..., H]."""
    return jnp.einsum("...i,ih->...h", attn.reshape(*attn.shape[:-2], -1), w.o)


def _logits(cfg, weights: InferenceWeights, x: jax.Array) -> jax.Array:
    return jnp.einsum("...h,hv->...v", _normed(cfg, x), weights.head, preferred_element_type=jnp.float32)


def _attend(cfg, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array) -> jax.Array:
    """One (pre-scaled) query per sequence over its first ``lengths`` cache entries:
    q [B, Hkv, G, D] -> [B, Hq, D]."""
    b, hkv, g, d = q.shape
    return kernels.decode_attention(q.reshape(b, hkv * g, d), k_cache, v_cache, lengths, scale=1.0,
                                    impl=cfg.attention_impl)


# -------------------------------------------------------------------------------- entry points
def prefill(cfg, weights: InferenceWeights, tokens: jax.Array, lengths: jax.Array):
    """Right-padded prompts [B, P] with lengths [B] -> (f32 logits [B, V] at each last prompt token,
    the prompt's K and V per layer in the engine's cache layout, with S = P)."""
    b, p = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
    cos, sin = _rope_tables(cfg, positions)
    x = jnp.take(weights.embed, tokens, axis=0)
    rows = jnp.arange(b)
    last = lengths - 1
    ks, vs = [], []
    for i, w in enumerate(weights.layers):
        q, k, v = _qkv(cfg, w, x, cos, sin)  # [B, P, Hkv, G, D], [B, P, Hkv, D]
        kc, vc = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        ks.append(kc)
        vs.append(vc)
        if i < cfg.num_layers - 1:
            attn = kernels.flash_attention(
                q.reshape(b, p, cfg.num_heads, cfg.head_dim), k, v, q_segment_ids=segment_ids,
                kv_segment_ids=segment_ids, causal=True, scale=1.0, impl=cfg.attention_impl)
            x = x + _out(w, attn)
            x = x + _mlp(cfg, w, x)
        else:
            # Only the last prompt token's output is needed past the last layer's K/V: attend
            # from it alone (it sees its whole prompt) and skip the other tokens' MLP.
            attn = _attend(cfg, q[rows, last], kc, vc, lengths)
            x = x[rows, last] + _out(w, attn)
            x = x + _mlp(cfg, w, x)
    return _logits(cfg, weights, x), EngineCache(tuple(ks), tuple(vs))


def decode_step(cfg, weights: InferenceWeights, tokens: jax.Array, positions: jax.Array,
                cache: EngineCache):
    """One token per row: writes its K/V at ``positions`` and attends over positions + 1 entries.
    Returns (f32 logits [B, V], cache)."""
    b = tokens.shape[0]
    rows = jnp.arange(b)
    cos, sin = _rope_tables(cfg, positions)  # [B, D]
    lengths = positions + 1
    x = jnp.take(weights.embed, tokens, axis=0)  # [B, H]
    ks, vs = list(cache.k), list(cache.v)
    for i, w in enumerate(weights.layers):
        q, k, v = _qkv(cfg, w, x, cos, sin)  # [B, Hkv, G, D], [B, Hkv, D]
        # c[rows, :, positions] is [B, Hkv, D] (advanced indices first, then the slice).
        ks[i] = ks[i].at[rows, :, positions].set(k.astype(ks[i].dtype))
        vs[i] = vs[i].at[rows, :, positions].set(v.astype(vs[i].dtype))
        x = x + _out(w, _attend(cfg, q, ks[i], vs[i], lengths))
        x = x + _mlp(cfg, w, x)
    return _logits(cfg, weights, x), EngineCache(tuple(ks), tuple(vs))
