"""An inference worker process for kill tests: the real queue protocol and rollout path (a tiny
model that often ends its turn, a ChatML tokenizer, a scripted tool environment whose tool sleeps).

    python -m tests.helpers.episode_worker --url file:///tmp/s/ --worker-id w0 --tokenizer DIR

Prints one JSON line per event: ``ready``, ``leased``, ``env_step`` (a tool is running: the
episode is mid-way), ``submitted``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from inference_worker.engine import Engine, SamplingParams
from inference_worker.replay_client import ReplayWorker
from inference_worker.rollout import EpisodeGroup, Rollouts
from rlax_tpu.config import load_config
from rlax_tpu.kvstore import KVStore
from rlax_tpu.tokenizer.hf import HFTokenizer
from tests.helpers.episodes import ScriptedEnv, eos_often_model


def _emit(**event) -> None:
    print(json.dumps(event), flush=True)


class _Loud(ScriptedEnv):
    def step(self, model_turn, num_tokens=None):
        _emit(event="env_step", turn=self.turns + 1)
        return super().step(model_turn, num_tokens)


def episode_config(vocab_size: int):
    return load_config("configs/arith_grpo.py:smoke", {
        "model.vocab_size": vocab_size, "model.hidden_size": 32, "model.intermediate_size": 64,
        "model.num_layers": 1, "env.max_total_tokens": 200})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--worker-id", required=True)
    p.add_argument("--tokenizer", required=True, help="directory of a tokenizer.json (tests/helpers/chatml.py)")
    p.add_argument("--lease-seconds", type=float, default=1.0)
    p.add_argument("--tool-seconds", type=float, default=0.0, help="each tool call sleeps this long")
    args = p.parse_args(argv)

    tok = HFTokenizer(args.tokenizer)
    config = episode_config(tok.vocab_size)
    model, cfg = eos_often_model(config.model, tok.eos_id)
    engine = Engine(model, cfg, max_batch=4, max_seq_len=160, max_prefill_batch=4, decode_chunk=4,
                    max_decode_chunk=16, page_size=8, num_pages=0)
    runner = Rollouts(config, engine, tok,
                      make_env=lambda: _Loud(config, tool_turns=2, sleep_s=args.tool_seconds))
    kv = KVStore.open(args.url)
    worker = ReplayWorker(kv, args.worker_id, lease_seconds=args.lease_seconds, max_leases=1, heartbeat_seconds=1.0)
    worker.start()
    _emit(event="ready", worker=args.worker_id)
    while True:
        leases = worker.lease(1)
        if not leases:
            time.sleep(0.02)
            continue
        (lease,) = leases
        _emit(event="leased", worker=args.worker_id, task=lease.task_id)
        s = lease.task.spec["sampling"]
        params = SamplingParams(temperature=s["temperature"], max_new_tokens=s["max_new_tokens"],
                                n=lease.task.n_samples, seed=lease.task.seed, stop_token_ids=(tok.eos_id,))
        (group,) = runner.run([EpisodeGroup(lease.task.spec["problem"], lease.task.prompt_tokens.tolist(), params)])
        (won,) = worker.submit_many([(lease, [r.sample(0) for r in group], {})])
        _emit(event="submitted", worker=args.worker_id, task=lease.task_id, won=won)


if __name__ == "__main__":
    sys.exit(main())
