#!/usr/bin/env python
"""Param-server throughput against this disk's own bandwidth, and full vs delta updates.

    python scripts/bench_param_server.py [--size_mb=1024] [--dir=/tmp/x] [--chunk_mib=32] [--warm]
    python scripts/bench_param_server.py --updates=10 --model=smollm2|random1b [--dtypes=bfloat16,float32]
    python scripts/bench_param_server.py --from_store=file:///RUN/store/ [--dtypes=bfloat16]
    python scripts/bench_param_server.py --canary_steps=5 [--lr=1e-6]

Disk mode. Baseline: a plain file of the same size written with os.write + fsync, then read back
in 64 MiB reads through the page cache and again with O_DIRECT (the disk's own bandwidth).
Before every read the page cache is evicted with posix_fadvise (``--warm``: never), the same for
the raw file and the store. Measures publish (device -> host -> zarr3 chunks with crc32c, fsync,
manifest, CAS), pull into the same layout, and pull into another mesh (fsdp x tensor -> tensor).

Updates mode: f32 master weights take ``--updates`` Adam-like steps (every element moves by
lr x N(0, 1), Adam's per-element step size, plus decoupled weight decay), each published in each
dtype as a full version and as deltas (sparse, xor) with one keyframe before them. Per update:
bytes written (on disk) and publish seconds; a follower that holds the previous version reaches
the new one (seconds); at the end a late joiner reads the newest version from scratch.

From-store mode: the versions a training run published (e.g. with store.delta on): each one's
kind and bytes on disk, and the same weights re-published in each of ``--dtypes`` full and as
deltas (sparse, xor), bytes per version.

Canary mode: the policy-landed check's figures on the real SmolLM2-135M: a landed policy's
distance from the trainer's, and how far each Adam-like update moves them (against
store.canary_tolerance).

Prints one JSON object.
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
parser.add_argument("--buffered", action="store_true", help="direct_io=False: pulls read through the page cache")
parser.add_argument("--devices", type=int, default=8)
parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; best reported")
parser.add_argument("--warm", action="store_true", help="no page-cache eviction before reads (raw and store)")
parser.add_argument("--updates", type=int, default=0, help="updates mode: consecutive updates to publish")
parser.add_argument("--model", default="smollm2", choices=["smollm2", "random1b"])
parser.add_argument("--dtypes", default="bfloat16,float32")
parser.add_argument("--encodings", default="full,sparse,xor")
parser.add_argument("--lr", type=float, default=1e-6)
parser.add_argument("--from_store", default="", help="from-store mode: the store URL of a finished run")
parser.add_argument("--canary_steps", type=int, default=0,
                    help="canary mode: how far the policy-landed check's log-probs move per update")
args = parser.parse_args()
if args.updates or args.from_store:
    args.devices = 1

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import itertools  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from param_server import ParamStore, file_reads, publish  # noqa: E402

MB = 1e6
COLS = 4096


def evict(path: str) -> None:
    """Drops clean pages of every file under ``path`` from the page cache (not with --warm)."""
    if args.warm:
        return
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
    evict(path)
    buf = file_reads._aligned(64 * 2**20)  # O_DIRECT: block-aligned buffer and requests
    fd = os.open(fname, os.O_RDONLY | os.O_DIRECT)
    t = time.perf_counter()
    try:
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)
    direct_s = time.perf_counter() - t
    os.remove(fname)
    return {"raw_write_fsync_MBps": nbytes / write_s / MB, "raw_read_MBps": nbytes / read_s / MB,
            "raw_read_direct_MBps": nbytes / direct_s / MB}


def make_params(mesh, nbytes: int, leaves: int):
    rows = max(8, int(nbytes / leaves / COLS / 2) // 8 * 8)
    sharding = NamedSharding(mesh, P("fsdp", "tensor"))
    params = {}
    for i in range(leaves):
        key = jax.random.key(i)
        params[f"layers/{i}/w"] = jax.jit(lambda k, r=rows: jax.random.normal(k, (r, COLS), jnp.bfloat16),
                                          out_shardings=sharding)(key)
    return {"layers": {str(i): {"w": params[f"layers/{i}/w"]} for i in range(leaves)}}


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


MASTER_DIR = ""


def model_weights() -> dict:
    """f32 host weights: the real SmolLM2-135M, or a random model of Llama-3.2-1B's shapes."""
    if args.model == "smollm2":
        from flax import nnx

        from rlax_tpu import models
        from rlax_tpu.models import fetch

        model, _ = models.load(fetch.fetch("smollm2"), dtype="float32")
        return jax.tree.map(np.array, nnx.to_pure_dict(nnx.split(model)[1]))  # writable copies
    # Master weights in files mapped into memory: their pages are page cache, not process memory
    # (5 GB of f32 on a shared machine), and updates write through.
    rng, files = np.random.default_rng(0), itertools.count()
    d, f, kv, vocab = 2048, 8192, 512, 128256

    def w(*shape):
        x = np.lib.format.open_memmap(os.path.join(MASTER_DIR, f"{next(files)}.npy"), "w+", np.float32, shape)
        for i in range(0, shape[0], 1024):
            x[i:i + 1024] = rng.standard_normal((min(1024, shape[0] - i),) + shape[1:], np.float32) * 0.02
        return x

    layer = lambda: {"q": w(d, d), "k": w(d, kv), "v": w(d, kv), "o": w(d, d), "gate": w(d, f),  # noqa: E731
                     "up": w(d, f), "down": w(f, d), "norm1": np.ones(d, np.float32), "norm2": np.ones(d, np.float32)}
    return {"embed": w(vocab, d), "layers": [layer() for _ in range(16)], "norm": np.ones(d, np.float32)}


def adam_like_step(weights: dict, step: int) -> None:
    """In place: w -= lr * (N(0, 1) + 0.01 * w), a fresh draw per element and step."""
    rng, lr = np.random.default_rng(1000 + step), np.float32(args.lr)
    for x in jax.tree.leaves(weights):
        for i in range(0, x.shape[0], 4096):  # in row blocks: bounded temporaries
            block = x[i:i + 4096]
            block -= lr * (rng.standard_normal(block.shape, np.float32) + np.float32(0.01) * block)


def updates_mode(base: str) -> dict:
    from param_server import delta

    global MASTER_DIR
    MASTER_DIR = os.path.join(base, "master")
    os.makedirs(MASTER_DIR, exist_ok=True)
    master = model_weights()
    names = [n for n, _ in publish.layout.flatten(master)[0]]
    nelem = sum(x.size for x in jax.tree.leaves(master))
    del master  # each run rebuilds the same weights: no second f32 copy in memory
    out = {"model": args.model, "params": nelem, "updates": args.updates, "lr": args.lr, "cpus": os.cpu_count(),
           "runs": {}}
    for dtype in args.dtypes.split(","):
        for enc in args.encodings.split(","):
            weights = model_weights()
            url = f"file://{base}/{dtype}-{enc}"
            opts = dict(publish_dtype=dtype, delta=enc != "full", delta_encoding="xor" if enc == "xor" else "sparse",
                        keyframe_every=args.updates + 1, chunk_mib=args.chunk_mib, io_concurrency=args.io_concurrency)
            store, reader = ParamStore.open(url, **opts), ParamStore.open(url, **opts)
            store.publish(weights, 0)
            held = reader.read_host(1, names)
            full_bytes = du(f"{base}/{dtype}-{enc}/params/{store.committed_dir(1)}")
            rows = []
            for u in range(1, args.updates + 1):
                adam_like_step(weights, u)
                t = time.perf_counter()
                v = store.publish(weights, u)
                pub_s = time.perf_counter() - t
                m = store.read_manifest(v)
                evict(base)
                t = time.perf_counter()
                held = reader.read_host(v, names, held if enc != "full" else None)
                follow_s = time.perf_counter() - t
                changed = sum(e.get("changed", 0) for e in m["leaves"].values()) if enc != "full" else nelem
                rows.append({"version": v, "kind": m["kind"], "bytes": du(f"{base}/{dtype}-{enc}/params/{m['dir']}"),
                             "publish_s": round(pub_s, 3), "follow_s": round(follow_s, 3),
                             "changed_frac": round(changed / nelem, 5)})
            crcs = [delta.crc32c(held.arrays[n]) for n in names]
            del store, held, weights  # frees the publisher's and the follower's host copies
            evict(base)
            late = ParamStore.open(url, **opts)
            t = time.perf_counter()
            joined = late.read_host(v, names)
            late_s = time.perf_counter() - t
            assert [delta.crc32c(joined.arrays[n]) for n in names] == crcs, "late joiner and follower disagree"
            upd_bytes = [r["bytes"] for r in rows]
            out["runs"][f"{dtype}/{enc}"] = {
                "keyframe_bytes": full_bytes, "update_bytes_mean": sum(upd_bytes) / len(rows),
                "update_vs_full_bytes": sum(upd_bytes) / len(rows) / full_bytes,
                "publish_s_mean": sum(r["publish_s"] for r in rows) / len(rows),
                "follow_s_mean": sum(r["follow_s"] for r in rows) / len(rows),
                "late_join_s": round(late_s, 3), "changed_frac_mean": sum(r["changed_frac"] for r in rows) / len(rows),
                "per_update": rows}
            print(json.dumps({f"{dtype}/{enc}": {k: v for k, v in out["runs"][f"{dtype}/{enc}"].items()
                                                 if k != "per_update"}}), file=sys.stderr, flush=True)
            del reader, late, joined
            shutil.rmtree(f"{base}/{dtype}-{enc}", ignore_errors=True)
    return out


def from_store_mode(base: str) -> dict:
    src = ParamStore.open(args.from_store)
    versions = src.versions()
    names = sorted(src.read_manifest(versions[0])["leaves"])
    root = args.from_store[len("file://"):]
    out = {"store": args.from_store, "versions": [], "republished": {}}
    dsts = {f"{d}/{e}": ParamStore.open(f"file://{base}/{d}-{e}", publish_dtype=d, delta=e != "full",
                                        delta_encoding="xor" if e == "xor" else "sparse",
                                        keyframe_every=len(versions) + 1)
            for d in args.dtypes.split(",") for e in args.encodings.split(",")}
    held = None
    for v in versions:
        held = src.read_host(v, names, held)
        m = held.manifest
        out["versions"].append({"version": v, "step": m["step"], "kind": m["kind"], "dtype": m["publish_dtype"],
                                "bytes": du(os.path.join(root, src.keys.dir_prefix(m["dir"])))})
        for key, dst in dsts.items():
            dv = dst.publish(dict(held.arrays), m["step"])
            dm = dst.read_manifest(dv)
            out["republished"].setdefault(key, []).append(du(f"{base}/{key.replace('/', '-')}/params/{dm['dir']}"))
    for key, sizes in out["republished"].items():
        out[f"{key}_update_vs_full_bytes"] = sum(sizes[1:]) / max(1, len(sizes) - 1) / sizes[0]
    sizes = [x["bytes"] for x in out["versions"]]
    out["run_update_vs_full_bytes"] = sum(sizes[1:]) / max(1, len(sizes) - 1) / sizes[0]
    return out


def canary_mode() -> dict:
    """The canary log-probs (store defaults: 2 x 16 tokens, bf16 publish) of the real model: how
    far a landed policy's figures are from the trainer's (weights sharded 8 ways over tensor vs
    one host copy), and how far each of ``--canary_steps`` Adam-like updates moves them."""
    from flax import nnx

    from rlax_tpu import canary, models
    from rlax_tpu.config.sections import store as store_section
    from rlax_tpu.models import fetch

    sc = store_section.defaults()
    model, cfg = models.load(fetch.fetch("smollm2"), dtype="float32")
    weights = jax.tree.map(np.array, nnx.to_pure_dict(nnx.split(model)[1]))
    del model
    tokens = canary.canary_tokens(sc.canary_prompts, sc.canary_tokens, cfg.vocab_size)
    mesh = jax.make_mesh((args.devices,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))

    def sharded(x):  # as a worker holds them: bf16, split over 'tensor' where the rows divide
        spec = P("tensor") if x.ndim and x.shape[0] % args.devices == 0 else P()
        return jax.device_put(x.astype(jnp.bfloat16), NamedSharding(mesh, spec))

    ref = canary.logprobs(cfg, weights, tokens, sc.publish_dtype)
    held = canary.logprobs(cfg, jax.tree.map(sharded, weights), tokens, sc.publish_dtype)
    out = {"lr": args.lr, "tolerance": sc.canary_tolerance, "tokens": list(tokens.shape),
           "landed_max_dlogp": float(np.abs(ref - held).max()), "step_max_dlogp": [], "from_start_max_dlogp": []}
    prev = start = ref
    for u in range(1, args.canary_steps + 1):
        adam_like_step(weights, u)
        now = canary.logprobs(cfg, weights, tokens, sc.publish_dtype)
        out["step_max_dlogp"].append(round(float(np.abs(now - prev).max()), 6))
        out["from_start_max_dlogp"].append(round(float(np.abs(now - start).max()), 6))
        prev = now
    return out


def main() -> None:
    if args.canary_steps:
        print(json.dumps(canary_mode()))
        return
    base = args.dir or tempfile.mkdtemp(prefix="bench_ps_")
    os.makedirs(base, exist_ok=True)
    if args.updates or args.from_store:
        try:
            print(json.dumps(updates_mode(base) if args.updates else from_store_mode(base)))
        finally:
            if not args.dir:
                shutil.rmtree(base, ignore_errors=True)
        return
    try:
        nbytes = int(args.size_mb * MB)
        out = {"size_mb": args.size_mb, "leaves": args.leaves, "chunk_mib": args.chunk_mib,
               "cache": "warm" if args.warm else "evicted (posix_fadvise DONTNEED) before each read",
               "io_concurrency": args.io_concurrency, "compression": args.compression,
               "file_io_sync": not args.no_fsync, "direct_io": not args.buffered, "devices": args.devices,
               "cpus": os.cpu_count()}
        n = args.devices
        train = jax.make_mesh((n // 2, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        infer = jax.make_mesh((n,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
        params = make_params(train, nbytes, args.leaves)
        jax.block_until_ready(params)
        size = sum(x.nbytes for x in jax.tree.leaves(params))
        out["published_mb"] = size / MB
        store = ParamStore.open(f"file://{base}/store", chunk_mib=args.chunk_mib,
                                compression=args.compression, io_concurrency=args.io_concurrency,
                                file_io_sync=not args.no_fsync, direct_io=not args.buffered)
        t = time.perf_counter()
        publish.snapshot(params, 0, "bfloat16", int(args.chunk_mib * 2**20))
        out["snapshot_s"] = time.perf_counter() - t  # the part publish_async blocks the trainer for

        def target(mesh, spec):
            sharding = NamedSharding(mesh, spec)
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), params)

        targets = (("pull", target(train, P("fsdp", "tensor"))),
                   ("pull_reshard", target(infer, P(None, "tensor"))))
        runs = {k: [] for k in ("raw_write_fsync_MBps", "raw_read_MBps", "raw_read_direct_MBps", "publish_MBps",
                                "pull_MBps",
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
        out["pull_vs_raw_read_direct"] = out["pull_MBps"] / out["raw_read_direct_MBps"]
        # Per repeat (each figure against the raw file of the same repeat) and their median: less
        # moved by one outlier than best vs best on a shared machine.
        for fig, raw in (("pull", "raw_read"), ("pull", "raw_read_direct"), ("publish", "raw_write_fsync")):
            each = [a / b for a, b in zip(runs[f"{fig}_MBps"], runs[f"{raw}_MBps"], strict=True)]
            out[f"{fig}_vs_{raw}_each"] = [round(x, 3) for x in each]
            out[f"{fig}_vs_{raw}_median"] = float(np.median(each))
        out["pull_reshard_vs_raw_read"] = out["pull_reshard_MBps"] / out["raw_read_MBps"]
        out["reshard_pull_extra_cost"] = out["pull_MBps"] / out["pull_reshard_MBps"] - 1.0
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
