"""Paged attention kernels (interpret mode on CPU) against their jnp references.

One fixture covers the acceptance cases at once: ragged lengths, a length of 0, lengths on and
across page boundaries, and sequences whose page tables share their first pages (a prompt
prefix stored once). The paged references are checked against dense attention over the same
per-sequence K/V, so the kernels are checked against independent ground truth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from rlax_tpu.kernels import KernelError, dispatch, paged_attention, reference

PS, N, POOL, D = 4, 4, 12, 16  # page size, pages per sequence, pool pages, head dim
# Sequence lengths: empty, exactly one page, across a boundary, ragged over 4 pages.
LENGTHS = np.array([0, 4, 5, 13], np.int32)
# Tables: sequence 2 shares page 1 with sequence 1 (its prefix), sequence 3 shares pages 1-2 with
# sequence 2's prompt; unused entries point at page 0 (any valid page).
TABLES = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [1, 3, 0, 0], [1, 2, 5, 6]], np.int32)
F32_TOL, BF16_TOL = 2e-5, 4e-2


def _cache(hq: int, hkv: int, dtype=jnp.float32, seed: int = 0):
    """(q [B,Hq,D], pools, dense per-sequence k/v [B,Hkv,S,D]) with the shared prefix pages holding
    the same K/V in every sequence that points at them."""
    rng = np.random.default_rng(seed)
    k_pages = rng.standard_normal((hkv, POOL, PS, D)).astype(np.float32)
    v_pages = rng.standard_normal((hkv, POOL, PS, D)).astype(np.float32)
    dense_k = k_pages[:, TABLES].reshape(hkv, len(TABLES), N * PS, D).transpose(1, 0, 2, 3)
    dense_v = v_pages[:, TABLES].reshape(hkv, len(TABLES), N * PS, D).transpose(1, 0, 2, 3)
    q = rng.standard_normal((len(TABLES), hq, D)).astype(np.float32)
    cast = lambda x: jnp.asarray(x).astype(dtype)  # noqa: E731
    return cast(q), cast(k_pages), cast(v_pages), cast(dense_k), cast(dense_v)


def _close(out, want, tol):
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def _prefill_rows(t: int):
    """Prefill chunks ending at LENGTHS: none, a whole page from 0, one token at offset 4, a
    4-token chunk from offset 9 (across a page boundary)."""
    q_lens = np.minimum(LENGTHS, [0, 4, 1, 4]).astype(np.int32)
    assert q_lens.max() <= t
    return jnp.asarray(LENGTHS - q_lens), jnp.asarray(q_lens), jnp.asarray(LENGTHS)


def test_paged_references_match_dense_attention():
    q, kp, vp, dk, dv = _cache(8, 2)
    lengths, tables = jnp.asarray(LENGTHS), jnp.asarray(TABLES)
    dense = reference.decode_attention_reference(q, dk, dv, lengths)
    _close(reference.paged_decode_attention_reference(q, kp, vp, lengths, tables), dense, 1e-6)
    assert not np.asarray(dense[0]).any()  # length 0 -> zeros
    # Prefill: token t of a chunk at q_start attends like a decode query at length q_start + t + 1.
    t = 4
    qs, ql, kl = _prefill_rows(t)
    qt = jnp.asarray(np.random.default_rng(1).standard_normal((4, t, 8, D)), jnp.float32)
    out = reference.paged_prefill_attention_reference(qt, kp, vp, qs, ql, kl, tables)
    for i in range(t):
        want = reference.decode_attention_reference(qt[:, i], dk, dv, jnp.minimum(qs + i + 1, kl))
        live = np.asarray(ql) > i
        _close(np.asarray(out[:, i])[live], np.asarray(want)[live], 1e-6)
        assert not np.asarray(out[:, i])[~live].any()


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_paged_decode_kernel_matches_reference(group):
    q, kp, vp, dk, dv = _cache(2 * group, 2)
    lengths, tables = jnp.asarray(LENGTHS), jnp.asarray(TABLES)
    want = reference.decode_attention_reference(q, dk, dv, lengths)
    out = dispatch.paged_decode_attention(q, kp, vp, lengths, tables, impl="pallas")  # JAX's GPU kernel
    _close(out, want, F32_TOL)
    assert not np.asarray(out[0]).any()


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_paged_prefill_kernel_matches_reference(group):
    hq, t = 2 * group, 4
    _, kp, vp, _, _ = _cache(hq, 2)
    qt = jnp.asarray(np.random.default_rng(2).standard_normal((4, t, hq, D)), jnp.float32)
    qs, ql, kl = _prefill_rows(t)
    tables = jnp.asarray(TABLES)
    want = reference.paged_prefill_attention_reference(qt, kp, vp, qs, ql, kl, tables)
    # block_q=2: several query blocks, each seeing a different number of pages.
    out = dispatch.paged_prefill_attention(qt, kp, vp, qs, ql, kl, tables, impl="pallas", block_q=2)
    _close(out, want, F32_TOL)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_paged_tpu_kernel_matches_reference_in_tpu_interpret_mode(group):
    """Our TPU kernel (scalar-prefetched tables, one page per grid step), decode and prefill."""
    hq, t = 2 * group, 4
    q, kp, vp, dk, dv = _cache(hq, 2)
    lengths, tables = jnp.asarray(LENGTHS), jnp.asarray(TABLES)
    qt = jnp.asarray(np.random.default_rng(3).standard_normal((4, t, hq, D)), jnp.float32)
    qs, ql, kl = _prefill_rows(t)
    with pltpu.force_tpu_interpret_mode():
        dec = paged_attention.paged_attention_tpu(q[:, None], kp, vp, *paged_attention.decode_as_prefill(lengths),
                                                  tables, scale=D**-0.5)[:, 0]
        pre = paged_attention.paged_attention_tpu(qt, kp, vp, qs, ql, kl, tables, scale=D**-0.5, block_q=2)
    _close(dec, reference.decode_attention_reference(q, dk, dv, lengths), F32_TOL)
    _close(pre, reference.paged_prefill_attention_reference(qt, kp, vp, qs, ql, kl, tables), F32_TOL)


def test_paged_kernels_bf16():
    """bf16 in, bf16 out (f32 softmax inside); references jitted (eager XLA:CPU has no bf16 dot
    into f32)."""
    q, kp, vp, dk, dv = _cache(8, 2, jnp.bfloat16)
    lengths, tables = jnp.asarray(LENGTHS), jnp.asarray(TABLES)
    out = dispatch.paged_decode_attention(q, kp, vp, lengths, tables, impl="pallas")
    assert out.dtype == jnp.bfloat16
    _close(out, jax.jit(reference.paged_decode_attention_reference)(q, kp, vp, lengths, tables), BF16_TOL)
    qt = q[:, None].repeat(4, axis=1)
    qs, ql, kl = _prefill_rows(4)
    out = dispatch.paged_prefill_attention(qt, kp, vp, qs, ql, kl, tables, impl="pallas")
    assert out.dtype == jnp.bfloat16
    _close(out, jax.jit(reference.paged_prefill_attention_reference)(qt, kp, vp, qs, ql, kl, tables), BF16_TOL)


def test_our_paged_kernels_ignore_stale_nan_rows():
    """Positions past a sequence's length inside its last page may hold a previous occupant's
    data, even NaN: our kernels mask them out of both the logits and V."""
    q, kp, vp, _, _ = _cache(4, 2)
    kp, vp = kp.at[:, 3, 1:].set(jnp.nan), vp.at[:, 3, 1:].set(jnp.nan)  # sequence 2: 5 = 4 + 1 live
    lengths, tables = jnp.asarray(LENGTHS), jnp.asarray(TABLES)
    out = dispatch.paged_prefill_attention(q[:, None], kp, vp, *paged_attention.decode_as_prefill(lengths),
                                           tables, impl="pallas")[:, 0]
    assert np.isfinite(np.asarray(out)).all()
    _close(out, reference.paged_decode_attention_reference(q, kp, vp, lengths, tables), F32_TOL)


def test_paged_dispatcher_rejects_unsupported_inputs():
    q, kp, vp, _, _ = _cache(4, 2)
    lengths, tables = jnp.asarray(LENGTHS), jnp.asarray(TABLES)
    with pytest.raises(KernelError, match="multiple of kv heads"):
        dispatch.paged_decode_attention(q[:, :3], kp, vp, lengths, tables, impl="reference")
    with pytest.raises(KernelError, match="page_indices"):
        dispatch.paged_decode_attention(q, kp, vp, lengths, tables[:2], impl="reference")
    with pytest.raises(KernelError, match="lengths"):
        dispatch.paged_decode_attention(q, kp, vp, lengths.astype(jnp.float32), tables, impl="reference")
    with pytest.raises(KernelError, match="kv_lens"):
        dispatch.paged_prefill_attention(q[:, None], kp, vp, lengths, lengths, lengths[:2], tables)
    with pytest.raises(KernelError, match="page_size 4"):
        dispatch.paged_decode_attention(q, kp, vp, lengths, tables, impl="pallas", interpret=False)
    with pytest.raises(KernelError, match="block_q=3"):
        dispatch.paged_prefill_attention(q[:, None], kp, vp, lengths, lengths, lengths, tables, impl="pallas",
                                         block_q=3)
    with pytest.raises(KernelError, match="float64"):
        dispatch.paged_decode_attention(np.asarray(q, np.float64), kp, vp, lengths, tables, impl="pallas")
