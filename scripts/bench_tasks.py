"""Reward and tokenizer cost per completion, against decoding the same completion (the work a
worker already does per sample), and GSM8K rewards per second through math-verify's process
pool. Prints JSON; ratio = reward_us / decode_us.

    python scripts/bench_tasks.py [--n 2000]
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlax_tpu import tasks, tokenizer  # noqa: E402
from rlax_tpu.config import get_base_config  # noqa: E402


def _per_item_us(fn, items) -> float:
    t0 = time.perf_counter()
    for x in items:
        fn(x)
    return (time.perf_counter() - t0) / len(items) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    config = get_base_config()
    out = {"n": args.n}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tok = tokenizer.build(config.tokenizer, d, corpus=tasks.get_task(config.task).corpus())
    out["tokenizer_train_s"] = round(time.perf_counter() - t0, 3)
    for name in ("arith", "countdown", "compose"):
        config.task.name = name
        task = tasks.get_task(config.task)
        t0 = time.perf_counter()
        probs = task.train_problems(args.n, seed=0)
        gen_us = (time.perf_counter() - t0) / args.n * 1e6
        pairs = [(p, task.solution_text(p)) for p in probs]
        ids = [tok.encode(s) for _, s in pairs]
        decode_us = _per_item_us(tok.decode, ids)
        reward_us = _per_item_us(lambda ps, t=task: t.reward(*ps), pairs)
        out[name] = {"generate_us": round(gen_us, 1), "decode_us": round(decode_us, 1),
                     "reward_us": round(reward_us, 1),
                     "ratio_reward_over_decode": round(reward_us / decode_us, 2)}
    # GSM8K rewards through math-verify in the process pool, a batch of groups at a time: the
    # worked solutions (all correct) and the same with the final number changed (all wrong).
    config.task.name = "gsm8k"
    task = tasks.get_task(config.task)
    probs = (task.split("train") + task.split("eval"))[:args.n]
    right = [task.solution_text(p) for p in probs]
    wrong = [s.rsplit("####", 1)[0] + "#### 0.5" for s in right]
    t0 = time.perf_counter()
    task.reward(probs[0], right[0])  # starts the pool
    start_s = time.perf_counter() - t0
    rates = {}
    for name, texts in (("correct", right), ("wrong", wrong)):
        t0 = time.perf_counter()
        rs = task.rewards(probs, texts)
        rates[name] = round(len(probs) / (time.perf_counter() - t0), 1)
        assert all(r.correct == (name == "correct") for r in rs), name
    ids = [tok.encode(s) for s in right]
    out["gsm8k_math_verify"] = {"n": len(probs), "workers": int(config.task.reward_workers),
                                "pool_start_s": round(start_s, 2), "rewards_per_s": rates,
                                "decode_us": round(_per_item_us(tok.decode, ids), 1)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
