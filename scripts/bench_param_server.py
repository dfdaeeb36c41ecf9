#!/usr/bin/env python
"""Param-server throughput against this disk's own bandwidth, measured in the same run.

    python scripts/bench_param_server.py [--size_mb=1024] [--dir=/tmp/x] [--chunk_mib=32]

Baseline: a plain file of the same size written with os.write + fsync, then read back (page cache
evicted with posix_fadvise before every read, the same for the raw file and the store). Measures
publish (device -> host -> zarr3 chunks with crc32c, fsync, manifest, CAS), pull into the same
layout, and pull into another mesh (fsdp x tensor -> tensor only). Prints one JSON object.
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--size_mb", type=float, default=1024, help="total bytes of published (bf16) weights")
parser.add_argument("--dir", default="", help="directory on the disk to measure (default: a temp dir)")
parser.add_argument("--leaves", type=int, default=32)
parser.add_argument("--chunk_mib", type=float, default=32)
parser.add_argument("--io_concurrency", type=int, default=32)
parser.add_argument("--compression", default="none", choices=["none", "zstd"])
parser.add_argument("--no_fsync", action="store_true", help="file_io_sync=False for the store")
parser.add_argument("--devices", type=int, default=8)
parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; best reported")
args = parser.parse_args()

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from param_server import ParamStore, publish  # noqa: E402

MB = 1e6
COLS = 4096


def evict(path: str) -> None:
    """Drops clean pages of every file under ``path`` from the page cache."""
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def raw_disk(path: str, nbytes: int) -> dict:
    block = np.random.default_rng(0).integers(0, 255, 64 * 2**20, np.uint8).tobytes()
    fname = os.path.join(path, "raw.bin")
    t = time.perf_counter()
    with open(fname, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(block[: min(left, len(block))])
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t
    evict(path)
    t = time.perf_counter()
    with open(fname, "rb", buffering=0) as f:
        while f.read(64 * 2**20):
            pass
    read_s = time.perf_counter() - t
    os.remove(fname)
    return {"raw_write_fsync_MBps": nbytes / write_s / MB, "raw_read_MBps": nbytes / read_s / MB}


def make_params(mesh, nbytes: int, leaves: int):
    rows = max(8, int(nbytes / leaves / COLS / 2) // 8 * 8)
    sharding = NamedSharding(mesh, P("fsdp", "tensor"))
    params = {}
    for i in range(leaves):
        key = jax.random.key(i)
        params[f"layers/{i}/w"] = jax.jit(lambda k, r=rows: jax.random.normal(k, (r, COLS), jnp.bfloat16),
                                          out_shardings=sharding)(key)
    return {"layers": {str(i): {"w": params[f"layers/{i}/w"]} for i in range(leaves)}}


def main() -> None:
    base = args.dir or tempfile.mkdtemp(prefix="bench_ps_")
    os.makedirs(base, exist_ok=True)
    try:
        nbytes = int(args.size_mb * MB)
        out = {"size_mb": args.size_mb, "leaves": args.leaves, "chunk_mib": args.chunk_mib,
               "io_concurrency": args.io_concurrency, "compression": args.compression,
               "file_io_sync": not args.no_fsync, "devices": args.devices, "cpus": os.cpu_count()}
        n = args.devices
        train = jax.make_mesh((n // 2, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        infer = jax.make_mesh((n,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
        params = make_params(train, nbytes, args.leaves)
        jax.block_until_ready(params)
        size = sum(x.nbytes for x in jax.tree.leaves(params))
        out["published_mb"] = size / MB
        store = ParamStore.open(f"file://{base}/store", chunk_mib=args.chunk_mib,
                                compression=args.compression, io_concurrency=args.io_concurrency,
                                file_io_sync=not args.no_fsync)
        t = time.perf_counter()
        publish.snapshot(params, 0, "bfloat16", int(args.chunk_mib * 2**20))
        out["snapshot_s"] = time.perf_counter() - t  # the part publish_async blocks the trainer for

        def target(mesh, spec):
            sharding = NamedSharding(mesh, spec)
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), params)

        targets = (("pull", target(train, P("fsdp", "tensor"))),
                   ("pull_reshard", target(infer, P(None, "tensor"))))
        runs = {k: [] for k in ("raw_write_fsync_MBps", "raw_read_MBps", "publish_MBps", "pull_MBps",
                                "pull_reshard_MBps")}
        # Interleaved repeats, best of each: the machine is shared, so single runs are noisy.
        for step in range(args.repeats):
            for k, v in raw_disk(base, nbytes).items():
                runs[k].append(v)
            t = time.perf_counter()
            version = store.publish(params, step=step)
            runs["publish_MBps"].append(size / (time.perf_counter() - t) / MB)
            store.gc(keep=1)
            for name, tgt in targets:
                evict(base)
                t = time.perf_counter()
                pulled, _ = store.pull(tgt, version)
                jax.block_until_ready(pulled)
                runs[f"{name}_MBps"].append(size / (time.perf_counter() - t) / MB)
                del pulled
        for k, vals in runs.items():
            out[k] = max(vals)
            out[k + "_all"] = [round(v, 1) for v in vals]
        out["publish_vs_raw_write"] = out["publish_MBps"] / out["raw_write_fsync_MBps"]
        out["pull_vs_raw_read"] = out["pull_MBps"] / out["raw_read_MBps"]
        out["pull_reshard_vs_raw_read"] = out["pull_reshard_MBps"] / out["raw_read_MBps"]
        out["reshard_pull_extra_cost"] = out["pull_MBps"] / out["pull_reshard_MBps"] - 1.0
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
