"""Ragged paged attention: decode and prefill (queries appended at an offset) over a page pool.

Layout (see reference.py): pools k_pages, v_pages [Hkv, P, page_size, D]; page_indices [B, n];
per-sequence q_start / q_lens / kv_lens. Every kernel visits only the pages a query block can
see (ceil(min(kv_len, last query position + 1) / page_size) of them), never the whole table.

Which kernel runs where:
- decode on GPU (and in generic interpret mode on CPU): JAX's shipped
  ``pallas.ops.gpu.paged_attention`` (it applies no softmax scale, so q is pre-scaled);
- prefill on GPU / generic interpret: ``paged_attention_loop`` (ours; nothing shipped fits);
- decode and prefill on TPU: ``paged_attention_tpu`` (ours): the shipped TPU kernels could not
  be tested here (``tpu.ragged_paged_attention`` fails in TPU interpret mode and wants another
  pool layout; ``tpu.paged_attention`` disagrees with its reference there, see docs/kernels.md).

Both of ours lay q out per kv head as rows (token, q head of the group) with the group padded
to a power of two, so one kv page is read once for all G query heads of a block.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from rlax_tpu.kernels.flash_attention import NEG_INF, _dot_nt, compiler_params, online_softmax_step

MIN_ROWS = 16  # rows per program (block_q tokens x padded group): Triton's dot and bf16 sublanes


def _group_rows(q: jax.Array, hkv: int, block_q: int):
    """q [B, T, Hq, D] -> ([B, Hkv, Tp * Gp, D], Gp, block_q, Tp) with the group padded to a power
    of two Gp and T to a multiple of block_q, which is raised until a block has MIN_ROWS rows."""
    b, t, hq, d = q.shape
    g = hq // hkv
    gp = pl.next_power_of_2(g)
    block_q = max(min(block_q, pl.next_power_of_2(t)), -(-MIN_ROWS // gp))
    tp = -(-t // block_q) * block_q
    qg = q.reshape(b, t, hkv, g, d)
    qg = jnp.pad(qg, ((0, 0), (0, tp - t), (0, 0), (0, gp - g), (0, 0)))
    return qg.transpose(0, 2, 1, 3, 4).reshape(b, hkv, tp * gp, d), gp, block_q, tp


def _ungroup_rows(out: jax.Array, t: int, g: int, gp: int) -> jax.Array:
    b, hkv, rows, d = out.shape
    out = out.reshape(b, hkv, rows // gp, gp, d)[:, :, :t, :g]
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, hkv * g, d)


def _visible(q_start, q_len, kv_len, i, block_q: int, page_size: int):
    """How many pages query block i of a sequence can see (0 when it holds no live query)."""
    last_tok = jnp.minimum((i + 1) * block_q, q_len) - 1
    hi = jnp.minimum(kv_len, q_start + last_tok + 1)
    return jnp.where(last_tok >= i * block_q, lax.div(jnp.maximum(hi, 0) + page_size - 1, page_size), 0)


def _update(q, k, v, carry, *, q_pos, q_live, kv_base, kv_len, scale):
    """One online-softmax step over the page holding positions kv_base.. : q [rows, D], k, v [ps, D]."""
    acc, m, denom = carry
    ps = k.shape[0]
    kv_pos = kv_base + lax.broadcasted_iota(jnp.int32, (1, ps), 1)
    mask = q_live & (kv_pos < kv_len) & (kv_pos <= q_pos)  # [rows, ps]
    # Zero stale V rows: a reused page past kv_len may hold anything (0 * NaN leaks through p @ v).
    v = jnp.where(kv_base + lax.broadcasted_iota(jnp.int32, (ps, 1), 0) < kv_len, v, 0)
    s = jnp.where(mask, _dot_nt(q, k) * scale, NEG_INF)
    return online_softmax_step(acc, m, denom, s, mask, v)


def _finish(acc, denom, dtype):
    seen = denom > 0.0
    return jnp.where(seen, acc / jnp.where(seen, denom, 1.0), 0.0).astype(dtype)


# ---------------------------------------------------------------- GPU / generic: loop over pages
def _loop_kernel(meta_ref, q_ref, k_ref, v_ref, o_ref, *, gp, block_q, page_size, scale):
    # meta_ref [W]: q_start, q_len, kv_len, then the page table; k_ref, v_ref [P, ps, D] (one kv
    # head's pool: a pointer on GPU, pages are loaded one at a time); q_ref, o_ref [rows, D].
    i = pl.program_id(2)
    q_start, q_len, kv_len = meta_ref[0], meta_ref[1], meta_ref[2]
    q = q_ref[...]
    rows, d = q.shape
    tok = i * block_q + lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // gp
    kw = dict(q_pos=q_start + tok, q_live=tok < q_len, kv_len=kv_len, scale=scale)

    def body(j, carry):
        page = meta_ref[3 + j]
        return _update(q, k_ref[page], v_ref[page], carry, kv_base=j * page_size, **kw)

    init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows, 1), NEG_INF, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32))
    n = _visible(q_start, q_len, kv_len, i, block_q, page_size)
    acc, _, denom = lax.fori_loop(0, n, body, init)
    o_ref[...] = _finish(acc, denom, o_ref.dtype)


def paged_attention_loop(q, k_pages, v_pages, q_start, q_lens, kv_lens, page_indices, *,
                         scale: float, block_q: int = 64, interpret: bool = False) -> jax.Array:
    """Prefill/mixed paged attention (reference.paged_prefill_attention_reference's contract),
    grid (B, Hkv, query blocks), each program looping over only the pages it can see."""
    b, t, hq, d = q.shape
    hkv, _, ps, _ = k_pages.shape
    qr, gp, block_q, tp = _group_rows(q, hkv, block_q)
    i32 = jnp.int32
    meta = jnp.concatenate([q_start.astype(i32)[:, None], q_lens.astype(i32)[:, None],
                            kv_lens.astype(i32)[:, None], page_indices.astype(i32)], axis=1)
    width = pl.next_power_of_2(meta.shape[1])  # Triton blocks are powers of two
    meta = jnp.pad(meta, ((0, 0), (0, width - meta.shape[1])))
    rows = block_q * gp
    kernel = functools.partial(_loop_kernel, gp=gp, block_q=block_q, page_size=ps, scale=float(scale))
    pool = pl.BlockSpec((None,) + k_pages.shape[1:], lambda bi, h, i: (h, 0, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(b, hkv, tp // block_q),
        in_specs=[pl.BlockSpec((None, width), lambda bi, h, i: (bi, 0)),
                  pl.BlockSpec((None, None, rows, d), lambda bi, h, i: (bi, h, i, 0)), pool, pool],
        out_specs=pl.BlockSpec((None, None, rows, d), lambda bi, h, i: (bi, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct(qr.shape, q.dtype),
        interpret=interpret, name="rlax_paged_attention", compiler_params=compiler_params(interpret),
    )(meta, qr, k_pages, v_pages)
    return _ungroup_rows(out, t, hq // hkv, gp)


# ------------------------------------------------------------- TPU: grid over pages, scalar prefetch
def _tpu_kernel(pi_ref, qs_ref, ql_ref, kl_ref, q_ref, k_ref, v_ref, o_ref, acc_ref, m_ref, l_ref, *,
                gp, block_q, page_size, scale):
    # Grid (B, Hkv, query blocks, pages): the k/v BlockSpecs fetch page page_indices[b, j] (the
    # last visible one again past it: same block, so no new DMA); the page axis accumulates.
    del pi_ref
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q_start, q_len, kv_len = qs_ref[b], ql_ref[b], kl_ref[b]

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, NEG_INF)
        l_ref[...] = jnp.zeros_like(l_ref)

    @pl.when(j < _visible(q_start, q_len, kv_len, i, block_q, page_size))
    def _step():
        rows = acc_ref.shape[0]
        tok = i * block_q + lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // gp
        acc, m, denom = _update(q_ref[...], k_ref[...], v_ref[...], (acc_ref[...], m_ref[...], l_ref[...]),
                                q_pos=q_start + tok, q_live=tok < q_len, kv_base=j * page_size,
                                kv_len=kv_len, scale=scale)
        acc_ref[...], m_ref[...], l_ref[...] = acc, m, denom

    @pl.when(j == pl.num_programs(3) - 1)
    def _done():
        o_ref[...] = _finish(acc_ref[...], l_ref[...], o_ref.dtype)


def paged_attention_tpu(q, k_pages, v_pages, q_start, q_lens, kv_lens, page_indices, *,
                        scale: float, block_q: int = 64) -> jax.Array:
    """The same contract for TPU (Mosaic): page tables and lengths are scalar-prefetched into
    SMEM and each grid step DMAs one page (run on CPU under pltpu.force_tpu_interpret_mode())."""
    from jax.experimental.pallas import tpu as pltpu

    b, t, hq, d = q.shape
    hkv, _, ps, _ = k_pages.shape
    qr, gp, block_q, tp = _group_rows(q, hkv, block_q)
    rows, n = block_q * gp, page_indices.shape[1]

    def page_map(bi, h, i, j, pi, qs, ql, kl):
        last = jnp.maximum(_visible(qs[bi], ql[bi], kl[bi], i, block_q, ps) - 1, 0)
        return h, pi[bi, jnp.minimum(j, last)], 0, 0

    page = pl.BlockSpec((None, None, ps, d), page_map)
    rows_spec = pl.BlockSpec((None, None, rows, d), lambda bi, h, i, j, *_: (bi, h, i, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(b, hkv, tp // block_q, n),
        in_specs=[rows_spec, page, page], out_specs=rows_spec,
        scratch_shapes=[pltpu.VMEM((rows, d), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, 1), jnp.float32)])
    kernel = functools.partial(_tpu_kernel, gp=gp, block_q=block_q, page_size=ps, scale=float(scale))
    i32 = jnp.int32
    out = pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(qr.shape, q.dtype),
        name="rlax_paged_attention_tpu",
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    )(page_indices.astype(i32), q_start.astype(i32), q_lens.astype(i32), kv_lens.astype(i32),
      qr, k_pages, v_pages)
    return _ungroup_rows(out, t, hq // hkv, gp)


# --------------------------------------------------------------------- decode: JAX's GPU kernel
def _largest_divisor(n: int, cap: int) -> int:
    return max(x for x in range(1, min(n, cap) + 1) if n % x == 0)


def paged_decode_shipped_gpu(q, k_pages, v_pages, lengths, page_indices, *, scale: float,
                             interpret: bool = False) -> jax.Array:
    """JAX's ``pallas.ops.gpu.paged_attention`` (decode) with q pre-scaled (it applies no scale).
    k_splits / pages per compute block: the largest divisors of the table width within its
    defaults (16 and 8), which its asserts require."""
    from jax.experimental.pallas.ops.gpu import paged_attention as gpu_paged

    n = page_indices.shape[1]
    k_splits = _largest_divisor(n, 16)
    per_block = _largest_divisor(n // k_splits, 8)
    out = gpu_paged.paged_attention(
        (q * scale).astype(q.dtype), k_pages, v_pages, page_indices.astype(jnp.int32),
        lengths.astype(jnp.int32), k_splits=k_splits, pages_per_compute_block=per_block,
        interpret=interpret)
    # Its rows with no visible key come out as 0 / eps = 0 already; keep that exact for length 0.
    return jnp.where((lengths > 0)[:, None, None], out, 0).astype(q.dtype)


def decode_as_prefill(lengths: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q_start, q_lens, kv_lens) that make one decode query a one-token prefill."""
    lengths = lengths.astype(jnp.int32)
    return lengths - 1, (lengths > 0).astype(jnp.int32), lengths


def default_scale(head_dim: int, scale: float | None) -> float:
    return float(1.0 / math.sqrt(head_dim) if scale is None else scale)
