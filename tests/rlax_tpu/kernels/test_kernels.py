"""Pallas attention kernels (interpret mode on CPU) against their jnp references, and the dispatcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlax_tpu.kernels import KernelError, decode_attention, dispatch, flash_attention, reference
from tests.helpers import ROOT

F32_TOL = 1e-5
BF16_TOL = 4e-2


def _qkv(b, t, s, hq, hkv, d, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, t, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32).astype(dtype)
    w = jax.random.normal(ks[3], (b, t, hq, d), jnp.float32)
    return q, k, v, w


def _fwd_and_grads(impl, q, k, v, w, **kw):
    """Output and d(sum(out * w))/d(q, k, v), jitted (interpret mode is slow when not jitted)."""

    def loss(q, k, v):
        out = flash_attention(q, k, v, impl=impl, **kw)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _compare_flash(q, k, v, w, tol, **kw):
    out, grads = _fwd_and_grads("pallas", q, k, v, w, **kw)
    ref_out, ref_grads = _fwd_and_grads("reference", q, k, v, w, **kw)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                               atol=tol, rtol=tol)
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        g, rg = np.asarray(g, np.float32), np.asarray(rg, np.float32)
        assert np.isfinite(g).all(), f"d{name} has non-finite values"
        np.testing.assert_allclose(g, rg, atol=tol, rtol=tol, err_msg=f"d{name}")
    return out, grads


def test_flash_causal_gqa2_odd_lengths_multihead_programs():
    # Odd T = S, not a multiple of the block; causal skips the fully masked kv blocks. Four q heads
    # (two kv heads) per program: the multi-head path TPU takes for head_dim < 128.
    q, k, v, w = _qkv(2, 37, 37, 4, 2, 32)
    _compare_flash(q, k, v, w, F32_TOL, causal=True, block_q=16, block_k=16, heads_per_program=4)


def _segments(b, t):
    """Row 0: left padding then two packed segments; row 1: all padding (every row masked)."""
    seg = np.zeros((b, t), np.int32)
    seg[0, 5:20] = 1
    seg[0, 20:] = 2
    return jnp.asarray(seg)


def test_flash_noncausal_gqa4_segments_and_fully_masked_rows():
    q, k, v, w = _qkv(2, 40, 40, 4, 1, 32, seed=1)
    seg = _segments(2, 40)
    out, (dq, dk, dv) = _compare_flash(q, k, v, w, F32_TOL, q_segment_ids=seg, kv_segment_ids=seg,
                                       causal=False, block_q=16, block_k=16)
    pad = np.asarray(seg) == 0
    out = np.asarray(out)
    assert (out[pad] == 0).all(), "padding query rows must be exact zeros"
    assert (np.asarray(dq)[pad] == 0).all() and (np.asarray(dk)[pad] == 0).all()
    assert (np.asarray(dv)[pad] == 0).all()
    assert np.abs(out[~pad]).max() > 0


def test_flash_bf16_causal_mha_t_ne_s_segments():
    # T != S, neither a multiple of its block; kv has left padding, q packs two segments.
    q, k, v, w = _qkv(2, 20, 45, 2, 2, 64, dtype=jnp.bfloat16, seed=2)
    q_seg = jnp.asarray(np.repeat([[1] * 12 + [2] * 8], 2, axis=0), jnp.int32)
    kv_seg = jnp.asarray(np.repeat([[0] * 3 + [1] * 30 + [2] * 12], 2, axis=0), jnp.int32)
    out, _ = _compare_flash(q, k, v, w, BF16_TOL, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=True,
                            block_q=32, block_k=16)
    assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("hq,hkv,kv_heads_per_program", [(4, 2, 2), (4, 1, None)])  # GQA 1: bf16 test
def test_decode_matches_reference(hq, hkv, kv_heads_per_program):
    b, s, d = 6, 37, 32  # S not a multiple of the block: the last block is shifted back
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.normal(ks[0], (b, hq, d))
    kc = jax.random.normal(ks[1], (b, hkv, s, d))  # head-major cache
    vc = jax.random.normal(ks[2], (b, hkv, s, d))
    lengths = jnp.array([0, 1, s, 16, 17, 33], jnp.int32)  # empty, one, full, block, +1, ragged
    run = jax.jit(lambda *a, impl: decode_attention(*a, impl=impl, block_k=16,
                                                    kv_heads_per_program=kv_heads_per_program),
                  static_argnames="impl")
    out = run(q, kc, vc, lengths, impl="pallas")
    ref = run(q, kc, vc, lengths, impl="reference")
    np.testing.assert_allclose(out, ref, atol=F32_TOL, rtol=F32_TOL)
    assert (np.asarray(out[0]) == 0).all(), "length 0 must give zeros"


def test_decode_bf16_ignores_stale_cache():
    b, s, hq, hkv, d = 3, 32, 2, 2, 64
    ks = jax.random.split(jax.random.PRNGKey(4), 3)
    q = jax.random.normal(ks[0], (b, hq, d)).astype(jnp.bfloat16)
    kc = jax.random.normal(ks[1], (b, hkv, s, d)).astype(jnp.bfloat16)
    vc = jax.random.normal(ks[2], (b, hkv, s, d)).astype(jnp.bfloat16)
    lengths = jnp.array([5, 32, 20], jnp.int32)
    run = jax.jit(lambda q, kc, vc: decode_attention(q, kc, vc, lengths, impl="pallas", block_k=16))
    out = run(q, kc, vc)
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(decode_attention(q, kc, vc, lengths, impl="reference"), np.float32),
                               atol=BF16_TOL, rtol=BF16_TOL)
    # Garbage (even NaN) past each length must not leak into the result.
    valid = (jnp.arange(s)[None, :] < lengths[:, None])[:, None, :, None]
    dirty = jnp.where(valid, vc, jnp.nan)
    np.testing.assert_array_equal(np.asarray(run(q, jnp.where(valid, kc, jnp.nan), dirty), np.float32),
                                  np.asarray(out, np.float32))


def test_auto_uses_reference_on_cpu(monkeypatch):
    assert jax.default_backend() == "cpu"

    def boom(*a, **k):
        raise AssertionError("auto must not run the Pallas kernel on CPU")

    monkeypatch.setattr(dispatch, "flash_attention_pallas", boom)
    monkeypatch.setattr(dispatch, "decode_attention_pallas", boom)
    monkeypatch.setattr(reference, "flash_attention_reference", lambda *a, **k: "flash-ref")
    monkeypatch.setattr(reference, "decode_attention_reference", lambda *a, **k: "decode-ref")
    q, k, v, _ = _qkv(1, 8, 8, 2, 1, 16)
    assert flash_attention(q, k, v) == "flash-ref"
    kc, vc = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, S, D]
    assert decode_attention(q[:, 0], kc, vc, jnp.array([3])) == "decode-ref"


def test_dispatcher_rejects_unsupported_inputs():
    q, k, v, _ = _qkv(1, 8, 8, 2, 1, 16)
    with pytest.raises(KernelError, match="impl"):
        flash_attention(q, k, v, impl="triton")
    with pytest.raises(KernelError, match="multiple of kv heads"):
        flash_attention(jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 16)),
                        impl="reference")
    with pytest.raises(KernelError, match="float64"):
        flash_attention(np.zeros((1, 8, 2, 16)), np.zeros((1, 8, 1, 16)), np.zeros((1, 8, 1, 16)),
                        impl="pallas")
    with pytest.raises(KernelError, match="head_dim 48"):
        flash_attention(jnp.zeros((1, 8, 2, 48)), jnp.zeros((1, 8, 1, 48)), jnp.zeros((1, 8, 1, 48)),
                        impl="pallas")
    with pytest.raises(KernelError, match="heads_per_program=3"):
        flash_attention(q, k, v, impl="pallas", heads_per_program=3)
    with pytest.raises(KernelError, match="block_k=24"):
        flash_attention(q, k, v, impl="pallas", block_k=24)
    with pytest.raises(KernelError, match="kv_segment_ids"):
        flash_attention(q, k, v, q_segment_ids=jnp.ones((1, 8), jnp.int32), impl="reference")
    with pytest.raises(KernelError, match="lengths"):
        decode_attention(q[:, 0], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), jnp.array([1.0]),
                         impl="pallas")
    with pytest.raises(KernelError, match="head_dim 8"):
        decode_attention(jnp.zeros((1, 2, 8)), jnp.zeros((1, 1, 4, 8)), jnp.zeros((1, 1, 4, 8)),
                         jnp.array([2]), impl="pallas")


def test_kernels_lower_for_tpu_and_gpu():
    """Mosaic (TPU, head_dim 64 and 128) and Triton (GPU) lowering of every kernel (and of JAX's
    splash attention for TPU), no device needed (subprocess:
    the script patches jax's backend probes)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_kernel_lowering.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    failed = [r for r in report["results"] if not r["lowered"]]
    assert not failed and len(report["results"]) == 22, failed
