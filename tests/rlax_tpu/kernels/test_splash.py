"""JAX's shipped TPU splash attention against our reference in TPU interpret mode (forward and
gradients): the evidence behind docs/kernels.md's comparison with our flash kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from rlax_tpu.kernels import reference


def test_splash_matches_reference_in_tpu_interpret_mode():
    h, t, d = 1, 128, 128  # one splash tile
    q, k, v, w = (jax.random.normal(jax.random.PRNGKey(i), (h, t, d)) for i in range(4))
    seg = jnp.asarray([1] * 50 + [2] * 78, jnp.int32)  # two packed sequences, no padding
    kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.CausalMask((t, t))] * h), head_shards=1, q_seq_shards=1,
                                block_sizes=sk.BlockSizes(block_q=t, block_kv=t, block_kv_compute=t, block_q_dkv=t,
                                                          block_kv_dkv=t, block_kv_dkv_compute=t, block_q_dq=t,
                                                          block_kv_dq=t))

    def splash(q, k, v):  # no softmax scale inside splash: pre-scale q
        return kernel(q * d**-0.5, k, v, segment_ids=sk.SegmentIds(seg, seg))

    def ref(q, k, v):
        bthd = lambda x: x[None].transpose(0, 2, 1, 3)  # noqa: E731
        out = reference.flash_attention_reference(bthd(q), bthd(k), bthd(v), q_segment_ids=seg[None],
                                                  kv_segment_ids=seg[None])
        return out[0].transpose(1, 0, 2)

    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)  # noqa: E731
    with pltpu.force_tpu_interpret_mode():
        out = splash(q, k, v)
        grads = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(out, ref(q, k, v), atol=1e-5)
    for g, r in zip(grads, jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(g, r, atol=1e-4)
