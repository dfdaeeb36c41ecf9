#!/usr/bin/env python
"""Weight sync per RL update: LoRA (adapter-only versions, merged by the reader) vs full versions.

    python scripts/bench_lora_sync.py [--updates=5] [--rank=8] [--alpha=32] [--publish_dtype=bfloat16] [--dir=/tmp/x]

SmolLM2-135M-Instruct (the fetch cache's GGUF, float32) with adapters on every projection. Each
update moves every adapter element by lr x N(0, 1) (Adam's per-element step size). Baseline, in
the same run: full fine-tuning's sync, where each update publishes the whole model (the merged
weights) and a worker pulls all of it. LoRA: the base is published once (reported apart), each
update publishes the adapters only and a worker that holds the base pulls them and merges them
into its pristine base copy (param_server.adapters.AdapterReader). Per update: bytes on disk,
publish seconds, worker seconds to the new weights (median over updates). Prints one JSON object.
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--updates", type=int, default=5)
parser.add_argument("--rank", type=int, default=8)
parser.add_argument("--alpha", type=float, default=32.0)
parser.add_argument("--lr", type=float, default=1e-4)
parser.add_argument("--publish_dtype", default="bfloat16")
parser.add_argument("--dir", default="", help="directory for the stores (default: a temp dir)")
args = parser.parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from param_server import ParamStore  # noqa: E402
from param_server.adapters import AdapterPublisher, AdapterReader  # noqa: E402
from rlax_tpu import models  # noqa: E402
from rlax_tpu.config.sections.lora import TARGETS  # noqa: E402
from rlax_tpu.models import LoraSpec, lora  # noqa: E402
from rlax_tpu.models.fetch import cached_path  # noqa: E402


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    root_dir = args.dir or tempfile.mkdtemp(prefix="bench_lora_")
    model, cfg = models.load(cached_path("smollm2"))
    base = nnx.to_pure_dict(nnx.state(model))
    spec = LoraSpec(args.rank, args.alpha, TARGETS, dropout=0.0)
    start = models.init_adapters(cfg, spec, seed=0)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, args.publish_dtype, sharding=dev), base)
    a_target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, "float32", sharding=dev), start)
    merge = jax.jit(lambda b, a: lora.merge(b, a, spec.scale))

    full = ParamStore.open(f"file://{root_dir}/full/", publish_dtype=args.publish_dtype)
    root = ParamStore.open(f"file://{root_dir}/lora/", publish_dtype=args.publish_dtype)
    root.acquire_epoch()
    pub = AdapterPublisher(root)
    t0 = time.perf_counter()
    pub.publish_base(base)
    base_publish_s = time.perf_counter() - t0
    reader = AdapterReader(root, target, a_target, spec, name="bench")
    rows = {"full": [], "lora": []}
    adapters = start
    rng = np.random.default_rng(0)
    for k in range(args.updates + 1):  # update 0 warms up (compiles the merge, first base pull)
        adapters = jax.tree.map(lambda x: x + args.lr * rng.standard_normal(x.shape).astype(np.float32), adapters)
        weights = jax.block_until_ready(merge(base, adapters))  # what full fine-tuning would publish
        for kind, store, tree in (("full", full, weights), ("lora", pub.store, adapters)):
            before = du(os.path.join(root_dir, kind))
            t0 = time.perf_counter()
            v = store.publish(tree, k, meta=pub.meta(spec) if kind == "lora" else None)
            publish_s = time.perf_counter() - t0
            nbytes = du(os.path.join(root_dir, kind)) - before
            t0 = time.perf_counter()
            got = full.read(target, v)[0] if kind == "full" else reader.read(v)[0]
            jax.block_until_ready(got)
            worker_s = time.perf_counter() - t0
            if k:
                rows[kind].append({"bytes": nbytes, "publish_s": publish_s, "worker_s": worker_s})
    med = {kind: {f: statistics.median(r[f] for r in rs) for f in ("bytes", "publish_s", "worker_s")}
           for kind, rs in rows.items()}
    out = {
        "model": "SmolLM2-135M-Instruct", "publish_dtype": args.publish_dtype, "rank": args.rank,
        "alpha": args.alpha, "targets": list(TARGETS), "updates": args.updates,
        "adapter_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(start)),
        "model_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base)),
        "base_once": {"bytes": du(os.path.join(root_dir, "lora", "params", "base")), "publish_s": base_publish_s},
        "per_update_median": med,
        "ratio_lora_vs_full": {f: med["lora"][f] / med["full"][f] for f in ("bytes", "publish_s", "worker_s")},
        "per_update": rows,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
