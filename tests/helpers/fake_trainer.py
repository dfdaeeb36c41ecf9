"""A fake trainer loop over the real replay controller, for the controller-restart kill test.

Prompt i is deterministic; a "training step" appends the admitted prompt ids to ``trained``,
which lives in the checkpoint (like model weights would). The checkpoint (JSON, written
atomically) holds step, prompt cursor, trained ids and the controller state; after it is
committed the controller acknowledges it. The "published weights step" is the step, under
``testing/weights_step``. Killed with -9 and restarted, the final checkpoint must contain every prompt
exactly once.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from rlax_tpu.kvstore import KVStore  # noqa: E402
from trainer.replay_controller import ReplayController  # noqa: E402


def save(path: str, ckpt: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--max-staleness", type=int, default=1)
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--step-seconds", type=float, default=0.05)
    p.add_argument("--pause-after", type=int, default=0,
                   help="once this many steps after the start are done and the next tasks issued, "
                        "print a 'paused' event and wait forever: a fixed point for a test's kill -9")
    args = p.parse_args()

    kv = KVStore.open(args.url)
    ckpt = {"step": 0, "cursor": 0, "trained": [], "replay": None}
    if os.path.exists(args.ckpt):
        with open(args.ckpt) as f:
            ckpt = json.load(f)
    step, cursor, trained = ckpt["step"], ckpt["cursor"], ckpt["trained"]
    ctl = ReplayController(kv, max_in_flight=args.batch * (args.max_staleness + 1),
                           max_staleness=args.max_staleness, state=ckpt["replay"])
    print(json.dumps({"event": "start", "step": step, "cursor": cursor}), flush=True)
    kv.put("testing/weights_step", str(step).encode())
    batch = []
    max_seen_staleness = 0
    start_step = step
    while len(trained) < args.prompts:
        while ctl.free_slots() > 0 and cursor < args.prompts:
            ctl.issue(f"p{cursor}", [cursor, cursor + 1], {"mixed_rewards": True}, 2, weights_step=step)
            cursor += 1
        if args.pause_after and step == start_step + args.pause_after:
            print(json.dumps({"event": "paused", "step": step, "cursor": cursor}), flush=True)
            while True:
                time.sleep(3600)
        res = ctl.poll(step, limit=args.batch - len(batch))
        batch += res.admitted
        if len(batch) < min(args.batch, args.prompts - len(trained)):
            time.sleep(0.01)
            continue
        max_seen_staleness = max([max_seen_staleness] + [a.staleness for a in batch])
        assert max_seen_staleness <= args.max_staleness
        trained += [a.task.prompt_id for a in batch]
        batch = []
        time.sleep(args.step_seconds)
        step += 1
        kv.put("testing/weights_step", str(step).encode())
        print(json.dumps({"event": "step", "step": step}), flush=True)
        if step % args.ckpt_every == 0 or len(trained) >= args.prompts:
            state = ctl.state_dict()
            save(args.ckpt, {"step": step, "cursor": cursor, "trained": trained, "replay": state})
            ctl.ack(state)  # only now may the consumed records go
            print(json.dumps({"event": "ckpt", "step": step}), flush=True)
    print(json.dumps({"event": "done", "step": step, "counters": ctl.counters,
                      "max_staleness": max_seen_staleness}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
