"""Checkpoint write/restore speed of trainer.checkpointing vs. a raw write of the same bytes.

Baseline (same run, same disk): np.ndarray.tofile + fsync of every leaf, and reading it back.
Prints one JSON object. Usage:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python scripts/bench_checkpoint.py [--mib 128] [--dir /tmp/bench_ckpt]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from trainer.checkpointing import Checkpointer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=128, help="total state size")
    ap.add_argument("--dir", default="/tmp/bench_ckpt")
    ap.add_argument("--leaves", type=int, default=8)
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = args.mib * 2**20 // 4 // args.leaves // 1024
    rows -= rows % n
    sharding = NamedSharding(mesh, P("fsdp"))
    state = {f"w{i}": jax.device_put(jnp.full((rows, 1024), float(i), jnp.float32), sharding)
             for i in range(args.leaves)}
    jax.block_until_ready(state)
    nbytes = sum(x.nbytes for x in state.values())

    # Baseline: raw bytes to disk with fsync, then read back.
    raw_dir = os.path.join(args.dir, "raw")
    os.makedirs(raw_dir)
    t0 = time.perf_counter()
    for name, x in state.items():
        path = os.path.join(raw_dir, name)
        with open(path, "wb") as f:
            np.asarray(x).tofile(f)
            f.flush()
            os.fsync(f.fileno())
    raw_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name in state:
        np.fromfile(os.path.join(raw_dir, name), dtype=np.float32)
    raw_read = time.perf_counter() - t0

    ck = Checkpointer(os.path.join(args.dir, "run"), keep=2, async_save=True)
    t0 = time.perf_counter()
    ck.save(1, state, {"meta": {"step": 1}})
    blocking = time.perf_counter() - t0
    ck.wait()
    total = time.perf_counter() - t0
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in state.items()}
    t0 = time.perf_counter()
    got, _ = ck.restore(1, target, ["meta"])
    jax.block_until_ready(got)
    restore = time.perf_counter() - t0
    ck.close()
    mb = nbytes / 1e6
    print(json.dumps({
        "bytes": nbytes, "devices": n,
        "raw_write_MBps": round(mb / raw_write, 1), "raw_read_MBps": round(mb / raw_read, 1),
        "ckpt_save_blocking_s": round(blocking, 3), "ckpt_save_total_s": round(total, 3),
        "ckpt_write_MBps": round(mb / total, 1), "ckpt_restore_MBps": round(mb / restore, 1),
        "write_ratio_vs_raw": round(raw_write / total, 3),
        "restore_ratio_vs_raw": round(raw_read / restore, 3),
        "blocking_fraction": round(blocking / total, 3),
    }))
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
