"""Lower the Pallas kernels for TPU (Mosaic) and GPU (Triton) on a machine without either device.

    python scripts/check_kernel_lowering.py [--platform tpu|cuda|both]

Runs the Pallas -> Mosaic / Triton lowering (block-shape rules, dtypes, ops) of every kernel
(flash forward, forward + backward, decode, paged decode, paged prefill) via
`jax.jit(...).trace(...).lower(lowering_platforms=...)` and prints one JSON object. It does NOT
compile to device code or run anything: Mosaic's layout passes and Triton's PTX compilation
happen in the device compilers, absent here. To lower for a device we do not have, it patches
the backend probe (`jax.default_backend`, which picks the kernels' per-backend settings) and,
for TPU, the chip-kind probe of jax's private tpu_info module (pretending a TPU v5e); those
patches live only in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rlax_tpu.kernels import dispatch  # noqa: E402
from rlax_tpu.kernels.decode_attention import decode_attention_pallas  # noqa: E402
from rlax_tpu.kernels.flash_attention import flash_attention_pallas  # noqa: E402


def _cases(d: int) -> dict:
    b, t, hq, hkv = 2, 200, 8, 2  # T not a multiple of the block: exercises the padding path
    bf16, i32 = jnp.bfloat16, jnp.int32
    q = jax.ShapeDtypeStruct((b, t, hq, d), bf16)
    kv = jax.ShapeDtypeStruct((b, t, hkv, d), bf16)
    seg = jax.ShapeDtypeStruct((b, t), i32)

    def flash(q, k, v, s):
        return flash_attention_pallas(q, k, v, q_segment_ids=s, kv_segment_ids=s, causal=True)

    def loss(q, k, v, s):
        return jnp.sum(flash(q, k, v, s).astype(jnp.float32))

    def decode(q, kc, vc, lengths):
        return decode_attention_pallas(q, kc, vc, lengths)

    cache = jax.ShapeDtypeStruct((b, hkv, 1000, d), bf16)  # head-major
    # Paged: 3 sequences (not a power of two), a table of 12 pages of 16, a pool of 40 pages.
    pool = jax.ShapeDtypeStruct((hkv, 40, 16, d), bf16)
    rows, table = jax.ShapeDtypeStruct((3,), i32), jax.ShapeDtypeStruct((3, 12), i32)

    def paged_decode(q, kp, vp, lengths, pi):
        return dispatch.paged_decode_attention(q, kp, vp, lengths, pi, impl="pallas", interpret=False)

    def paged_prefill(q, kp, vp, qs, ql, kl, pi):
        return dispatch.paged_prefill_attention(q, kp, vp, qs, ql, kl, pi, impl="pallas", interpret=False)

    return {
        "flash_fwd": (flash, (q, kv, kv, seg)),
        "flash_fwd_bwd": (jax.grad(loss, argnums=(0, 1, 2)), (q, kv, kv, seg)),
        "decode": (decode, (jax.ShapeDtypeStruct((b, hq, d), bf16), cache, cache,
                            jax.ShapeDtypeStruct((b,), i32))),
        "paged_decode": (paged_decode, (jax.ShapeDtypeStruct((3, hq, d), bf16), pool, pool, rows, table)),
        "paged_prefill": (paged_prefill, (jax.ShapeDtypeStruct((3, 40, hq, d), bf16), pool, pool, rows, rows,
                                          rows, table)),
    }


def _splash_case(d: int) -> tuple:
    """JAX's shipped TPU splash attention (forward + backward), causal with segment ids, for the
    comparison with our flash kernel (docs/kernels.md); T = 256 (splash tiles of 128)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    hq, t = 8, 256
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(hq)])
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1)

    def loss(q, k, v, seg):
        return jnp.sum(kernel(q, k, v, segment_ids=sk.SegmentIds(seg, seg)).astype(jnp.float32))

    x = jax.ShapeDtypeStruct((hq, t, d), jnp.bfloat16)
    return jax.grad(loss, argnums=(0, 1, 2)), (x, x, x, jax.ShapeDtypeStruct((t,), jnp.int32))


def _patch(platform: str) -> None:
    jax.default_backend = lambda: "tpu" if platform == "tpu" else "gpu"
    if platform == "tpu":
        from jax._src.pallas.mosaic import tpu_info

        tpu_info.get_device_kind = lambda: "TPU v5e"
        tpu_info.get_num_device_cores = lambda: 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--platform", choices=("tpu", "cuda", "both"), default="both")
    a = ap.parse_args()
    platforms = ("tpu", "cuda") if a.platform == "both" else (a.platform,)
    results = []
    real_backend = jax.default_backend
    for platform in platforms:
        _patch(platform)
        for d in (64, 128):
            cases = _cases(d)
            if platform == "tpu":
                cases["splash_fwd_bwd (JAX's)"] = _splash_case(d)
            for name, (fn, args) in cases.items():
                try:
                    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
                    results.append(dict(platform=platform, head_dim=d, case=name, lowered=True,
                                        chars=len(text)))
                except Exception as e:  # noqa: BLE001 - report every failure, keep going
                    results.append(dict(platform=platform, head_dim=d, case=name, lowered=False,
                                        error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
        jax.default_backend = real_backend
    print(json.dumps(dict(jax=jax.__version__, note="lowering only; not compiled or run on a device",
                          all_lowered=all(r["lowered"] for r in results), results=results), indent=1))


if __name__ == "__main__":
    main()
