"""Chaos test: the real smoke run with kill -9 of workers and of the trainer at random moments.

The trainer and two inference workers run as real processes (``python -m trainer.main`` /
``inference_worker.main``) on configs/arith_grpo.py:smoke with more steps. A seeded schedule
kill -9s workers (restarted at once) and the trainer (restarted with the same workdir: it
resumes), including the trainer right after a checkpoint step's metrics line appears, when that
step's weights are being published and its checkpoint written, and once during its start-up.
Then it checks, on what survived:

- the final checkpoint is at trainer.steps;
- lineage: the last metrics record of each step 1..steps (later restarts rewrite the steps after
  their checkpoint, so the last record per step is the surviving lineage) names the task ids it
  trained on; none repeats, and with the final controller state every issued id (< next_task_id)
  is either trained on or still outstanding: nothing admitted twice, nothing lost;
- weights: every version a worker logged as loaded is a committed version with the same step,
  and its bytes pass the checksums now; no worker loaded a version it had refused; with delta
  publishing (on by default here) workers loaded both keyframes and deltas;
- the policy-landed check passed after swaps and never failed (workers' logs, trainer metrics).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT

CONFIG = "configs/arith_grpo.py:smoke"
STEPS = 12
BATCH = 2  # the smoke variant's trainer.batch_size
OVERRIDES = [f"--config.trainer.steps={STEPS}", "--config.trainer.checkpoint_every=2",
             "--config.rl.max_staleness=1", "--config.eval.num_samples=0", "--config.sft.steps=10",
             "--config.replay.lease_seconds=6"]
# Two passes. "delta": delta publishing on: each trainer incarnation publishes a keyframe first
# (it holds no base), then deltas with a keyframe every 3 versions, so kills land in both and
# workers follow both, applying deltas to what they hold or rebuilding from a keyframe after a
# restart. "lora": LoRA RL, the base published once to tree "base" and adapter-only versions to
# tree "adapter", which workers merge into their pristine base copy. (Full versions under kill -9:
# tests/trainer/test_procs.py.)
MODES = {
    "delta": ["--config.store.delta=True", "--config.store.keyframe_every=3"],
    "lora": ["--config.lora.rank=2", "--config.lora.alpha=4.0"],
}
SEED = int(os.environ.get("RLAX_CHAOS_SEED", "0"))
DEADLINE_S = 1200  # the whole run, on a very slow machine; normally a few minutes
LANDED_RE = re.compile(r"worker (\S+): policy v(\d+) landed")
LOADED_RE = re.compile(r"worker (\S+): weights v(\d+) \(step (\d+)\)")
REFUSED_RE = re.compile(r"refuses version (\d+)")


class Role:
    """One role's process, restarted on demand; each incarnation logs to <name>.<n>.log."""

    def __init__(self, name: str, argv: list[str], logdir: str, env: dict):
        self.name, self.argv, self.logdir, self.env = name, argv, logdir, env
        self.incarnation = 0
        self.logs: list[str] = []
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.incarnation += 1
        path = os.path.join(self.logdir, f"{self.name}.{self.incarnation}.log")
        self.logs.append(path)
        with open(path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def tail(self, n: int = 40) -> str:
        with open(self.logs[-1], errors="replace") as f:
            return "".join(f.readlines()[-n:])


def _rl_records(workdir: str) -> list[dict]:
    """The RL step records of metrics.jsonl (eval/SFT records carry no task ids), in file order."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by kill -9 (its step is redone after the restart)
                continue
            if "replay/task_ids" in rec:
                out.append(rec)
    return out


def _in_progress(workdir: str) -> list[str]:
    """Checkpoint and weight-publish attempts that are not committed (what a kill interrupted)."""
    found = [f"checkpoint {d}" for d in os.listdir(os.path.join(workdir, "checkpoints"))
             if "tmp" in d] if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
    attempts = os.path.join(workdir, "store", "params", "attempts")
    committed = os.path.join(workdir, "store", "params", "committed")
    newest = max((int(n[1:]) for n in os.listdir(committed)), default=-1) if os.path.isdir(committed) else -1
    if os.path.isdir(attempts):  # attempts of versions above the newest committed one: in flight
        found += [f"publish {d}" for d in os.listdir(attempts) if int(d[1:9]) > newest]
    return found


def _schedule(rng: random.Random) -> list[tuple[int, str, float, float, int]]:
    """(trigger step, kind, delay after the trigger line, start-up kill delay, worker index).

    An event fires when a metrics line for a step >= its trigger appears after the previous event
    fired, so a restarted trainer (which redoes steps) still reaches every trigger. A trainer
    event with a start-up delay also kills the trainer it starts, that long after it logs that it
    resumed from a checkpoint (when it publishes the resumed weights and issues tasks).
    """
    events = [
        (2, "trainer", 0.0, 0.0, -1),  # right after step 2's line: v(2) publish and checkpoint 2 in flight
        (rng.randint(3, 5), "trainer", rng.uniform(0.0, 0.5), rng.uniform(0.0, 1.0), -1),  # mid-step
        (rng.choice([6, 8]), "trainer", 0.0, 0.0, -1),  # another checkpoint step
    ]
    for step in sorted(rng.sample(range(1, STEPS - 2), 3)):
        events.append((step, "worker", rng.uniform(0.0, 2.0), 0.0, rng.randrange(2)))
    return sorted(events, key=lambda e: e[0])


@pytest.mark.slow
@pytest.mark.timeout(DEADLINE_S + 300)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_chaos_kill9_trainer_and_workers(tmp_path, mode):
    overrides = [*OVERRIDES, *MODES[mode]]
    workdir = str(tmp_path / "run")
    logdir = str(tmp_path / "logs")
    os.makedirs(logdir)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               # Restarts reuse compiled programs: keeps each restart to seconds on 2 cores.
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
    common = [f"--config={CONFIG}", f"--workdir={workdir}", *overrides]
    py = sys.executable
    trainer = Role("trainer", [py, "-m", "trainer.main", *common], logdir, env)
    workers = [Role(f"w{i}", [py, "-m", "inference_worker.main", *common, f"--worker_id=w{i}"], logdir, env)
               for i in range(2)]
    rng = random.Random(SEED)
    events = _schedule(rng)
    fired: list[dict] = []
    t0 = time.monotonic()
    for role in (trainer, *workers):
        role.start()
    try:
        seen = 0  # RL records already looked at
        armed: list[tuple[float | None, tuple]] = []  # (due time, event) of triggered events
        while True:
            now = time.monotonic()
            assert now - t0 < DEADLINE_S, f"chaos run too slow; fired {fired}\n{trainer.tail()}"
            rc = trainer.proc.poll()
            if rc is not None:
                assert rc == 0, f"trainer exited with {rc}:\n{trainer.tail()}"
                break
            for w in workers:
                assert w.proc.poll() is None, f"worker {w.name} died ({w.proc.returncode}):\n{w.tail()}"
            records = _rl_records(workdir)
            new, seen = records[seen:], len(records)
            step = max((r["step"] for r in new), default=None)
            # While a trainer kill is armed, later events wait for lines of the restarted trainer.
            while events and step is not None and step >= events[0][0] and \
                    not any(ev[1].startswith("trainer") for _, ev in armed):
                ev = events.pop(0)
                armed.append((now + ev[2], ev))
            for i, (due, ev) in enumerate(armed):  # the start-up kill counts from the resume line
                if due is None and "resumed from checkpoint" in open(trainer.logs[-1], errors="replace").read():
                    armed[i] = (now + ev[2], ev)
            for due, ev in [a for a in armed if a[0] is not None and a[0] <= now]:
                armed.remove((due, ev))
                _, kind, delay, startup_delay, idx = ev
                t = round(time.monotonic() - t0, 1)
                if kind == "worker":
                    workers[idx].kill9()
                    fired.append({"kind": f"worker w{idx}", "trigger": ev[0], "t": t})
                    workers[idx].start()
                    continue
                trainer.kill9()
                fired.append({"kind": kind, "delay": round(delay, 2), "t": t, "interrupted": _in_progress(workdir)})
                seen = len(_rl_records(workdir))  # only the restarted trainer's lines trigger events
                trainer.start()
                if startup_delay:
                    armed.append((None, (0, "trainer_startup", startup_delay, 0, -1)))
            time.sleep(0.05)
        assert not events and not armed, (
            f"the trainer finished before every kill fired (left {events} {armed}; fired {fired})")
        for w in workers:
            assert w.proc.poll() is None, f"worker {w.name} died ({w.proc.returncode}):\n{w.tail()}"
    finally:
        for w in workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for role in (trainer, *workers):
            if role.proc is not None:
                try:
                    role.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    role.kill9()
    elapsed = time.monotonic() - t0
    print(json.dumps({"mode": mode, "seed": SEED, "elapsed_s": round(elapsed, 1), "kills": fired}, indent=1))
    assert sum(f["kind"].startswith("trainer") for f in fired) == 4
    assert sum(f["kind"].startswith("worker") for f in fired) == 3
    assert trainer.incarnation == 5

    _check_final_checkpoint_and_lineage(workdir)
    _check_weights(workdir, workers, overrides, mode)
    resumed = sum("resumed from checkpoint" in open(p).read() for p in trainer.logs)
    assert resumed >= 3, "restarted trainers should resume from checkpoints"


def _check_final_checkpoint_and_lineage(workdir: str) -> None:
    ckpts = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert steps and steps[-1] == STEPS, f"final checkpoint at {steps}, expected {STEPS}"
    final = os.path.join(ckpts, str(STEPS))
    with open(os.path.join(final, "meta", "metadata")) as f:
        assert json.load(f)["step"] == STEPS
    with open(os.path.join(final, "controller", "metadata")) as f:
        replay = json.load(f)["replay"]

    lineage: dict[int, list[str]] = {}
    for rec in _rl_records(workdir):  # the last record of a step wins: the surviving lineage
        lineage[rec["step"]] = rec["replay/task_ids"].split()
    assert sorted(lineage) == list(range(1, STEPS + 1)), f"steps recorded: {sorted(lineage)}"
    admitted = [tid for s in sorted(lineage) for tid in lineage[s]]
    assert all(len(lineage[s]) == BATCH for s in lineage), lineage
    dupes = sorted({t for t in admitted if admitted.count(t) > 1})
    assert not dupes, f"tasks trained on twice in the surviving lineage: {dupes}"
    outstanding = set(replay["issued"])
    issued = {f"{n:012d}" for n in range(replay["next_task_id"])}
    assert not outstanding & set(admitted), "a trained task is still outstanding"
    lost = issued - outstanding - set(admitted)
    assert not lost, f"issued tasks neither trained on nor outstanding (lost): {sorted(lost)}"
    assert set(admitted) <= issued
    assert set(replay["consumed"]) <= set(admitted)
    assert replay["counters"]["admitted"] == len(admitted)  # counters restore with the lineage


def _check_weights(workdir: str, workers: list[Role], overrides: list[str], mode: str) -> None:
    from inference_worker.bootstrap import open_run
    from rlax_tpu.config import load_config

    config = load_config(os.path.join(ROOT, CONFIG.split(":")[0]) + ":smoke", overrides)
    run = open_run(config, workdir, os.path.join(workdir, "check"), wait_s=10)
    store = run.store  # LoRA: the adapter tree
    loaded: dict[int, int] = {}
    landed = 0
    for w in workers:
        for path in w.logs:
            refused: set[int] = set()
            with open(path, errors="replace") as f:
                for line in f:
                    assert "PolicyNotLandedError" not in line, f"{path}: {line}"
                    landed += bool(LANDED_RE.search(line))
                    if m := REFUSED_RE.search(line):
                        refused.add(int(m.group(1)))
                    elif m := LOADED_RE.search(line):
                        v, step = int(m.group(2)), int(m.group(3))
                        assert v not in refused, f"{path}: loaded version {v} after refusing it"
                        assert loaded.setdefault(v, step) == step
    assert loaded, "no worker logged a loaded weights version"
    assert landed >= len(loaded), f"{landed} policy-landed checks passed for {len(loaded)} loaded versions"
    final = _rl_records(workdir)[-1]
    assert final["canary/failed"] == 0 and final["canary/checked"] > 0, final
    for v, step in sorted(loaded.items()):
        info = store.version_info(v)  # raises if v was never committed
        assert info["step"] == step, f"worker loaded v{v} as step {step}, committed as step {info['step']}"
        # every chunk's crc32c (a delta's rebuilt leaves' too) checks out; LoRA: merged onto its base
        _, manifest = run.read(v)
        if mode == "lora":
            assert manifest["meta"]["base_hash"] == run.adapters.base_hash
    if mode == "delta":
        kinds = {store.read_manifest(v)["kind"] for v in loaded}
        assert kinds == {"keyframe", "delta"}, f"workers loaded only {kinds} versions"
    if mode == "lora":  # five trainer incarnations, one base
        assert run.adapters.base_store.versions() == [1], run.adapters.base_store.versions()
