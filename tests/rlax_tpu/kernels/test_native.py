"""Native kernel tests: every kernel compiled for the device (no interpret mode) against its jnp
reference, in float32 and bfloat16. Marked ``gpu`` / ``tpu``: skipped on CPU (tests/conftest.py);
scripts/device_check.sh runs them on a GPU machine with ``-m gpu``.

References run at "highest" matmul precision; the kernels at the device's default (TF32 or bf16
passes for f32 on some devices), hence f32 tolerances above the interpret-mode ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlax_tpu.kernels import dispatch, reference

DEVICES = [pytest.param("gpu", marks=pytest.mark.gpu), pytest.param("tpu", marks=pytest.mark.tpu)]
TOL = {jnp.float32: 5e-3, jnp.bfloat16: 5e-2}
DTYPES = [jnp.float32, jnp.bfloat16]


def _rand(shape, dtype, seed):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


def _close(out, want, dtype):
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def _ref(fn, *args, **kw):
    with jax.default_matmul_precision("highest"):
        return jax.jit(lambda *a: fn(*a, **kw))(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_forward_and_gradients(device, dtype, head_dim):
    b, t, hq, hkv = 2, 200, 8, 2  # T not a multiple of the block: the padded path
    q, k, v = (_rand((b, t, h, head_dim), dtype, i) for i, h in enumerate((hq, hkv, hkv)))
    seg = jnp.asarray(np.repeat([[1] * 150 + [2] * 40 + [0] * 10], b, 0), jnp.int32)
    w = _rand((b, t, hq, head_dim), jnp.float32, 9)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, q_segment_ids=seg, kv_segment_ids=seg).astype(jnp.float32) * w)

    kern = lambda *a, **kw: dispatch.flash_attention(*a, impl="pallas", interpret=False, **kw)  # noqa: E731
    out = jax.jit(lambda q, k, v: kern(q, k, v, q_segment_ids=seg, kv_segment_ids=seg))(q, k, v)
    _close(out, _ref(reference.flash_attention_reference, q, k, v, q_segment_ids=seg, kv_segment_ids=seg), dtype)
    grads = jax.jit(jax.grad(loss(kern), argnums=(0, 1, 2)))(q, k, v)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(jax.grad(loss(reference.flash_attention_reference), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(grads, want, strict=True):
        _close(g, r, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode(device, dtype):
    b, hq, hkv, s, d = 4, 8, 2, 1000, 128
    q, kc, vc = _rand((b, hq, d), dtype, 0), _rand((b, hkv, s, d), dtype, 1), _rand((b, hkv, s, d), dtype, 2)
    lengths = jnp.array([0, 1, 129, 1000], jnp.int32)
    out = jax.jit(lambda *a: dispatch.decode_attention(*a, impl="pallas", interpret=False))(q, kc, vc, lengths)
    _close(out, _ref(reference.decode_attention_reference, q, kc, vc, lengths), dtype)


def _paged(dtype, hq=8, hkv=2, d=128, ps=16, pool=64, n=8):
    rng = np.random.default_rng(0)
    kp, vp = _rand((hkv, pool, ps, d), dtype, 1), _rand((hkv, pool, ps, d), dtype, 2)
    tables = rng.permutation(pool)[:4 * n].reshape(4, n).astype(np.int32)
    tables[1, :3] = tables[0, :3]  # a shared prefix
    lengths = jnp.array([0, 16, 17, n * ps], jnp.int32)  # empty, one page, across, full
    return kp, vp, jnp.asarray(tables), lengths


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_decode(device, dtype):
    kp, vp, tables, lengths = _paged(dtype)
    q = _rand((4, 8, 128), dtype, 3)
    run = jax.jit(lambda *a: dispatch.paged_decode_attention(*a, impl="pallas", interpret=False))
    _close(run(q, kp, vp, lengths, tables),
           _ref(reference.paged_decode_attention_reference, q, kp, vp, lengths, tables), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_prefill(device, dtype):
    kp, vp, tables, lengths = _paged(dtype)
    t = 40
    q = _rand((4, t, 8, 128), dtype, 4)
    q_lens = jnp.minimum(lengths, t)
    q_start = lengths - q_lens
    run = jax.jit(lambda *a: dispatch.paged_prefill_attention(*a, impl="pallas", interpret=False))
    _close(run(q, kp, vp, q_start, q_lens, lengths, tables),
           _ref(reference.paged_prefill_attention_reference, q, kp, vp, q_start, q_lens, lengths, tables), dtype)
