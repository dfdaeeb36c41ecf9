"""SFT traces from an environment's solved episodes: the reference model turns (data, not model
samples) with the environment's actual replies (its tools really run, in the sandbox), laid out
by envs.Episode, the same builder the rollouts use, so SFT trains on the token layout RL samples.

Tools run where episodes run, never in the trainer: traces are written to a JSONL file first,

    python -m rlax_tpu.envs.traces --config=configs/tool_arith_smollm2.py --out=PATH

and the trainer's SFT warm start reads config.sft.traces_path (one episode's messages a line).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.envs.base import Environment
from rlax_tpu.envs.episode import EnvTurnRenderer, Episode, episode_prompt
from rlax_tpu.tasks.base import Problem
from rlax_tpu.tokenizer.base import Tokenizer

SFT_SEED_OFFSET = 17  # the SFT problems' seed is config.seed + this (as the task traces')


def reference_episode(env: Environment, problem: Problem) -> dict[str, Any] | None:
    """One solved episode {env, prompt_id, prompt, turns: [{model, env}], tools, info}, or None
    when the reference does not solve it (a tool the infrastructure failed, no reference)."""
    turns_text = env.reference_turns(problem)
    if not turns_text:
        return None
    prompt = env.reset(problem)
    turns, info, done = [], {}, False
    for text in turns_text:
        if done:
            return None
        new, _, done, info = env.step(text)
        turns.append({"model": text, "env": new})
    if not done or info.get("masked") or not info.get("correct"):
        return None
    counters = {k: info[k] for k in ("turns", "tool_calls", "malformed_calls", "tool_errors")}
    return {"env": env.name, "prompt_id": problem.prompt_id, "prompt": prompt, "turns": turns,
            "tools": env.tool_schemas(), "info": counters}


def episode_tokens(tok: Tokenizer, trace: dict[str, Any]) -> Episode:
    """The trace as an Episode: model turns encoded once (plus end-of-turn, loss mask 1), each
    environment turn the chat template's delta (loss mask 0)."""
    tools = trace.get("tools") or None
    ep = Episode(EnvTurnRenderer(tok, tools=tools), episode_prompt(tok, trace["prompt"], tools=tools),
                 trace["prompt"])
    for turn in trace["turns"]:
        ep.add_model_turn(text=turn["model"])
        if turn["env"]:
            ep.add_env_turn(turn["env"])
    return ep


def sft_row(ep: Episode) -> tuple[list[int], list[int]]:
    """(prompt + episode tokens, loss mask over them: prompt tokens 0)."""
    return ep.prompt + ep.tokens, [0] * len(ep.prompt) + ep.loss_mask


def write_traces(env: Environment, n: int, seed: int, path: str) -> int:
    """Solved reference episodes of the first n training problems of seed, to path; returns how
    many were written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    written = 0
    with open(path + ".tmp", "w") as f:
        for problem in env.train_problems(n, seed):
            trace = reference_episode(env, problem)
            if trace is not None:
                f.write(json.dumps(trace) + "\n")
                written += 1
    os.replace(path + ".tmp", path)
    return written


def read_traces(path: str, env_name: str, n: int) -> list[dict[str, Any]]:
    """The first n traces of path, checked against the configured environment."""
    field = "sft.traces_path"
    if not os.path.exists(path):
        raise ConfigError(field, f"{path!r} does not exist (write it with python -m rlax_tpu.envs.traces)")
    traces = []
    with open(path) as f:
        for i, line in enumerate(f):
            if len(traces) == n:
                break
            trace = json.loads(line)
            if trace.get("env") != env_name:
                raise ConfigError(field, f"{path}:{i + 1} is a trace of env {trace.get('env')!r}, "
                                         f"not env.name={env_name!r}")
            traces.append(trace)
    if len(traces) < n:
        raise ConfigError(field, f"{path} has {len(traces)} traces; sft.steps x sft.batch_size needs {n}")
    return traces


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import tempfile

    from rlax_tpu import envs
    from rlax_tpu import tokenizer as tokenizer_lib
    from rlax_tpu.config import load_config
    from rlax_tpu.sandbox import SandboxPool

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/X.py[:variant]")
    parser.add_argument("--out", default="", help="JSONL to write (default config.sft.traces_path)")
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    out = args.out or config.sft.traces_path
    if not config.env.name or not out:
        raise SystemExit("rlax_tpu.envs.traces: needs env.name and --out (or sft.traces_path)")
    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer_lib.build(config, tmp, corpus=None)
    pool = SandboxPool.from_config(config.sandbox)
    try:
        env = envs.make_env(config, lambda s: len(tok.encode(s)), pool)
        n = config.sft.steps * config.sft.batch_size
        written = write_traces(env, n, config.seed + SFT_SEED_OFFSET, out)
    finally:
        pool.shutdown()
    lengths = [len(sft_row(episode_tokens(tok, t))[0]) for t in read_traces(out, config.env.name, written)]
    print(json.dumps({"out": out, "traces": written, "problems": n, "max_tokens": max(lengths, default=0),
                      "mean_tokens": sum(lengths) / max(len(lengths), 1)}))
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
