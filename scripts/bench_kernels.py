"""Benchmark the Pallas attention kernels against the jnp references; prints one JSON object.

On TPU/GPU the kernels run compiled; on CPU they run in interpret mode, which checks that the
benchmark path works but says nothing about kernel speed (the JSON says so).

    python scripts/bench_kernels.py [--iters N] [--size small|large]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rlax_tpu.kernels import decode_attention, flash_attention  # noqa: E402

SIZES = {
    # name: (flash B, T, Hq, Hkv, D, block; decode B, S, block)
    "small": dict(b=1, t=128, hq=4, hkv=2, d=64, block=64, db=8, ds=256, dblock=64),
    "large": dict(b=4, t=2048, hq=16, hkv=4, d=128, block=128, db=64, ds=4096, dblock=128),
}


def _time(fn, *args, iters: int) -> float:
    """Median seconds per call of a jitted fn (after one warm-up / compile call)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _pair(name: str, make, args, iters: int, extra: dict) -> dict:
    ref = _time(jax.jit(make("reference")), *args, iters=iters)
    pal = _time(jax.jit(make("pallas")), *args, iters=iters)
    return dict(case=name, **extra, reference_ms=round(ref * 1e3, 3), pallas_ms=round(pal * 1e3, 3),
                speedup_vs_reference=round(ref / pal, 3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--size", choices=sorted(SIZES), default=None,
                    help="default: small on CPU, large on an accelerator")
    a = ap.parse_args()
    backend = jax.default_backend()
    sz = SIZES[a.size or ("small" if backend == "cpu" else "large")]
    dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    b, t, hq, hkv, d, blk = sz["b"], sz["t"], sz["hq"], sz["hkv"], sz["d"], sz["block"]
    q = jax.random.normal(ks[0], (b, t, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, t, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, t, hkv, d), dtype)
    shape = dict(shape=f"B{b} T=S{t} Hq{hq} Hkv{hkv} D{d}", dtype=jnp.dtype(dtype).name)

    def fwd(impl):
        return lambda q, k, v: flash_attention(q, k, v, causal=True, impl=impl, block_q=blk, block_k=blk)

    def fwd_bwd(impl):
        def loss(q, k, v):
            return jnp.sum(flash_attention(q, k, v, causal=True, impl=impl, block_q=blk,
                                           block_k=blk).astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))

    db, ds, dblk = sz["db"], sz["ds"], sz["dblock"]
    dq = jax.random.normal(ks[3], (db, hq, d), dtype)
    kc = jax.random.normal(ks[4], (db, hkv, ds, d), dtype)  # head-major cache
    vc = jax.random.normal(ks[5], (db, hkv, ds, d), dtype)
    # Ragged: lengths spread over the cache, mean about half of S (the kernel skips the rest).
    lengths = (jnp.arange(db, dtype=jnp.int32) * (ds // db) + 1).astype(jnp.int32)

    def dec(impl):
        return lambda q, kc, vc, lens: decode_attention(q, kc, vc, lens, impl=impl, block_k=dblk)

    results = [
        _pair("flash_fwd_causal", fwd, (q, k, v), a.iters, shape),
        _pair("flash_fwd_bwd_causal", fwd_bwd, (q, k, v), a.iters, shape),
        _pair("decode_ragged", dec, (dq, kc, vc, lengths), a.iters,
              dict(shape=f"B{db} S{ds} Hq{hq} Hkv{hkv} D{d} mean_len{int(lengths.mean())}",
                   dtype=jnp.dtype(dtype).name)),
    ]
    print(json.dumps(dict(
        backend=backend, device=str(jax.devices()[0].device_kind), jax=jax.__version__,
        pallas_mode="interpret" if backend == "cpu" else "compiled",
        note=("CPU: Pallas runs in interpret mode; these ratios are NOT a kernel speed measure"
              if backend == "cpu" else "compiled kernels vs XLA-compiled jnp reference"),
        iters=a.iters, results=results), indent=1))


if __name__ == "__main__":
    main()
