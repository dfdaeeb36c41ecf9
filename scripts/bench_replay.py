"""Replay-queue throughput: tasks/s and rollout groups/s through the real protocol.

    python scripts/bench_replay.py [--groups 400] [--samples 8] [--tokens 1024]

file:// with 1 and 4 worker processes (tests/helpers/fake_worker.py) and memory:// in one
process with 1 and 4 worker threads. The controller issues tasks under admission control,
admits every group and acknowledges every 64 admitted (the deletes a checkpoint triggers), so
the figure covers a task's whole life. Baseline, measured in the same run on the same backend:
raw kvstore create + read of a value the size of one encoded rollout group (one "group" of raw
store traffic); ratio = groups/s / baseline. Also measures a worker's lease() poll against the
number of task keys (listing cost at scale). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import tensorstore as ts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from inference_worker.replay_client import ReplayWorker  # noqa: E402
from rlax_tpu import store_layout as keys  # noqa: E402
from rlax_tpu.kvstore import KVStore  # noqa: E402
from rlax_tpu.replay import encode_rollout  # noqa: E402
from rlax_tpu.replay.records import RolloutGroup, Task  # noqa: E402
from tests.helpers.fake_worker import fake_samples  # noqa: E402
from trainer.replay_controller import ReplayController  # noqa: E402


def group_bytes(samples: int, tokens: int) -> bytes:
    task = Task(keys.task_id(0), "p", np.arange(128, dtype=np.int32), {}, samples, 0, 0)
    return encode_rollout(RolloutGroup(task.task_id, tuple(fake_samples(task, 0, tokens)), "w", {}))


def baseline(kv: KVStore, value: bytes, n: int) -> float:
    """Raw store: create + read of rollout-sized values, one after the other (values/s)."""
    t0 = time.perf_counter()
    for i in range(n):
        kv.create(f"baseline/{i:08d}", value)
        kv.get(f"baseline/{i:08d}")
    rate = n / (time.perf_counter() - t0)
    kv.delete_prefix("baseline/")
    return rate


def baseline_concurrent(kv: KVStore, value: bytes, n: int, threads: int = 8) -> float:
    """Raw store: creates of rollout-sized values from ``threads`` threads (writes/s): the
    backend's durable-write limit. A group costs the queue ~4 such writes (task, lease, rollout,
    lease delete) plus 3 deletes at ack."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda i: kv.create(f"baseline/{i:08d}", value), range(n)))
        rate = n / (time.perf_counter() - t0)
    kv.delete_prefix("baseline/")
    return rate


def drive(kv: KVStore, n: int, samples: int, max_in_flight: int) -> dict:
    """Controller loop: issue, admit, ack every 64; returns rates."""
    ctl = ReplayController(kv, max_in_flight=max_in_flight, max_staleness=0)
    prompt = np.arange(128, dtype=np.int32)
    admitted = 0
    polls = 0
    t0 = time.perf_counter()
    while admitted < n:
        k = min(ctl.free_slots(), n - ctl.next_task_number)
        if k > 0:
            ctl.issue_many([dict(prompt_id=f"p{ctl.next_task_number + i}", prompt_tokens=prompt,
                                 spec={"mixed_rewards": True}, n_samples=samples) for i in range(k)], 0)
        got = len(ctl.poll(0).admitted)
        polls += 1
        admitted += got
        if len(ctl.state_dict()["consumed"]) >= 64 or admitted >= n:
            ctl.ack(ctl.state_dict())
        if not got:
            time.sleep(0.002)
    dt = time.perf_counter() - t0
    ctl.close()
    return {"groups": n, "seconds": round(dt, 3), "tasks_per_s": round(ctl.counters["issued"] / dt, 1),
            "groups_per_s": round(n / dt, 1), "controller_polls": polls}


def run_file(root: str, workers: int, args, base: float) -> dict:
    url = f"file://{root}/q{workers}/"
    kv = KVStore.open(url)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.helpers.fake_worker", "--url", url,
                               "--worker-id", f"w{i}", "--lease-seconds", "10", "--batch", "4",
                               "--new-tokens", str(args.tokens), "--poll", "0.002"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
             for i in range(workers)]
    try:
        while len(kv.list(keys.WORKERS)) < workers:  # started (heartbeat written)
            time.sleep(0.05)
        out = drive(kv, args.groups, args.samples, args.max_in_flight)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
    return {"backend": "file", "workers": workers, "kind": "processes", **out,
            "ratio_to_baseline": round(out["groups_per_s"] / base, 3)}



def run_memory(workers: int, args, base_kv: KVStore, base: float) -> dict:
    kv = base_kv
    stop = threading.Event()

    def loop(wid: str) -> None:
        w = ReplayWorker(kv, wid, lease_seconds=10, max_leases=4, heartbeat_seconds=10.0)
        while not stop.is_set():
            leases = w.lease(4)
            if not leases:
                time.sleep(0.002)
            w.submit_many([(lease, fake_samples(lease.task, 0, args.tokens), None) for lease in leases])

    threads = [threading.Thread(target=loop, args=(f"t{i}",), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    try:
        out = drive(kv, args.groups, args.samples, args.max_in_flight)
    finally:
        stop.set()
        for t in threads:
            t.join()
    kv.delete_prefix("")
    return {"backend": "memory", "workers": workers, "kind": "threads", **out,
            "ratio_to_baseline": round(out["groups_per_s"] / base, 3)}



def listing_cost(root: str) -> list[dict]:
    """One idle worker poll (3 key listings + a bounded expiry scan) vs keys in the queue."""
    out = []
    for n in (100, 1000, 5000):
        kv = KVStore.open(f"file://{root}/list{n}/")
        # Fill the store quickly (no fsync: setup only, not measured).
        fill = ts.KvStore.open({"driver": "file", "path": f"{root}/list{n}/"},
                               context=ts.Context({"file_io_sync": False})).result()
        lease = json.dumps({"worker": "x", "token": "t", "expires_at": time.time() + 3600}).encode()
        futures = []
        for i in range(n):  # every task leased: the worst case, nothing free to take
            futures.append(fill.write(keys.TASKS + keys.task_id(i), b"x"))
            futures.append(fill.write(keys.LEASES + keys.task_id(i), lease))
        for f in futures:
            f.result()
        w = ReplayWorker(kv, "probe", lease_seconds=60, max_leases=4, heartbeat_seconds=10.0)
        t0 = time.perf_counter()
        reps = 5
        for _ in range(reps):
            w._last_expiry_scan = 0.0  # force the expiry scan each time (worst case)
            assert w.lease(1) == []
        out.append({"task_keys": n, "idle_poll_ms": round((time.perf_counter() - t0) / reps * 1e3, 2)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--groups", type=int, default=400)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--max-in-flight", type=int, default=64)
    p.add_argument("--workers", default="1,4")
    args = p.parse_args()
    value = group_bytes(args.samples, args.tokens)
    counts = [int(w) for w in args.workers.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as root:
        fkv = KVStore.open(f"file://{root}/base/")
        mkv = KVStore.open("memory://")
        base = {"file": baseline(fkv, value, 300), "memory": baseline(mkv, value, 300)}
        conc = {"file": baseline_concurrent(fkv, value, 300), "memory": baseline_concurrent(mkv, value, 300)}
        load = os.getloadavg()[0]
        for w in counts:
            results.append(run_file(root, w, args, base["file"]))
        for w in counts:
            results.append(run_memory(w, args, mkv, base["memory"]))
        listing = listing_cost(root)
    for r in results:
        r["ratio_to_concurrent_writes"] = round(r["groups_per_s"] / conc[r["backend"]], 3)
    print(json.dumps({
        "record_bytes": len(value), "samples": args.samples, "tokens": args.tokens,
        "max_in_flight": args.max_in_flight, "cpus": os.cpu_count(),
        "load_avg_1m_at_start": round(load, 1),
        "baseline_create_read_per_s": {k: round(v, 1) for k, v in base.items()},
        "baseline_concurrent_creates_per_s": {k: round(v, 1) for k, v in conc.items()},
        "results": results, "listing": listing,
    }, indent=1))


if __name__ == "__main__":
    main()
