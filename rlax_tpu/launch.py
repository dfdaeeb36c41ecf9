"""Runs every role of a config on this machine: janitor, trainer, N inference workers, evaluator.

    python -m rlax_tpu.launch --config=configs/X.py[:variant] --workdir=DIR [--num_workers=N]
                              [--config.a.b=v ...] [--fresh]

Each role is a separate process in its own process group (``python -m param_server.main``,
``python -m trainer.main``, ``python -m inference_worker.main --worker_id=i``, ``python -m
inference_worker.evaluator`` when config.eval is on), given the same ``--config`` and
``--config.*`` overrides verbatim, with its output appended to ``<workdir>/logs/<role>.log``.
The launcher prints a status line every ``config.launch.status_every_s`` and echoes the
trainer's progress lines. With ``config.launch.pin_workers`` each worker runs on its own CPU core
with one XLA thread (on a CPU host, throughput scales with workers, as on a pod).

Nothing is restarted silently: if any role exits while the trainer is still running, the launcher
names it with its exit status and the end of its log, stops the others (SIGTERM, then SIGKILL
after ``config.launch.grace_s``) and exits 1. When the trainer exits 0 the workers are stopped,
the evaluator is asked (SIGUSR1) to finish what is published and the launcher exits 0 once it
has. SIGINT/SIGTERM to the launcher stops every role the same way and exits 128+signal (a second
Ctrl-C skips the grace period). An existing workdir is resumed (the roles do that); ``--fresh``
deletes it first, but only if this launcher created it (marker file).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = ".rlax_launch.json"
TRAINER = "trainer"
JANITOR = "param_server"
EVALUATOR = "evaluator"
# XLA flags of a worker pinned to one core: no intra-op thread pool beyond that core.
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# Must match trainer.metrics.PROGRESS_MARKER (not imported: launch stays free of trainer code).
PROGRESS_MARKER = "[progress]"
TAIL_LINES = 20


class LaunchError(RuntimeError):
    """Bad launcher arguments or workdir (e.g. --fresh on a directory it did not create)."""


def passthrough_overrides(argv: Sequence[str]) -> list[str]:
    """The ``--config.a.b=v`` / ``--noconfig.a.b`` arguments in ``argv``, verbatim."""
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith(("--config.", "--noconfig.", "-config.", "-noconfig.")):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if "=" not in arg and arg.startswith(("--config.", "-config.")) and nxt is not None \
                    and not nxt.startswith("-"):
                raise LaunchError(f"write config overrides as {arg}=VALUE (got '{arg} {nxt}')")
            out.append(arg)
    return out


def role_commands(config_arg: str, workdir: str, overrides: Sequence[str], num_workers: int,
                  evaluator: bool = False) -> dict[str, list[str]]:
    """Role name -> argv, in start order: janitor, trainer, workers, evaluator."""
    common = [f"--config={config_arg}", f"--workdir={workdir}", *overrides]
    py = sys.executable
    commands = {
        JANITOR: [py, "-m", "param_server.main", *common, "--mode=janitor"],
        TRAINER: [py, "-m", "trainer.main", *common],
    }
    for i in range(num_workers):
        # The worker id is the role name: logs/worker_<i>.log is workers/worker_<i> in the status.
        commands[f"worker_{i}"] = [py, "-m", "inference_worker.main", *common, f"--worker_id=worker_{i}"]
    if evaluator:
        commands[EVALUATOR] = [py, "-m", "inference_worker.evaluator", *common]
    return commands


def pinned_cores(names: Sequence[str], trainer_cores: int, cores: Sequence[int] | None = None
                 ) -> dict[str, list[int]]:
    """The trainer on the first ``trainer_cores`` cores, each worker (names 'worker_*') on one
    core of the rest, round robin (over all cores when none are left); other roles unpinned."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else list(cores)
    spare = cores[trainer_cores:] or cores
    workers = [n for n in names if n.startswith("worker_")]
    out = {name: [spare[i % len(spare)]] for i, name in enumerate(workers)}
    if TRAINER in names and trainer_cores:
        out[TRAINER] = cores[:trainer_cores]
    return out


def prepare_workdir(workdir: str, fresh: bool) -> None:
    """Creates the workdir (with a marker) or reuses it; ``fresh`` deletes one we created."""
    if "://" in workdir:
        raise LaunchError(f"--workdir must be a local directory for rlax_tpu.launch, got {workdir!r}")
    marker = os.path.join(workdir, MARKER)
    if fresh and os.path.exists(workdir):
        if not os.path.isfile(marker):
            raise LaunchError(f"--fresh: refusing to delete {workdir!r}: it has no {MARKER} "
                              "(it was not created by rlax_tpu.launch)")
        print(f"[launch] --fresh: deleting {workdir}", flush=True)
        shutil.rmtree(workdir)
    new = not os.path.exists(workdir) or not os.listdir(workdir)
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    if new:
        with open(marker, "w") as f:
            json.dump({"created_by": "rlax_tpu.launch", "created_at": time.time()}, f)
    else:
        print(f"[launch] resuming in existing workdir {workdir}", flush=True)


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def _tail(path: str, n: int = TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join("    " + line for line in lines[-n:])


class _Role:
    """A role's process. ``cores``: the CPU cores it is pinned to (None: not pinned); a role
    pinned to one core runs XLA without its CPU thread pool."""

    def __init__(self, name: str, argv: Sequence[str], log_path: str, env: Mapping[str, str],
                 cores: Sequence[int] | None = None):
        self.name, self.log_path = name, log_path
        self.log = open(log_path, "ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.log.write(f"\n===== [launch {stamp}] {' '.join(argv)}\n".encode())
        self.log.flush()
        self.start_offset = self.log.tell()  # where this run's output starts in the log
        env = dict(env)
        if cores is not None and len(cores) == 1:
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {SINGLE_THREAD_XLA}".strip()
        pin = None if cores is None else (lambda: os.sched_setaffinity(0, set(cores)))
        self.proc = subprocess.Popen(list(argv), stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True, preexec_fn=pin)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)  # the role and anything it started
            except ProcessLookupError:
                pass


class _Launcher:
    def __init__(self, roles: dict[str, _Role], grace_s: float, status_every_s: float,
                 tail_trainer: bool, out: TextIO):
        self.roles, self.grace_s, self.status_every_s = roles, grace_s, status_every_s
        self.tail_trainer, self.out = tail_trainer, out
        self.signals: list[int] = []
        self._tail_pos = 0  # set to the trainer's start_offset once it is started
        self._tail_buf = b""
        # On a terminal the trainer's progress line is rewritten in place; into a log, one line each.
        self._inplace = bool(getattr(out, "isatty", lambda: False)())
        self._open_line = False

    def _end_line(self) -> None:
        if self._open_line:
            print(file=self.out, flush=True)
            self._open_line = False

    def say(self, msg: str) -> None:
        self._end_line()
        print(f"[launch] {msg}", file=self.out, flush=True)

    def on_signal(self, signum, frame) -> None:
        self.signals.append(signum)
        if len(self.signals) > 1:  # second signal: no more grace
            for role in self.roles.values():
                role.signal(signal.SIGKILL)

    def status(self) -> None:
        alive = [n for n, r in self.roles.items() if r.alive()]
        if self._inplace and alive == getattr(self, "_last_alive", None):
            return  # on a terminal only changes interrupt the progress line
        self._last_alive = alive
        self.say(f"{time.strftime('%H:%M:%S')} alive {len(alive)}/{len(self.roles)}: {' '.join(alive)}")

    def echo_trainer(self) -> None:
        if not self.tail_trainer or TRAINER not in self.roles:
            return
        try:
            with open(self.roles[TRAINER].log_path, "rb") as f:
                f.seek(self._tail_pos)
                data = f.read()
        except OSError:
            return
        self._tail_pos += len(data)
        *lines, self._tail_buf = (self._tail_buf + data).split(b"\n")
        for line in lines:
            text = line.decode("utf-8", "replace")
            if PROGRESS_MARKER not in text:
                continue
            text = text.strip().split("\r")[-1].replace("\x1b[K", "")
            if self._inplace:
                self.out.write(f"\r[trainer] {text}\x1b[K")
                self.out.flush()
                self._open_line = True
            else:
                print(f"[trainer] {text}", file=self.out, flush=True)

    def stop_all(self, reason: str, keep: Sequence[str] = ()) -> None:
        alive = [r for r in self.roles.values() if r.alive() and r.name not in keep]
        if not alive:
            return
        self.say(f"stopping {', '.join(r.name for r in alive)} ({reason}; SIGTERM, "
                 f"SIGKILL after {self.grace_s:g}s)")
        for role in alive:
            role.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while any(r.alive() for r in alive) and time.monotonic() < deadline:
            self.echo_trainer()
            time.sleep(0.05)
        for role in alive:
            if role.alive():
                self.say(f"{role.name} did not exit within {self.grace_s:g}s: SIGKILL")
                role.signal(signal.SIGKILL)
        for role in alive:
            role.proc.wait()
        self.echo_trainer()

    def loop(self) -> int:
        next_status = time.monotonic() + self.status_every_s
        while True:
            if self.signals:
                name = signal.Signals(self.signals[0]).name
                self.stop_all(f"launcher got {name}")
                return 128 + self.signals[0]
            self.echo_trainer()
            for name, role in self.roles.items():
                rc = role.proc.poll()
                if rc is None:
                    continue
                if name == TRAINER and rc == 0:
                    self.say("trainer finished (exit code 0)")
                    return self.finish()
                if name == EVALUATOR and rc == 0:
                    continue  # it evaluated the last step (or it was already): done, not dead
                self.say(f"role {name} died unexpectedly ({_describe_exit(rc)}); last lines of "
                         f"{role.log_path}:\n{_tail(role.log_path)}")
                self.stop_all(f"{name} died")
                return 1
            if time.monotonic() >= next_status:
                self.status()
                next_status = time.monotonic() + self.status_every_s
            time.sleep(0.1)

    def finish(self) -> int:
        """After the trainer's success: stop every role but the evaluator, which is asked to
        finish evaluating what was published and waited for."""
        ev = self.roles.get(EVALUATOR)
        running = ev is not None and ev.alive()
        self.stop_all("run finished", keep=(EVALUATOR,) if running else ())
        if not running:
            return 0 if ev is None or ev.proc.returncode == 0 else self._died(ev)
        self.say("waiting for the evaluator to evaluate the published weights")
        ev.signal(signal.SIGUSR1)
        while ev.alive():
            if self.signals:
                self.stop_all(f"launcher got {signal.Signals(self.signals[0]).name}")
                return 128 + self.signals[0]
            time.sleep(0.1)
        return 0 if ev.proc.returncode == 0 else self._died(ev)

    def _died(self, role: _Role) -> int:
        self.say(f"role {role.name} died unexpectedly ({_describe_exit(role.proc.returncode)}); last lines of "
                 f"{role.log_path}:\n{_tail(role.log_path)}")
        return 1


def run(config_arg: str, workdir: str, overrides: Sequence[str] = (), num_workers: int | None = None,
        *, fresh: bool = False, commands: Mapping[str, Sequence[str]] | None = None,
        out: TextIO | None = None) -> int:
    """Starts every role, supervises them, returns the launcher's exit status.

    ``commands`` (role -> argv, in start order; a role named 'trainer' decides success) replaces
    the real role command lines, for tests. ``num_workers`` defaults to config.launch.num_workers.
    """
    from rlax_tpu.config import load_config, run_config

    out = out if out is not None else sys.stdout
    config = load_config(config_arg, overrides)  # parsed as every role will parse it
    lc = config.launch
    workers = lc.num_workers if num_workers is None else int(num_workers)
    if workers < 0:
        raise LaunchError(f"--num_workers must be >= 0, got {workers}")
    prepare_workdir(workdir, fresh)
    run_config.check(config, workdir, write=False)  # a resume with another config fails before any role starts
    if commands is None:
        from rlax_tpu.config.sections import eval as eval_section

        commands = role_commands(config_arg, workdir, overrides, workers, evaluator=eval_section.enabled(config))
    cores = pinned_cores(list(commands), lc.trainer_cores) if lc.pin_workers else {}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    log_dir = os.path.join(workdir, "logs")

    roles: dict[str, _Role] = {}
    launcher = _Launcher(roles, float(lc.grace_s), float(lc.status_every_s), bool(lc.tail_trainer), out)
    previous = {s: signal.signal(s, launcher.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for name, argv in commands.items():
            roles[name] = _Role(name, argv, os.path.join(log_dir, f"{name}.log"), env, cores.get(name))
            where = f", cores {','.join(map(str, cores[name]))}" if name in cores else ""
            launcher.say(f"started {name} (pid {roles[name].proc.pid}{where}), log: {roles[name].log_path}")
        if TRAINER in roles:
            launcher._tail_pos = roles[TRAINER].start_offset
        launcher.status()
        return launcher.loop()
    finally:
        launcher.stop_all("launcher exiting")
        for s, h in previous.items():
            signal.signal(s, h)
        for role in roles.values():
            role.log.close()


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from rlax_tpu.config import ConfigError

    del argv
    f = flags.FLAGS
    if not f.workdir:
        raise SystemExit("rlax_tpu.launch: --workdir is required")
    config_arg = _config_arg(sys.argv[1:])
    try:
        rc = run(config_arg, f.workdir, passthrough_overrides(sys.argv[1:]), f.num_workers, fresh=f.fresh)
    except (LaunchError, ConfigError) as e:
        raise SystemExit(f"rlax_tpu.launch: {e}") from None
    sys.exit(rc)


def _config_arg(argv: Sequence[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    raise SystemExit("rlax_tpu.launch: --config=configs/X.py[:variant] is required")


def _define_flags() -> None:
    from absl import flags

    from rlax_tpu.config import cli

    cli.define_flags("Run directory (local); logs go to <workdir>/logs.")
    flags.DEFINE_integer("num_workers", None, "Inference workers (default config.launch.num_workers).")
    flags.DEFINE_bool("fresh", False, "Delete the workdir first (only one this launcher created).")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
