"""RL experiments at CPU scale: each study is a set of real runs (``rlax_tpu.launch``: trainer,
inference workers, evaluator) that differ in a few config fields; prints one JSON line per run
and a markdown table (the tables in docs/rl.md come from here).

    .venv/bin/python scripts/rl_study.py --study=algorithms [--seeds=0,1] [--steps=150] [--out=runs/study]

Studies: 'algorithms' (PPO vs GRPO vs DAPO on Countdown), 'group_size' (4/8/16 samples per
prompt, the same samples per step), 'kl' (coefficient 0/0.01/0.05/0.1), 'dynamic_sampling'
(DAPO with and without it), 'staleness' (k = 0, 1, 2, 4, with and without off-policy
correction; RL steps/s and held-out pass@1; the trainer pinned to one core and one worker to the
other), 'extrapolation' (Countdown trained on 2-3 numbers, evaluated on 4 and 5 before and after
RL), 'reuse' (GRPO with a quarter of each batch reused groups), 'demo' (arith variants
scored by held-out pass@1 and pass@8 together). The SFT warm start is shared: it runs once per
(config, seed) and is exported as a Hugging Face checkpoint (trainer.export) that every run of
the study starts RL from, so runs differ only in their RL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTDOWN = "configs/countdown.py"
ARITH = "configs/arith_grpo.py"


def _arith(steps: int, mini_batches: int, ppo_epochs: int, **rl) -> dict:
    """Overrides for a demo-study row: plain GRPO (no KL, symmetric clip) on the given schedule."""
    rl = {"kl_coef": 0.0, "clip_eps_high": 0.2, "mini_batches": mini_batches, "ppo_epochs": ppo_epochs, **rl}
    return {"trainer.steps": steps, **{f"rl.{k}": v for k, v in rl.items()}}


# name -> (base config for the shared SFT, [(run name, config spec, overrides)])
STUDIES = {
    "algorithms": (COUNTDOWN, [("PPO", f"{COUNTDOWN}:ppo", {}), ("GRPO", COUNTDOWN, {}),
                               ("DAPO", f"{COUNTDOWN}:dapo", {})]),
    # The same samples per step and the same samples leased per worker at once (its slots).
    "group_size": (COUNTDOWN, [(f"G={g}", COUNTDOWN, {"rl.group_size": g, "trainer.batch_size": 64 // g,
                                                      "replay.worker_max_leases": 32 // g})
                               for g in (4, 8, 16)]),
    "kl": (COUNTDOWN, [(f"kl={k}", COUNTDOWN, {"rl.kl_coef": k}) for k in (0.0, 0.01, 0.05, 0.1)]),
    "dynamic_sampling": (COUNTDOWN, [("DAPO", f"{COUNTDOWN}:dapo", {}),
                                     ("DAPO without dynamic sampling", f"{COUNTDOWN}:dapo",
                                      {"rl.dynamic_sampling": False})]),
    "staleness": (COUNTDOWN, [
        (f"k={k}, {name}", COUNTDOWN, {"rl.max_staleness": k, "trainer.publish_every": 1,
                                       "launch.pin_workers": True, "launch.num_workers": 1, **extra})
        for k in (0, 1, 2, 4)
        for name, extra in (("TIS", {"rl.off_policy": "tis"}),
                            ("none", {"rl.off_policy": "none", "rl.allow_uncorrected_staleness": True}))
        if not (k == 0 and name == "none")]),
    "reuse": (COUNTDOWN, [("GRPO", COUNTDOWN, {}),
                          ("GRPO + reuse 25%", COUNTDOWN, {"rl.reuse_fraction": 0.25, "rl.reuse_max_uses": 1})]),
    # Countdown trained on 2-3 numbers, evaluated on 4 and 5 (d+1, d+2). The compose task is the
    # natural one, but its 150-step SFT start solves 0.06% of held-out problems: RL gets no signal.
    "extrapolation": (COUNTDOWN, [("GRPO + KL 0.1", COUNTDOWN, {"rl.kl_coef": 0.1}),
                                  ("DAPO", f"{COUNTDOWN}:dapo", {})]),
    # Rows name their schedule (mini-batches x epochs) and steps; the last row is the demo as shipped.
    "demo": (ARITH, [
        ("GRPO 2x2", ARITH, _arith(250, 2, 2)),
        ("GRPO 2x2 + entropy 0.01", ARITH, _arith(250, 2, 2, entropy_coef=0.01)),
        ("GRPO 2x2 + clip-higher 0.28", ARITH, _arith(250, 2, 2, clip_eps_high=0.28)),
        ("GRPO 2x2 + KL 0.05", ARITH, _arith(250, 2, 2, kl_coef=0.05)),
        ("GRPO-passk 2x2 (verl)", ARITH, _arith(250, 2, 2, advantage="grpo_passk")),
        ("passk k=4 2x2", ARITH, _arith(250, 2, 2, advantage="passk", passk_k=4)),
        ("GRPO 2x1 + KL 0.05 + clip-higher 0.28", ARITH, _arith(500, 2, 1, kl_coef=0.05, clip_eps_high=0.28)),
        ("GRPO 2x1 + KL 0.1", ARITH, _arith(500, 2, 1, kl_coef=0.1)),
        ("GRPO 4x1 + KL 0.1", ARITH, _arith(500, 4, 1, kl_coef=0.1)),
        ("demo (4x1 + KL 0.1 + clip-higher 0.28, 600 steps)", ARITH, {"trainer.steps": 600}),
    ]),
}
# The extrapolation study also evaluates depths beyond the training range afterwards.
EXTRA_EVALS = {"extrapolation": [("d+1", 1), ("d+2", 2)]}


def _flags(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out.append(f"--config.{k}={v}" if not isinstance(v, bool) else (f"--config.{k}" if v else f"--noconfig.{k}"))
    return out


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def launch(spec: str, workdir: str, overrides: dict, log: str) -> float:
    """One run to completion; returns its wall time. Raises naming the log on failure."""
    if os.path.exists(workdir):
        shutil.rmtree(workdir)
    cmd = [sys.executable, "-m", "rlax_tpu.launch", f"--config={spec}", f"--workdir={workdir}", *_flags(overrides)]
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"run {workdir} failed (exit {rc}); see {log}")
    return time.time() - t0


def shared_sft(base: str, seed: int, out: str, sft_overrides: dict) -> dict:
    """Runs SFT once (no RL steps) and exports it; returns the overrides that start RL from it."""
    slug = os.path.splitext(os.path.basename(base.split(":")[0]))[0]
    wd, hf = os.path.join(out, f"sft_{slug}_seed{seed}"), os.path.join(out, f"sft_{slug}_seed{seed}_hf")
    if not os.path.isfile(os.path.join(hf, "config.json")):
        launch(base, wd, {"seed": seed, "trainer.steps": 1, "trainer.warmup_steps": 0, "eval.num_samples": 0,
                          **sft_overrides},
               wd + ".log")
        cmd = [sys.executable, "-m", "trainer.export", f"--workdir={wd}", "--step=0", f"--out={hf}"]
        subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, capture_output=True)
    return {"model.hf_path": hf, "tokenizer.kind": "sentencepiece",
            "tokenizer.path": os.path.join(hf, "tokenizer.model"), "sft.steps": 0}


def _jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(workdir: str) -> dict:
    evals = {e["step"]: e for e in _jsonl(os.path.join(workdir, "eval.jsonl"))}
    rl = [m for m in _jsonl(os.path.join(workdir, "metrics.jsonl")) if "replay/task_ids" in m]
    first, last = evals[min(evals)], evals[max(evals)]
    ks = sorted((k for k in first if k.startswith("pass@")), key=lambda k: int(k.split("@")[1]))
    out = {f"before_{k}": first[k] for k in ks}
    out.update({f"after_{k}": last[k] for k in ks})
    tail = rl[len(rl) // 2:]
    mean = lambda key: sum(m.get(key, 0.0) for m in tail) / max(len(tail), 1)  # noqa: E731
    out.update({
        "steps": len(rl),
        "rl_steps_per_s": (len(rl) - 1) / (rl[-1]["time"] - rl[0]["time"]) if len(rl) > 1 else 0.0,
        "train_reward_late": mean("reward/mean"), "clip_frac": mean("clip_frac"), "approx_kl": mean("approx_kl"),
        "clip_steps": sum(m.get("clip_frac", 0.0) > 0 for m in rl) / max(len(rl), 1),  # share of steps
        "approx_kl_steps": sum(m.get("approx_kl", 0.0) > 0 for m in rl) / max(len(rl), 1),
        "entropy_late": mean("entropy"), "staleness_mean": mean("staleness/mean"),
        "is_weight_mean": mean("is_weight_mean"),
    })
    return out


def extra_evals(spec: str, workdir: str, overrides: dict, shifts) -> dict:
    """pass@k before RL (the shared SFT export) and after (the final checkpoint, exported) on
    harder held-out problems: one-shot evaluator runs with the eval difficulty moved up."""
    from rlax_tpu.config import load_config

    train_hi = load_config(spec, {k: v for k, v in overrides.items() if k.startswith("task.")}).task.difficulty
    final = os.path.join(workdir, "final_hf")
    subprocess.run([sys.executable, "-m", "trainer.export", f"--workdir={workdir}", f"--out={final}"], cwd=ROOT,
                   env=_env(), check=True, capture_output=True)
    out = {}
    for label, shift in shifts:
        hard = {**overrides, "task.eval_min_difficulty": train_hi + shift, "task.eval_difficulty": train_hi + shift}
        for which, ckpt in (("before", overrides["model.hf_path"]), ("after", final)):
            cmd = [sys.executable, "-m", "inference_worker.evaluator", f"--config={spec}", f"--workdir={workdir}",
                   f"--checkpoint={ckpt}", *_flags({**hard, "model.hf_path": ckpt})]
            res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"evaluation at {label} failed: {res.stderr[-2000:]}")
            rec = json.loads(res.stdout[res.stdout.index("{"):])
            out.update({f"{label}_{which}_{k}": v for k, v in rec.items() if k.startswith("pass@")})
    return out


def table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k not in ("run", "seed")]
    lines = ["| run | seed | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        cells = [f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append(f"| {r['run']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", required=True, choices=sorted(STUDIES))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=150, help="RL steps per run (the demo study's rows set their own)")
    ap.add_argument("--eval_every", type=int, default=0, help="held-out evaluations between the first and last")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--reuse_runs", action="store_true",
                    help="keep a run whose workdir already holds its final evaluation (no relaunch)")
    ap.add_argument("--only", default="", help="run names to run, separated by ';' (default: all)")
    args = ap.parse_args()
    base, runs = STUDIES[args.study]
    out = os.path.abspath(os.path.join(args.out, args.study))
    os.makedirs(out, exist_ok=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        start = shared_sft(base, seed, os.path.abspath(args.out), {})
        for name, spec, overrides in runs:
            if args.only and name not in args.only.split(";"):
                continue
            ov = {**start, "seed": seed, "trainer.steps": args.steps, "eval.every": args.eval_every, **overrides}
            wd = os.path.join(out, f"{name.replace(' ', '_').replace(',', '').replace('=', '')}_seed{seed}")
            done = [e["step"] for e in _jsonl(os.path.join(wd, "eval.jsonl"))]
            if args.reuse_runs and ov["trainer.steps"] in done:
                wall = None
            else:
                wall = launch(spec, wd, ov, wd + ".log")
            row = {"run": name, "seed": seed, **summarize(wd), "wall_s": wall}
            if args.study in EXTRA_EVALS:
                row.update(extra_evals(spec, wd, ov, EXTRA_EVALS[args.study]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"study": args.study, "steps": args.steps, "rows": rows}, f, indent=1)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
