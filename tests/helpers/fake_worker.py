"""A fake inference worker for tests and benchmarks: the real queue protocol, fake generation.

    python -m tests.helpers.fake_worker --url file:///tmp/s/ --worker-id w0 [--gen-seconds 0.1]

Each leased task is "generated" deterministically from its seed (the same task always yields the
same tokens, log-probs and rewards, whichever worker does it). Prints one JSON line per event
(``leased``, ``submitted``, ``idle_exit``) so a test can wait for a worker to be mid-task.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from inference_worker.replay_client import ReplayWorker, install_sigterm_handler
from rlax_tpu.kvstore import KVStore
from rlax_tpu.replay.records import Sample, Task


def fake_samples(task: Task, weights_step: int, new_tokens: int) -> list[Sample]:
    """Deterministic samples for ``task``: a function of its seed only."""
    rng = np.random.default_rng(task.seed)
    out = []
    for i in range(task.n_samples):
        tokens = rng.integers(0, 32000, size=new_tokens, dtype=np.int32)
        logprobs = -rng.random(new_tokens, dtype=np.float32)
        reward = float(i % 2) if task.spec.get("mixed_rewards", True) else 1.0
        out.append(Sample(tokens, logprobs, weights_step, reward, {"correct": reward}, "length"))
    return out


def _emit(**event) -> None:
    print(json.dumps(event), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--worker-id", required=True)
    p.add_argument("--lease-seconds", type=float, default=1.0)
    p.add_argument("--gen-seconds", type=float, default=0.0, help="fake generation time per task")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--weights-step", type=int, default=0, help="weights step stamped on samples")
    p.add_argument("--weights-step-key", default="", help="store key holding the weights step (overrides)")
    p.add_argument("--batch", type=int, default=1, help="tasks leased at once")
    p.add_argument("--idle-exit", type=float, default=0.0, help="exit after this long without work")
    p.add_argument("--poll", type=float, default=0.02)
    p.add_argument("--max-tasks", type=int, default=0, help="exit after this many tasks (0: never)")
    args = p.parse_args(argv)

    kv = KVStore.open(args.url)
    worker = ReplayWorker(kv, args.worker_id, lease_seconds=args.lease_seconds,
                          max_leases=max(args.batch, 1), heartbeat_seconds=1.0)
    worker.weights_step = args.weights_step
    install_sigterm_handler(worker)
    worker.start()
    worker.heartbeat()
    _emit(event="ready", worker=args.worker_id)
    idle_since = time.time()
    done = 0
    while True:
        leases = worker.lease(args.batch)
        if not leases:
            if args.idle_exit and time.time() - idle_since > args.idle_exit:
                _emit(event="idle_exit", worker=args.worker_id, done=done)
                break
            time.sleep(args.poll)
            continue
        if args.weights_step_key:  # like pulling the newest weights before generating
            raw = kv.get(args.weights_step_key)
            worker.weights_step = int(raw) if raw else args.weights_step
        for lease in leases:
            _emit(event="leased", worker=args.worker_id, task=lease.task_id)
        t0 = time.time()
        if args.gen_seconds:
            time.sleep(args.gen_seconds)
        results = [(lease, fake_samples(lease.task, worker.weights_step, args.new_tokens),
                    {"generate_s": time.time() - t0}) for lease in leases]
        for lease, won in zip(leases, worker.submit_many(results), strict=True):
            _emit(event="submitted", worker=args.worker_id, task=lease.task_id, won=won)
            done += 1
        idle_since = time.time()
        if args.max_tasks and done >= args.max_tasks:
            break
    worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
