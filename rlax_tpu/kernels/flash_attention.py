"""Blocked flash attention in Pallas (prefill / training): forward, and dq + dk/dv backward kernels.

Layout trick: q [B, T, Hq, D] is viewed (free reshape) as [B, T, Hq*D] and head h is the lane
block h of width D, so no transposes are needed; k/v likewise as [B, S, Hkv*D]. Query head h
reads kv head h // G (G = Hq // Hkv), matching the reference's `q.reshape(b, t, hkv, G, d)`.

Masks (as in reference.py): causal by array index, segment ids (0 = padding, attention only
within equal non-zero ids), and the internal padding of T/S up to the block size. Rows with no
visible key give exact zeros and zero gradients (the online-softmax denominator stays 0).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

NEG_INF = -1e30  # finite: masked logits never produce inf - inf


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, d] @ b[n, d].T in f32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a[m, n].T @ b [m, d] in f32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def online_softmax_step(acc, m, denom, s, mask, v):
    """One kv tile of an online softmax: masked f32 scores ``s`` [rows, k] against ``v`` [k, D]
    folded into the running (acc, max, denominator); returns the new triple."""
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    corr = jnp.exp(m - m_new)
    denom = corr * denom + jnp.sum(p, axis=1, keepdims=True)
    acc = corr * acc + _dot(p.astype(v.dtype), v)
    return acc, m_new, denom


def _mask(q_pos, kv_pos, q_seg, kv_seg, *, causal: bool, q_len: int, kv_len: int, q_pad: bool,
          kv_pad: bool):
    """[bq, bk] allowed pairs; q_pos [bq, 1], kv_pos [1, bk], segs the same shapes or None."""
    mask = jnp.ones((q_pos.shape[0], kv_pos.shape[1]), dtype=jnp.bool_)
    if causal:
        mask &= q_pos >= kv_pos
    if kv_pad:
        mask &= kv_pos < kv_len
    if q_pad:
        mask &= q_pos < q_len
    if q_seg is not None:
        mask &= (q_seg == kv_seg) & (q_seg != 0)
    return mask


def _causal_kv_blocks(q_block, block_q: int, block_k: int, num_kv_blocks: int):
    """Number of kv blocks a causal q block can see (later blocks are fully masked: skipped)."""
    last = lax.div((q_block + 1) * block_q + block_k - 1, block_k)
    return jnp.minimum(last, num_kv_blocks)


def compiler_params(interpret: bool, num_warps: int = 4, num_stages: int = 2):
    """Backend choice for a compiled kernel: Triton on GPU (jax 0.10 otherwise defaults to Mosaic
    GPU, which these generic BlockSpec kernels do not target); Mosaic's defaults on TPU."""
    if interpret or jax.default_backend() != "gpu":
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _cols(head: int, head_dim: int) -> slice:
    """Static lane slice of one head inside a block of several heads."""
    return slice(head * head_dim, (head + 1) * head_dim)


def _kv_local(i: int, heads: int, group: int) -> int:
    """Local kv head (inside the kv block) of local q head i, for `heads` q heads per program."""
    return i // group if heads >= group else 0


# ----------------------------------------------------------------------------------------- forward

def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, *, heads, group, head_dim,
                scale, causal, block_q, block_k, num_kv_blocks, mask_kw):
    qi = pl.program_id(2)
    q_pos = qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    q_seg = None if qseg_ref is None else qseg_ref[...]
    n = _causal_kv_blocks(qi, block_q, block_k, num_kv_blocks) if causal else num_kv_blocks
    for i in range(heads):  # static: lane slices stay static (Mosaic wants them so)
        qc, kc = _cols(i, head_dim), _cols(_kv_local(i, heads, group), head_dim)
        q = q_ref[:, qc]

        def body(j, carry, q=q, kc=kc):
            acc, m, denom = carry
            start = pl.multiple_of(j * block_k, block_k)
            k = k_ref[pl.ds(start, block_k), kc]
            v = v_ref[pl.ds(start, block_k), kc]
            s = _dot_nt(q, k) * scale
            kv_pos = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
            kv_seg = None if kvseg_ref is None else kvseg_ref[:, pl.ds(start, block_k)]
            mask = _mask(q_pos, kv_pos, q_seg, kv_seg, causal=causal, **mask_kw)
            return online_softmax_step(acc, m, denom, jnp.where(mask, s, NEG_INF), mask, v)

        init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q, 1), NEG_INF, jnp.float32),
                jnp.zeros((block_q, 1), jnp.float32))
        acc, m, denom = lax.fori_loop(0, n, body, init)
        seen = denom > 0.0
        safe = jnp.where(seen, denom, 1.0)
        o_ref[:, qc] = jnp.where(seen, acc / safe, 0.0).astype(o_ref.dtype)
        # Empty rows: lse 0 is never used (their probabilities are masked to 0 in the backward).
        lse_ref[i] = jnp.where(seen, m + jnp.log(safe), 0.0)


def _seg_inputs(q_seg, kv_seg):
    """Segment ids as [B, Tp, 1] (a column per q block) and [B, 1, Sp] (a row per kv block)."""
    if q_seg is None:
        return None, None
    return q_seg.astype(jnp.int32)[:, :, None], kv_seg.astype(jnp.int32)[:, None, :]


def _layout(q, k, cfg):
    """Sizes, and the lane-block index maps shared by the forward and dq calls."""
    b, tp, hq, d = q.shape
    _, sp, hkv, _ = k.shape
    g, hp = hq // hkv, cfg.heads
    kvh = max(1, hp // g)  # kv heads per program (lane width kvh * d)
    return dict(b=b, tp=tp, sp=sp, hq=hq, hkv=hkv, d=d, g=g, hp=hp, kvh=kvh,
                q_map=lambda bi, p, i: (bi, i, p), kv_map=lambda bi, p, i: (bi, 0, (p * hp) // g // kvh),
                row_map=lambda bi, p, i: (bi, p, i, 0))


def _forward(q, k, v, q_seg, kv_seg, cfg):
    L = _layout(q, k, cfg)  # noqa: N806
    b, tp, sp, hq, hkv, d, hp, kvh = (L[n] for n in ("b", "tp", "sp", "hq", "hkv", "d", "hp", "kvh"))
    bq, bk = cfg.block_q, cfg.block_k
    qseg3, kvseg3 = _seg_inputs(q_seg, kv_seg)
    kernel = functools.partial(
        _fwd_kernel, heads=hp, group=L["g"], head_dim=d, scale=cfg.scale, causal=cfg.causal, block_q=bq,
        block_k=bk, num_kv_blocks=sp // bk, mask_kw=dict(cfg.mask_kw))
    in_specs = [
        pl.BlockSpec((None, bq, hp * d), L["q_map"]),
        pl.BlockSpec((None, sp, kvh * d), L["kv_map"]),
        pl.BlockSpec((None, sp, kvh * d), L["kv_map"]),
        None if qseg3 is None else pl.BlockSpec((None, bq, 1), lambda bi, p, i: (bi, i, 0)),
        None if kvseg3 is None else pl.BlockSpec((None, 1, sp), lambda bi, p, i: (bi, 0, 0)),
    ]
    out_specs = [pl.BlockSpec((None, bq, hp * d), L["q_map"]), pl.BlockSpec((None, hp, bq, 1), L["row_map"])]
    out_shape = [jax.ShapeDtypeStruct((b, tp, hq * d), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, tp, 1), jnp.float32)]
    out, lse = pl.pallas_call(
        kernel, grid=(b, hq // hp, tp // bq), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=cfg.interpret, name="rlax_flash_fwd", compiler_params=compiler_params(cfg.interpret),
    )(q.reshape(b, tp, hq * d), k.reshape(b, sp, hkv * d), v.reshape(b, sp, hkv * d), qseg3, kvseg3)
    return out.reshape(b, tp, hq, d), lse


# ---------------------------------------------------------------------------------------- backward

def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref, dq_ref, *, heads,
               group, head_dim, scale, causal, block_q, block_k, num_kv_blocks, mask_kw):
    qi = pl.program_id(2)
    q_pos = qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    q_seg = None if qseg_ref is None else qseg_ref[...]
    n = _causal_kv_blocks(qi, block_q, block_k, num_kv_blocks) if causal else num_kv_blocks
    for i in range(heads):
        qc, kc = _cols(i, head_dim), _cols(_kv_local(i, heads, group), head_dim)
        q, do, lse, delta = q_ref[:, qc], do_ref[:, qc], lse_ref[i], delta_ref[i]

        def body(j, dq, q=q, do=do, lse=lse, delta=delta, kc=kc):
            start = pl.multiple_of(j * block_k, block_k)
            k = k_ref[pl.ds(start, block_k), kc]
            v = v_ref[pl.ds(start, block_k), kc]
            kv_pos = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
            kv_seg = None if kvseg_ref is None else kvseg_ref[:, pl.ds(start, block_k)]
            mask = _mask(q_pos, kv_pos, q_seg, kv_seg, causal=causal, **mask_kw)
            s = _dot_nt(q, k) * scale
            p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse), 0.0)
            ds = p * (_dot_nt(do, v) - delta)
            return dq + _dot(ds.astype(k.dtype), k)

        dq = lax.fori_loop(0, n, body, jnp.zeros(q.shape, jnp.float32))
        dq_ref[:, qc] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref, dk_ref, dv_ref, *,
                kv_heads, group, head_dim, scale, causal, block_q, block_k, num_q_blocks, mask_kw):
    kj = pl.program_id(2)
    kv_pos = kj * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    kv_seg = None if kvseg_ref is None else kvseg_ref[...]
    # Causal: q blocks that end before this kv block starts see none of it; start after them.
    lo = lax.div(kj * block_k, block_q) if causal else 0
    for c in range(kv_heads):
        kc = _cols(c, head_dim)
        k, v = k_ref[:, kc], v_ref[:, kc]
        dk = jnp.zeros(k.shape, jnp.float32)
        dv = jnp.zeros(v.shape, jnp.float32)
        for i in range(c * group, (c + 1) * group):  # the q heads sharing this kv head
            qc = _cols(i, head_dim)

            def body(r, carry, i=i, qc=qc, k=k, v=v):
                dk, dv = carry
                start = pl.multiple_of(r * block_q, block_q)
                rows = pl.ds(start, block_q)
                q, do = q_ref[rows, qc], do_ref[rows, qc]
                lse, delta = lse_ref[i, rows, :], delta_ref[i, rows, :]
                q_pos = start + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
                q_seg = None if qseg_ref is None else qseg_ref[rows, :]
                mask = _mask(q_pos, kv_pos, q_seg, kv_seg, causal=causal, **mask_kw)
                s = _dot_nt(q, k) * scale
                p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse), 0.0)
                dv = dv + _dot_tn(p.astype(do.dtype), do)
                ds = p * (_dot_nt(do, v) - delta)
                dk = dk + _dot_tn(ds.astype(q.dtype), q)
                return dk, dv

            dk, dv = lax.fori_loop(lo, num_q_blocks, body, (dk, dv))
        dk_ref[:, kc] = (dk * scale).astype(dk_ref.dtype)
        dv_ref[:, kc] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, q_seg, kv_seg, out, lse, do, cfg):
    L = _layout(q, k, cfg)  # noqa: N806
    b, tp, sp, hq, hkv, d, hp, kvh, g = (L[n] for n in ("b", "tp", "sp", "hq", "hkv", "d", "hp", "kvh", "g"))
    bq, bk = cfg.block_q, cfg.block_k
    qseg3, kvseg3 = _seg_inputs(q_seg, kv_seg)
    # delta_i = sum_d o_id * do_id: one cheap elementwise pass, left to XLA.
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, Tp, Hq]
    delta = jnp.transpose(delta, (0, 2, 1))[..., None]  # [B, Hq, Tp, 1] like lse
    q3, do3 = q.reshape(b, tp, hq * d), do.reshape(b, tp, hq * d)
    k3, v3 = k.reshape(b, sp, hkv * d), v.reshape(b, sp, hkv * d)
    common = dict(group=g, head_dim=d, scale=cfg.scale, causal=cfg.causal, block_q=bq, block_k=bk,
                  mask_kw=dict(cfg.mask_kw))

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, heads=hp, num_kv_blocks=sp // bk, **common),
        grid=(b, hq // hp, tp // bq),
        in_specs=[
            pl.BlockSpec((None, bq, hp * d), L["q_map"]),
            pl.BlockSpec((None, sp, kvh * d), L["kv_map"]),
            pl.BlockSpec((None, sp, kvh * d), L["kv_map"]),
            pl.BlockSpec((None, bq, hp * d), L["q_map"]),
            pl.BlockSpec((None, hp, bq, 1), L["row_map"]),
            pl.BlockSpec((None, hp, bq, 1), L["row_map"]),
            None if qseg3 is None else pl.BlockSpec((None, bq, 1), lambda bi, p, i: (bi, i, 0)),
            None if kvseg3 is None else pl.BlockSpec((None, 1, sp), lambda bi, p, i: (bi, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, bq, hp * d), L["q_map"]),
        out_shape=jax.ShapeDtypeStruct(q3.shape, q.dtype),
        interpret=cfg.interpret, name="rlax_flash_dq", compiler_params=compiler_params(cfg.interpret),
    )(q3, k3, v3, do3, lse, delta, qseg3, kvseg3)

    qw = kvh * g  # q heads per dk/dv program
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, kv_heads=kvh, num_q_blocks=tp // bq, **common),
        grid=(b, hkv // kvh, sp // bk),
        in_specs=[
            pl.BlockSpec((None, tp, qw * d), lambda bi, h, j: (bi, 0, h)),
            pl.BlockSpec((None, bk, kvh * d), lambda bi, h, j: (bi, j, h)),
            pl.BlockSpec((None, bk, kvh * d), lambda bi, h, j: (bi, j, h)),
            pl.BlockSpec((None, tp, qw * d), lambda bi, h, j: (bi, 0, h)),
            pl.BlockSpec((None, qw, tp, 1), lambda bi, h, j: (bi, h, 0, 0)),
            pl.BlockSpec((None, qw, tp, 1), lambda bi, h, j: (bi, h, 0, 0)),
            None if qseg3 is None else pl.BlockSpec((None, tp, 1), lambda bi, h, j: (bi, 0, 0)),
            None if kvseg3 is None else pl.BlockSpec((None, 1, bk), lambda bi, h, j: (bi, 0, j)),
        ],
        out_specs=[pl.BlockSpec((None, bk, kvh * d), lambda bi, h, j: (bi, j, h)),
                   pl.BlockSpec((None, bk, kvh * d), lambda bi, h, j: (bi, j, h))],
        out_shape=[jax.ShapeDtypeStruct(k3.shape, k.dtype), jax.ShapeDtypeStruct(v3.shape, v.dtype)],
        interpret=cfg.interpret, name="rlax_flash_dkv", compiler_params=compiler_params(cfg.interpret),
    )(q3, k3, v3, do3, lse, delta, qseg3, kvseg3)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


# ------------------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, cfg):
    return _forward(q, k, v, q_seg, kv_seg, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, cfg):
    out, lse = _forward(q, k, v, q_seg, kv_seg, cfg)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, q_seg, kv_seg, out, lse = res
    dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, out, lse, do, cfg)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static (hashable) kernel configuration."""

    scale: float
    causal: bool
    block_q: int
    block_k: int
    interpret: bool
    heads: int  # q heads per forward / dq program
    mask_kw: tuple  # (name, value) pairs for _mask: true lengths and whether T/S were padded


def default_heads_per_program(hq: int, hkv: int, head_dim: int, interpret: bool) -> int:
    """1 (one q head per program) except compiled on TPU with head_dim < 128: there a block's lane
    width (heads * head_dim) must be a multiple of 128 or the full Hq*D / Hkv*D, so a program takes
    whole groups of q heads with enough kv heads."""
    if interpret or jax.default_backend() != "tpu" or head_dim % 128 == 0:
        return 1
    g = hq // hkv
    for m in range(1, hkv + 1):
        if hkv % m == 0 and (m * head_dim) % 128 == 0:
            return m * g
    return hq


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def flash_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    heads_per_program: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Flash attention; same contract as reference.flash_attention_reference. Differentiable.

    Shapes are validated by the dispatcher. T and S are padded up to the (clamped) block sizes
    here and the pad is masked, so any lengths work. heads_per_program: q heads one program
    handles (a divisor or multiple of Hq // Hkv; default: default_heads_per_program()).
    scale is a Python float (static).
    """
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    hp = default_heads_per_program(hq, hkv, d, interpret) if heads_per_program is None else heads_per_program
    g = hq // hkv
    if hq % hp or (g % hp and hp % g) or (hp > g and hkv % (hp // g)):
        raise ValueError(f"heads_per_program={hp} must divide Hq={hq} and divide or be a multiple "
                         f"of the group size {g}")
    # Short inputs: one block, still a power of two >= 16 (Triton's arange/dot, Mosaic sublanes).
    block_q = min(block_q, pl.next_power_of_2(max(t, 16)))
    block_k = min(block_k, pl.next_power_of_2(max(s, 16)))
    tp, sp = _round_up(t, block_q), _round_up(s, block_k)
    q_seg, kv_seg = q_segment_ids, kv_segment_ids
    if tp != t:
        q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
        q_seg = None if q_seg is None else jnp.pad(q_seg, ((0, 0), (0, tp - t)))
    if sp != s:
        k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
        kv_seg = None if kv_seg is None else jnp.pad(kv_seg, ((0, 0), (0, sp - s)))
    cfg = _Cfg(scale=float(d**-0.5 if scale is None else scale), causal=bool(causal), block_q=block_q,
               block_k=block_k, interpret=bool(interpret), heads=hp,
               mask_kw=(("q_len", t), ("kv_len", s), ("q_pad", tp != t), ("kv_pad", sp != s)))
    out = _flash(q, k, v, q_seg, kv_seg, cfg)
    return out[:, :t]

