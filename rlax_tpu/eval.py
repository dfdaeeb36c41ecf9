"""Held-out evaluation: pass@1 and unbiased pass@k with the inference engine.

  python -m rlax_tpu.eval --config=configs/X.py[:arg] --workdir=DIR [--version=V]

evaluates the run's newest published weights (or version V) on config.task's held-out split;
the trainer calls ``evaluate`` itself before RL, every ``eval.every`` steps and at the end.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from rlax_tpu.tasks.metrics import pass_at_k

log = logging.getLogger(__name__)


def evaluate(engine, tokenizer, task, problems, *, num_samples: int, ks, temperature: float,
             max_new_tokens: int, seed: int) -> dict:
    """Samples ``num_samples`` completions per problem; returns pass@k for each k and details."""
    from inference_worker.engine import SamplingParams

    prompts = [tokenizer.encode(tokenizer.apply_template(p.prompt), add_bos=tokenizer.bos_id is not None)
               for p in problems]
    params = [SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, n=num_samples,
                             seed=seed + i, stop_token_ids=(tokenizer.eos_id,)) for i in range(len(problems))]
    outs = engine.generate(prompts, params)
    # All completions in one batch: a math task checks them in its process pool together.
    flat = [(problem, tokenizer.decode(c.tokens)) for problem, completions in zip(problems, outs, strict=True)
            for c in completions]
    results = task.rewards([p for p, _ in flat], [text for _, text in flat])
    correct, rewards, start = [], [r.score for r in results], 0
    for completions in outs:
        group = results[start:start + len(completions)]
        start += len(completions)
        correct.append(sum(bool(r.details.get("correct", r.score > 0)) for r in group))
    report = {f"pass@{k}": float(np.mean([pass_at_k(num_samples, c, k) for c in correct])) for k in ks}
    report.update(num_problems=len(problems), num_samples=num_samples, temperature=temperature,
                  mean_reward=float(np.mean(rewards)) if rewards else 0.0)
    return report


def run(config, workdir: str, version: int | None = None) -> dict:
    """Evaluates published weights of a run (the store's newest version, or ``version``)."""
    import os

    from flax import nnx

    from inference_worker.engine import Engine
    from inference_worker.worker import abstract_params
    from param_server import ParamStore
    from rlax_tpu import run_meta, sharding
    from rlax_tpu import tasks as tasks_lib
    from rlax_tpu.store import KVStore

    kv = KVStore.open(config.store.url, workdir)
    model_cfg, tok = run_meta.wait_for_meta(kv, config, os.path.join(workdir, "eval_cache"), timeout_s=5)
    mesh = sharding.make_mesh(config.inference.mesh)
    graphdef, target = abstract_params(model_cfg, mesh)
    store = ParamStore.open(kv, config=config)
    params, version = store.pull(target, version)
    step = store.version_info(version)["step"]
    engine = Engine(nnx.merge(graphdef, params), model_cfg, max_batch=config.inference.max_batch,
                    max_seq_len=config.inference.max_seq_len, max_prefill_batch=config.inference.max_prefill_batch,
                    decode_chunk=config.inference.decode_chunk,
                    max_decode_chunk=config.inference.max_decode_chunk, mesh=mesh if mesh.size > 1 else None)
    task = tasks_lib.get_task(config.task)
    problems = task.eval_problems(config.task.num_eval, config.seed)
    report = evaluate(engine, tok, task, problems, num_samples=config.eval.num_samples, ks=config.eval.ks,
                      temperature=config.eval.temperature, max_new_tokens=config.inference.max_new_tokens,
                      seed=config.seed)
    return {"version": version, "step": step, **report}


def main(argv) -> None:
    del argv
    from rlax_tpu import logs
    from rlax_tpu.config import from_flags

    logs.setup()
    report = run(from_flags(_CONFIG.value, _WORKDIR.value), _WORKDIR.value, _VERSION.value)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (its store holds the weights).")
    _VERSION = flags.DEFINE_integer("version", None, "Weights version to evaluate (default: newest).")
    app.run(main)
