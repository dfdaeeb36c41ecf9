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
Attention reads a paged KV cache (``PagedCache``: a page pool per layer, rows' page tables) through
two small functions (``_attend_decode`` / ``_attend_prefill``) that call rlax_tpu.kernels' paged
attention (Pallas on TPU/GPU, its jnp reference on CPU).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlax_tpu import kernels
from rlax_tpu.models.layers import inv_rms, rms_norm, rope_cos_sin
from rlax_tpu.sharding import BATCH_AXES


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


class PagedCache(NamedTuple):
    """Per-layer K and V page pools (RoPE applied), each [Hkv, num_pages, page_size, D] in the
    compute dtype (the layout of rlax_tpu.kernels' paged attention).

    One buffer per layer, so a step updates each layer's pool in place (slicing a stacked
    [L, ...] array makes XLA copy every layer's pool on every step).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def page_size(self) -> int:
        return self.v[0].shape[2]


def init_cache(cfg, num_pages: int, page_size: int) -> PagedCache:
    shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, cfg.jnp_dtype) for _ in range(cfg.num_layers))
    return PagedCache(zeros(), zeros())


def cache_shardings(cfg, cache: PagedCache, mesh: jax.sharding.Mesh | None):
    """The pools' layout on a mesh: kv heads over 'tensor' (where they divide) and the page axis
    over the batch axes, one block of pages per shard of the slots (``kernels`` ``split_pages``:
    a slot's pages come from its shard's block, so its K/V are written and read where its slot
    lives and no pages or new K/V cross devices). None without a mesh."""
    if mesh is None:
        return None
    slots = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1) or None
    t = mesh.shape.get("tensor", 1)
    heads = "tensor" if t > 1 and cfg.num_kv_heads % t == 0 else None
    pool = NamedSharding(mesh, PartitionSpec(heads, slots, None, None))
    return jax.tree.map(lambda _: pool, cache)


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


# The one place the engine calls attention: rlax_tpu.kernels' paged kernels (Pallas on TPU/GPU,
# the jnp reference on CPU), each under shard_map when the step is traced under the engine's mesh.
def _attend_decode(cfg, q: jax.Array, cache: PagedCache, layer: int, lengths: jax.Array,
                   page_table: jax.Array) -> jax.Array:
    """One (pre-scaled) query per sequence over its first ``lengths`` positions:
    q [B, Hkv, G, D] -> [B, Hq, D]."""
    b, hkv, g, d = q.shape
    return kernels.paged_decode_attention(q.reshape(b, hkv * g, d), cache.k[layer], cache.v[layer], lengths,
                                          page_table, scale=1.0, impl=cfg.attention_impl, split_pages=True)


def _attend_prefill(cfg, q: jax.Array, cache: PagedCache, layer: int, q_start: jax.Array, q_lens: jax.Array,
                    page_table: jax.Array) -> jax.Array:
    """A chunk of (pre-scaled) queries [B, T, Hkv, G, D] at positions q_start + t against the pages
    (the chunk's K/V already written) -> [B, T, Hq, D]."""
    b, t, hkv, g, d = q.shape
    return kernels.paged_prefill_attention(q.reshape(b, t, hkv * g, d), cache.k[layer], cache.v[layer], q_start,
                                           q_lens, q_start + q_lens, page_table, scale=1.0, impl=cfg.attention_impl,
                                           split_pages=True)


def _write(cache: PagedCache, layer: int, pages: jax.Array, offsets: jax.Array, k: jax.Array, v: jax.Array):
    """Scatters new K/V [..., Hkv, D] at pool (pages, offsets) [...] of one layer, on the shard
    that holds those pages and heads (kernels.write_pages)."""
    kp, vp = kernels.write_pages(cache.k[layer], cache.v[layer], pages, offsets, k, v)
    return cache._replace(k=cache.k[:layer] + (kp,) + cache.k[layer + 1:],
                          v=cache.v[:layer] + (vp,) + cache.v[layer + 1:])


def _slots_of(page_table: jax.Array, positions: jax.Array, page_size: int, valid: jax.Array | None = None):
    """Pool (page, offset) of each position [B, ...] through its row's page table; invalid
    positions go to the null page 0."""
    idx = (positions // page_size).reshape(positions.shape[0], -1)
    pages = jnp.take_along_axis(page_table, jnp.minimum(idx, page_table.shape[1] - 1), axis=1)
    pages = pages.reshape(positions.shape)
    if valid is not None:
        pages = jnp.where(valid, pages, 0)
    return pages, positions % page_size


def _at_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b]] for x [B, T, ...]: a per-row gather (batched over B, so a split of the rows
    over devices stays split; x[arange(B), index] would be gathered onto every device)."""
    idx = index.reshape(-1, *(1,) * (x.ndim - 1))
    return jnp.take_along_axis(x, idx, axis=1)[:, 0]


# -------------------------------------------------------------------------------- entry points
def prefill(cfg, weights: InferenceWeights, tokens: jax.Array, q_start: jax.Array, q_lens: jax.Array,
            page_table: jax.Array, cache: PagedCache):
    """Right-padded chunks of new tokens [B, T] at positions q_start + t (t < q_lens, q_lens >= 1),
    written into the rows' pages and attending to everything before them in the sequence (a
    fresh prompt has q_start 0; a continued sequence starts at its cached length).
    Returns (f32 logits [B, V] at each row's last new token, cache)."""
    b, t = tokens.shape
    positions = q_start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    valid = jnp.arange(t)[None, :] < q_lens[:, None]
    pages, offsets = _slots_of(page_table, positions, cache.page_size, valid)
    cos, sin = _rope_tables(cfg, positions)
    x = jnp.take(weights.embed, tokens, axis=0)
    last = q_lens - 1
    for i, w in enumerate(weights.layers):
        q, k, v = _qkv(cfg, w, x, cos, sin)  # [B, T, Hkv, G, D], [B, T, Hkv, D]
        cache = _write(cache, i, pages, offsets, k, v)
        if i < cfg.num_layers - 1:
            x = x + _out(w, _attend_prefill(cfg, q, cache, i, q_start, q_lens, page_table))
            x = x + _mlp(cfg, w, x)
        else:
            # Only the last new token's output is needed past the last layer's K/V: attend from it
            # alone (it sees the whole sequence) and skip the other tokens' MLP.
            attn = _attend_decode(cfg, _at_rows(q, last), cache, i, q_start + q_lens, page_table)
            x = _at_rows(x, last) + _out(w, attn)
            x = x + _mlp(cfg, w, x)
    return _logits(cfg, weights, x), cache


def decode_step(cfg, weights: InferenceWeights, tokens: jax.Array, positions: jax.Array, cache: PagedCache,
                page_table: jax.Array):
    """One token per row: writes its K/V at ``positions`` (through the row's page table) and
    attends over positions + 1 entries. Returns (f32 logits [B, V], cache)."""
    cos, sin = _rope_tables(cfg, positions)  # [B, D]
    lengths = positions + 1
    pages, offsets = _slots_of(page_table, positions, cache.page_size)
    x = jnp.take(weights.embed, tokens, axis=0)  # [B, H]
    for i, w in enumerate(weights.layers):
        q, k, v = _qkv(cfg, w, x, cos, sin)  # [B, Hkv, G, D], [B, Hkv, D]
        cache = _write(cache, i, pages, offsets, k, v)
        x = x + _out(w, _attend_decode(cfg, q, cache, i, lengths, page_table))
        x = x + _mlp(cfg, w, x)
    return _logits(cfg, weights, x), cache
