"""The evaluator role: held-out pass@1 / pass@k of published weights, beside training.

    python -m inference_worker.evaluator --config=configs/X.py[:arg] --workdir=DIR            # follow the run
    python -m inference_worker.evaluator --config=... --workdir=DIR --step=S                   # one published step
    python -m inference_worker.evaluator --config=... --workdir=DIR --version=V                # one version
    python -m inference_worker.evaluator --config=... --workdir=DIR --checkpoint=PATH          # a HF dir / .gguf

With ``--checkpoint`` the weights, tokenizer and chat template all come from the checkpoint (as
``models.load`` reads it), whatever tokenizer the config names; the task and eval settings are the
config's.

Following a run, it evaluates every published weights step that ``config.eval`` names (0, every
``eval.every`` steps, the last), oldest first, and exits after the last one (or, on SIGUSR1, once
nothing published is left to evaluate: the launcher sends it when the trainer has finished). The
trainer never waits for it: versions due for evaluation are pinned against garbage collection when
they are published, and released here once evaluated.

Reads: the run's store (metadata, weights). Writes: ``evals/<step>`` records in the store (one per
step; a newer trainer epoch's weights of the same step are evaluated again) and the same records
appended to ``<workdir>/eval.jsonl``, which ``rlax_tpu.report`` reads.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import numpy as np

from inference_worker.bootstrap import open_run
from inference_worker.engine import Engine, SamplingParams
from inference_worker.rollout import EpisodeGroup, Rollouts
from param_server import BadVersionError, VersionNotFoundError
from rlax_tpu import run_meta
from rlax_tpu import tasks as tasks_lib
from rlax_tpu.config.sections import eval as eval_section
from rlax_tpu.store_layout import EVAL_READER, eval_keep_reader, eval_record_key
from rlax_tpu.tasks.metrics import pass_at_k

log = logging.getLogger(__name__)


def evaluate(rollouts: Rollouts, problems, *, num_samples: int, ks, temperature: float, max_new_tokens: int,
             seed: int) -> dict:
    """Runs ``num_samples`` episodes per problem on the rollout path; returns pass@k for each k,
    the mean reward and the episodes' counters (turns, tool calls, token mismatches, masked)."""
    tokenizer = rollouts.tokenizer
    groups = [EpisodeGroup(p.to_dict(), rollouts.prompt(p),
                           SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, n=num_samples,
                                          seed=seed + i, stop_token_ids=(tokenizer.eos_id,)))
              for i, p in enumerate(problems)]
    t0 = time.perf_counter()
    outs = rollouts.run(groups)
    gen_s = time.perf_counter() - t0
    flat = [r for group in outs for r in group]
    correct = [sum(tasks_lib.is_solved(r.details) for r in group) for group in outs]
    tokens = sum(int(r.details["model_tokens"]) for r in flat)
    report = {f"pass@{k}": float(np.mean([pass_at_k(num_samples, c, k) for c in correct])) for k in ks}
    report.update(num_problems=len(problems), num_samples=num_samples, temperature=temperature,
                  mean_reward=float(np.mean([r.reward for r in flat])) if flat else 0.0, generated_tokens=tokens,
                  tokens_per_s=tokens / max(gen_s, 1e-9))
    report.update(episode_metrics(flat))
    return report


def episode_metrics(flat: list) -> dict:
    """Means of the episodes' counters over rollouts, plus the masked count."""
    out = {f"{k}_mean": float(np.mean([float(r.details.get(k, 0)) for r in flat])) if flat else 0.0
           for k in ("turns", "tool_calls", "malformed_calls", "tool_errors", "token_mismatches")}
    out["masked"] = sum(r.masked for r in flat)
    return out


class Evaluator:
    """Evaluates a run's published weights; one per run (a second one only repeats work)."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.run = open_run(config, workdir, os.path.join(workdir, "evaluator"),
                            wait_s=config.inference.meta_timeout_s)
        self.engine: Engine | None = None
        self.rollouts: Rollouts | None = None
        self.finishing = False  # set by SIGUSR1: exit once nothing published is left

    def _rollouts(self, params) -> Rollouts:
        if self.engine is None:
            self.engine = self.run.engine(self.config, params)
            self.rollouts = Rollouts.from_config(self.config, self.engine, self.run.tokenizer)
            self.problems = self.rollouts.problems("eval", self.config.task.num_eval, self.config.seed)
        else:
            self.engine.update_params(params)
        return self.rollouts

    def evaluate_params(self, params) -> dict:
        c = self.config
        t0 = time.time()
        rollouts = self._rollouts(params)
        report = evaluate(rollouts, self.problems,
                          num_samples=c.eval.num_samples, ks=c.eval.ks, temperature=c.eval.temperature,
                          max_new_tokens=c.inference.max_new_tokens, seed=c.seed + eval_section.SEED_OFFSET)
        return {**report, "eval_s": time.time() - t0}

    # ------------------------------------------------------------------ records
    def recorded(self, step: int) -> dict | None:
        raw = self.run.kv.get(eval_record_key(step))
        return None if raw is None else json.loads(raw)

    def _write(self, record: dict) -> None:
        self.run.kv.put(eval_record_key(record["step"]), json.dumps(record).encode())
        local = run_meta.local_dir(self.workdir)
        os.makedirs(local, exist_ok=True)
        with open(os.path.join(local, "eval.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ versions
    def pending(self) -> list[tuple[int, int, int]]:
        """(step, version, epoch) of published versions due for evaluation and not yet evaluated
        (or evaluated from an older trainer epoch's weights of that step), oldest step first."""
        out = {}
        for v in self.run.store.versions():
            try:
                info = self.run.store.version_info(v)
            except VersionNotFoundError:
                continue
            step, epoch = int(info["step"]), int(info.get("epoch", 0))
            if not eval_section.due(self.config, step):
                continue
            if step not in out or (epoch, v) > out[step][1:]:
                out[step] = (v, epoch)
        todo = []
        for step, (v, epoch) in sorted(out.items()):
            done = self.recorded(step)
            if done is None or int(done.get("epoch", 0)) < epoch:
                todo.append((step, v, epoch))
        return todo

    def evaluate_version(self, version: int) -> dict:
        """Evaluates one published version; returns its record (not written)."""
        params, manifest = self.run.store.read(self.run.target, version, reader=EVAL_READER)
        report = self.evaluate_params(params)
        return {"step": int(manifest["step"]), "version": version, "epoch": int(manifest.get("epoch", 0)),
                **report}

    def follow(self) -> int:
        """Evaluates due steps as they are published; returns the number evaluated."""
        final = self.config.trainer.steps
        n = 0
        while True:
            todo = self.pending()
            for step, version, _ in todo:
                try:
                    rec = self.evaluate_version(version)
                except (BadVersionError, VersionNotFoundError) as e:
                    log.warning("evaluator: version %d (step %d) unusable, skipped: %s", version, step, e)
                    continue
                self._write(rec)
                self.run.store.unpin(eval_keep_reader(step))
                n += 1
                log.info("evaluator: step %d (v%d): %s in %.0fs", step, version,
                         {k: round(v, 4) for k, v in rec.items() if k.startswith("pass@")}, rec["eval_s"])
            if self.recorded(final) is not None and not self.pending():
                log.info("evaluator: the last step (%d) is evaluated; exiting", final)
                return n
            if self.finishing and not todo:
                log.info("evaluator: asked to finish; nothing published is left to evaluate")
                return n
            time.sleep(self.config.store.poll_interval_s)

    def close(self) -> None:
        if self.rollouts is not None:
            self.rollouts.close()
        self.run.store.unpin(EVAL_READER)


def checkpoint_tokenizer(config, path: str, cache_dir: str):
    """The tokenizer and chat template that ship with the checkpoint at ``path`` (a HF directory's
    tokenizer.json + tokenizer_config.json, or those inside a GGUF file), as ``models.load`` reads
    its weights: the config's tokenizer belongs to the config's model. The prompt settings
    (chat template on or off, prompt template, system prompt) still come from config.tokenizer;
    the special tokens are the checkpoint's own."""
    import ml_collections

    from rlax_tpu import models
    from rlax_tpu import tokenizer as tokenizer_lib

    section = ml_collections.ConfigDict(config.tokenizer.to_dict())
    section.kind = "gguf" if models.is_gguf(path) else "hf"
    section.path = path
    section.bos_token = section.eos_token = section.pad_token = ""
    return tokenizer_lib.build(section, cache_dir)


def evaluate_checkpoint(config, path: str, workdir: str) -> dict:
    """One-shot evaluation of a HF checkpoint directory or .gguf file with its own tokenizer (no
    run store needed); converted tokenizer files go under ``<workdir>/evaluator``."""
    from rlax_tpu import models, sharding

    mesh = sharding.make_mesh(config.inference.mesh)
    model, model_cfg = models.load(path, dtype=models.resolve_dtype(config.model.dtype), mesh=mesh,
                                   rules=sharding.INFERENCE_RULES, overrides=models.overrides(config.model))
    tok = checkpoint_tokenizer(config, path, os.path.join(run_meta.local_dir(workdir), "evaluator"))
    rollouts = Rollouts.from_config(config, Engine.from_config(config.inference, model, model_cfg, mesh), tok)
    c = config
    try:
        return evaluate(rollouts, rollouts.problems("eval", c.task.num_eval, c.seed), num_samples=c.eval.num_samples,
                        ks=c.eval.ks, temperature=c.eval.temperature, max_new_tokens=c.inference.max_new_tokens,
                        seed=c.seed + eval_section.SEED_OFFSET)
    finally:
        rollouts.close()


def main(argv) -> None:
    del argv
    from absl import app

    from rlax_tpu import logs
    from rlax_tpu.config import cli

    logs.setup()
    config = cli.start(_CONFIG, _WORKDIR, run_config="check")
    if _CHECKPOINT.value:
        print(json.dumps(evaluate_checkpoint(config, _CHECKPOINT.value, _WORKDIR.value), indent=2))
        return
    ev = Evaluator(config, _WORKDIR.value)
    try:
        if _VERSION.value is not None or _STEP.value is not None:
            version = _VERSION.value
            if version is None:
                found = [v for s, v, _ in ev.pending() if s == _STEP.value] or \
                    [v for v in ev.run.store.versions() if ev.run.store.version_info(v)["step"] == _STEP.value]
                if not found:
                    raise app.UsageError(f"--step={_STEP.value}: no published version of that step in "
                                         f"{ev.run.store.url}")
                version = found[-1]
            print(json.dumps(ev.evaluate_version(version), indent=2))
            return
        signal.signal(signal.SIGUSR1, lambda *_: setattr(ev, "finishing", True))
        ev.follow()
        # Done: a late "finish" from the launcher must not kill the exiting interpreter (which
        # puts Python-level handlers back to the default action while it shuts down).
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    finally:
        ev.close()


if __name__ == "__main__":
    from absl import app, flags

    from rlax_tpu.config import cli

    _CONFIG, _WORKDIR = cli.define_flags("Run directory (its store holds the weights).")
    _VERSION = flags.DEFINE_integer("version", None, "Evaluate this published version once and exit.")
    _STEP = flags.DEFINE_integer("step", None, "Evaluate the published weights of this trainer step once.")
    _CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Evaluate a HF checkpoint dir or .gguf file once.")
    app.run(main)
