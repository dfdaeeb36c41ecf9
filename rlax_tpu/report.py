"""Run report: the before/after evaluation table and a PNG of the reward and eval curves.

  python -m rlax_tpu.report --workdir=DIR [--plot=DIR/report.png]

Reads <workdir>/eval.jsonl (written by the evaluator role: before RL, every eval.every steps and
at the end), <workdir>/metrics.jsonl (one line per RL step) and the run's name (config.name)
from <workdir>/config.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rlax_tpu.config import run_config


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: the rest of the file is still good
    return out


def latest_by_step(records: list[dict]) -> list[dict]:
    """After restarts a step may be logged twice: the last record of each step wins."""
    by_step = {}
    for r in records:
        if "step" in r:
            by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


# Episode counters of the evaluator's records (means over episodes) shown under pass@k.
EPISODE_ROWS = (("turns_mean", "turns"), ("tool_calls_mean", "tool calls"), ("malformed_calls_mean", "malformed"),
                ("tool_errors_mean", "tool errors"), ("token_mismatches_mean", "mismatches"), ("masked", "masked"))


def table(evals: list[dict]) -> str:
    if not evals:
        return "no evaluation recorded (eval.jsonl is missing or empty)"
    first, last = evals[0], evals[-1]
    keys = sorted((k for k in first if k.startswith("pass@")), key=lambda k: int(k.split("@")[1]))
    before, after = f"before RL (step {first['step']})", f"after RL (step {last['step']})"
    rows = [f"{'held-out':<12}{before:>22}{after:>22}{'change':>10}"]
    for k in keys:
        b, a = 100 * first[k], 100 * last.get(k, float("nan"))
        rows.append(f"{k:<12}{b:>21.1f}%{a:>21.1f}%{a - b:>+9.1f}")
    for k, label in EPISODE_ROWS:  # multi-turn environments' counters, per episode
        if k in first:
            b, a = first[k], last.get(k, float("nan"))
            rows.append(f"{label:<12}{b:>22.2f}{a:>22.2f}{a - b:>+10.2f}")
    rows.append(f"{'problems':<12}{first['num_problems']:>22}{last['num_problems']:>22}")
    rows.append(f"{'samples':<12}{first['num_samples']:>22}{last['num_samples']:>22}")
    return "\n".join(rows)


def landed_line(record: dict) -> str:
    """The policy-landed check at the last step: the workers' canary checks (rlax_tpu.canary)."""
    failed, checked = int(record["canary/failed"]), int(record["canary/checked"])
    if failed:
        return (f"policy-landed check: {failed} of {checked} weight swaps FAILED on "
                f"{int(record['canary/workers_failing'])} worker(s) (PolicyNotLandedError in their logs)")
    return f"policy-landed check: all {checked} checked weight swaps landed"


def smooth(values: list[float], window: int = 0) -> list[float]:
    """Trailing moving average (window: ~5% of the points, at least 1), so a noisy per-step
    reward reads as a trend; the raw curve is drawn faintly beneath it."""
    window = window or max(1, len(values) // 20)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(metrics: list[dict], evals: list[dict], path: str, title: str = "") -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no plot written", file=sys.stderr)
        return False
    rl = [m for m in metrics if "reward/mean" in m]
    steps = [m["step"] for m in rl]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    curves = {"mean reward": [m["reward/mean"] for m in rl],
              "train pass rate": [m.get("reward/pass_rate", m["reward/mean"]) for m in rl]}
    if curves["train pass rate"] == curves["mean reward"]:  # reward is correctness: one curve
        curves = {"train pass rate (= reward)": curves["mean reward"]}
    for (label, ys), color in zip(curves.items(), ("C0", "C1"), strict=False):
        smoothed = smooth(ys)
        if smoothed != ys:  # the raw curve faintly under the trend; short runs draw one line
            ax1.plot(steps, ys, color=color, alpha=0.25, linewidth=0.8)
            label += ", smoothed"
        ax1.plot(steps, smoothed, color=color, label=label)
    ax1.set_xlabel("RL step")
    ax1.set_title("training rollouts")
    ax1.legend()
    for k in sorted((k for k in (evals[0] if evals else {}) if k.startswith("pass@")),
                    key=lambda k: int(k.split("@")[1])):
        ax2.plot([e["step"] for e in evals], [100 * e[k] for e in evals], marker="o", label=k)
    ax2.set_xlabel("RL step")
    ax2.set_ylabel("%")
    ax2.set_title("held-out evaluation")
    ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--plot", default="", help="PNG path (default: <workdir>/report.png)")
    args = ap.parse_args(argv)
    evals = latest_by_step(read_jsonl(os.path.join(args.workdir, "eval.jsonl")))
    metrics = latest_by_step(read_jsonl(os.path.join(args.workdir, "metrics.jsonl")))
    stored = run_config.read(args.workdir) or {}  # the run's config.json, written by the trainer
    title = f"{stored['name']} ({args.workdir})" if stored.get("name") else ""
    if title:
        print(f"run {title}")
    print(table(evals))
    if metrics and "canary/checked" in metrics[-1]:
        print(landed_line(metrics[-1]))
    path = args.plot or os.path.join(args.workdir, "report.png")
    if metrics and plot(metrics, evals, path, title):
        print(f"plot: {path}")
    return 0 if evals else 1


if __name__ == "__main__":
    sys.exit(main())
