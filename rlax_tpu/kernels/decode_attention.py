"""Single-token decode attention over a contiguous KV cache in Pallas (ragged lengths, GQA).

Grid (B, Hkv / m): one program handles m kv heads and all G = Hq // Hkv query heads of each, so
each K/V block is read once per group. The cache is head-major, [B, Hkv, S, D] (the model's
layout): each kv head's [S, D] slab is contiguous and D is the full lane dimension, so blocks are
plain row ranges with no transpose, copy or lane packing. The program loops only over the
ceil(length / block_k) valid KV blocks. S need not be a multiple of block_k: the last block is
shifted back to end at S and its already-seen rows are masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from rlax_tpu.kernels.flash_attention import NEG_INF, _dot_nt, compiler_params, online_softmax_step

MIN_ROWS = 16  # q rows per program are padded to this (Triton's dot needs M >= 16)


def _decode_kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, *, kv_heads: int, head_dim: int, scale: float,
                   block_k: int, seq_len: int):
    # k_ref, v_ref: [m, S, D] (this program's kv heads); q_ref, o_ref: [m, rows, D].
    b = pl.program_id(0)
    length = jnp.clip(lengths_ref[b], 0, seq_len)
    num_blocks = lax.div(length + block_k - 1, block_k)  # only the valid blocks; 0 for length 0
    for c in range(kv_heads):  # static
        q = q_ref[c]  # [rows, D]: the group's query heads (zero padded)

        def body(i, carry, q=q, c=c):
            acc, m, denom = carry
            nominal = i * block_k
            start = jnp.minimum(nominal, seq_len - block_k)  # keep the last block inside the cache
            k = k_ref[c, pl.ds(start, block_k), :]
            v = v_ref[c, pl.ds(start, block_k), :]
            pos = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
            mask = (pos >= nominal) & (pos < length)
            # Zero stale V rows too: the cache past `length` may hold a previous occupant's inf/NaN,
            # and 0 * NaN would leak through p @ v.
            row_pos = start + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
            v = jnp.where((row_pos >= nominal) & (row_pos < length), v, 0)
            s = jnp.where(mask, _dot_nt(q, k) * scale, NEG_INF)
            return online_softmax_step(acc, m, denom, s, mask, v)

        rows = q.shape[0]
        init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows, 1), NEG_INF, jnp.float32),
                jnp.zeros((rows, 1), jnp.float32))
        acc, _, denom = lax.fori_loop(0, num_blocks, body, init)
        seen = denom > 0.0
        o_ref[c] = jnp.where(seen, acc / jnp.where(seen, denom, 1.0), 0.0).astype(o_ref.dtype)


def default_kv_heads_per_program(hkv: int, head_dim: int, interpret: bool) -> int:
    """1: with the head-major cache every block's last dim is the full head_dim, which both Mosaic
    (TPU) and Triton (GPU) accept, so no lane packing of several heads is needed."""
    del hkv, head_dim, interpret
    return 1


def _lengths_spec(batch: int, interpret: bool) -> pl.BlockSpec:
    if jax.default_backend() == "tpu" and not interpret:
        # Mosaic reads dynamic scalars from SMEM (not verified on a TPU in this repo).
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec((batch,), lambda b, h: (0,))


def decode_attention_pallas(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float | None = None,
    block_k: int = 128,
    kv_heads_per_program: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Same contract as reference.decode_attention_reference (validated by the dispatcher).

    kv_heads_per_program: kv heads (each with its whole q group) one program handles; a divisor
    of Hkv (default: see default_kv_heads_per_program()).
    """
    b, hq, d = q.shape
    _, hkv, s, _ = k_cache.shape
    g = hq // hkv
    m = kv_heads_per_program or default_kv_heads_per_program(hkv, d, interpret)
    if hkv % m:
        raise ValueError(f"kv_heads_per_program={m} must divide Hkv={hkv}")
    # A power of two <= S (the shifted last block covers any remainder); S < 16 only interprets.
    block_k = min(block_k, 1 << (s.bit_length() - 1))
    rows = max(MIN_ROWS, pl.next_power_of_2(g))
    scale = float(d**-0.5 if scale is None else scale)
    qg = q.reshape(b, hkv, g, d)
    if rows != g:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - g), (0, 0)))
    kernel = functools.partial(_decode_kernel, kv_heads=m, head_dim=d, scale=scale, block_k=block_k,
                               seq_len=s)
    out = pl.pallas_call(
        kernel,
        grid=(b, hkv // m),
        in_specs=[
            _lengths_spec(b, interpret),
            pl.BlockSpec((None, m, rows, d), lambda bi, h: (bi, h, 0, 0)),
            pl.BlockSpec((None, m, s, d), lambda bi, h: (bi, h, 0, 0)),
            pl.BlockSpec((None, m, s, d), lambda bi, h: (bi, h, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, m, rows, d), lambda bi, h: (bi, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, rows, d), q.dtype),
        interpret=interpret,
        name="rlax_decode_attention",
        compiler_params=compiler_params(interpret),
    )(lengths.astype(jnp.int32), qg, k_cache, v_cache)
    return out[:, :, :g].reshape(b, hq, d)
