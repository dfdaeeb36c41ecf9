"""A small pool of child processes that run reward checks off the caller's thread, each call
bounded by a wall-clock budget.

The child arms a timer at 80% of the budget, which stops a slow but interruptible computation
(a sympy simplification loop) and keeps the process. At the budget the parent kills the child,
since a call stuck in C (a 10^(10^10) bignum) never sees the timer, and starts a replacement:
one pathological completion costs its budget plus one process start, never a stalled worker.

Children are fresh interpreters started with subprocess rather than fork (tensorstore aborts in
a forked child) and rather than multiprocessing's spawn, which would re-import the parent's
__main__ (the whole model stack) in every child. Calls and results are pickled over two pipes.
The module imports only the standard library, since every child imports it. On Linux a child
dies with its parent (PR_SET_PDEATHSIG), so a killed worker leaves no checker spinning on; as
that signal follows the parent *thread*, children are started from one launcher thread that
lives as long as the process, whichever thread asks for rewards.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

log = logging.getLogger(__name__)

SOFT_FRACTION = 0.8          # the child interrupts itself at this fraction of the budget
STARTUP_TIMEOUT_S = 60.0     # a child not ready by then counts as a failed start
CHILD_MEMORY_BYTES = 4 << 30  # address-space cap: a runaway bignum fails with MemoryError
_BOOT = ("import sys; from rlax_tpu.tasks.reward_pool import child_main; "
         "child_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one call came to: status 'ok' (value = the return value), 'timeout' or 'error'."""

    status: str
    value: Any = None
    error: str = ""
    elapsed_s: float = 0.0


class _Interrupted(BaseException):
    """Raised by the child's timer; a BaseException so that `except Exception` cannot eat it."""


def _resolve(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _call(fn: Callable, args: tuple, soft_s: float) -> tuple:
    state = {"armed": True, "fired": False}

    def on_timer(signum, frame):
        state["fired"] = True
        if state["armed"]:
            raise _Interrupted

    t0 = time.monotonic()
    signal.signal(signal.SIGALRM, on_timer)
    signal.setitimer(signal.ITIMER_REAL, max(soft_s, 1e-3))
    try:
        try:
            value = fn(*args)
        finally:
            state["armed"] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Interrupted:
        return "timeout", None, f"interrupted after {time.monotonic() - t0:.3f}s", time.monotonic() - t0
    except Exception as e:  # noqa: BLE001 - reported to the caller as reason 'error'
        return "error", None, f"{type(e).__name__}: {e}"[:500], time.monotonic() - t0
    if state["fired"]:  # the library caught the interrupt and returned something anyway
        return "timeout", None, "interrupted (caught inside the checker)", time.monotonic() - t0
    return "ok", value, "", time.monotonic() - t0


def _bind_to_parent(parent_pid: int) -> None:
    """Linux: die with the parent, even in the middle of a hung call (an orphan would spin on)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass


def child_main(request_fd: int, result_fd: int, warmup: str = "", parent_pid: int = 0) -> None:
    """The child's loop: (fn, args, soft_s) in; ("start",) then (status, value, error, elapsed_s)
    out. The budget runs from "start": loading fn's module on first use is not the call's time."""
    if parent_pid:
        _bind_to_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us
    logging.disable(logging.WARNING)  # math-verify warns on every call made without its alarm
    requests = Connection(request_fd, writable=False)
    results = Connection(result_fd, readable=False)
    if warmup:
        _resolve(warmup)()
    try:
        _serve(requests, results)
    except OSError:  # BrokenPipe: the parent closed the pool or exited
        pass


def _serve(requests: Connection, results: Connection) -> None:
    results.send(("ready", os.getpid()))
    while True:
        try:
            fn, args, soft_s = requests.recv()
        except (EOFError, OSError):
            return  # the parent is gone or closed the pipe
        except Exception as e:  # noqa: BLE001 - e.g. fn's module cannot be imported here
            results.send(("error", None, f"cannot load the call: {type(e).__name__}: {e}"[:500], 0.0))
            continue
        results.send(("start",))
        reply = _call(fn, args, soft_s)
        try:
            results.send(reply)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - an unpicklable return value
            results.send(("error", None, f"cannot send the result: {type(e).__name__}: {e}"[:500],
                          reply[3]))


_LAUNCHER: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None  # (pid, executor)
_LAUNCHER_LOCK = threading.Lock()


def _launch(cmd: list[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen in the process-wide launcher thread (see the module docstring)."""
    global _LAUNCHER
    with _LAUNCHER_LOCK:
        if _LAUNCHER is None or _LAUNCHER[0] != os.getpid():  # none yet, or a forked copy without it
            executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reward-pool-launcher")
            _LAUNCHER = (os.getpid(), executor)
        launcher = _LAUNCHER[1]
    return launcher.submit(subprocess.Popen, cmd, **kwargs).result()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) if p else os.getcwd() for p in sys.path)
    return env


class _Child:
    def __init__(self, warmup: str):
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        try:
            self.proc = _launch([sys.executable, "-c", _BOOT, str(req_r), str(res_w), warmup, str(os.getpid())],
                                pass_fds=(req_r, res_w), stdin=subprocess.DEVNULL, env=_child_env())
        except BaseException:
            for fd in (req_w, res_r):
                os.close(fd)
            raise
        finally:
            os.close(req_r)
            os.close(res_w)
        self.requests = Connection(req_w, readable=False)
        self.results = Connection(res_r, writable=False)
        self.started = time.monotonic()
        self.ready = False
        # (call index, start, deadline); until the child says "start", the deadline is loose
        self.job: tuple[int, float, float] | None = None

    def close(self, grace_s: float = 0.0) -> None:
        """Closes the pipes (a healthy child exits on EOF), then kills it after grace_s."""
        for conn in (self.requests, self.results):
            try:
                conn.close()
            except OSError:
                pass
        if grace_s > 0:
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class RewardPool:
    """`map(fn, args_list, timeout_s)` runs fn(*args) for each args in the children.

    fn must be a module-level function importable in a fresh interpreter (it is pickled by
    name). Children start on first use (warmup, a 'module:function', runs before a child takes
    calls) and are reused; calls from several threads are served one map at a time.
    """

    def __init__(self, size: int, warmup: str = "", startup_timeout_s: float = STARTUP_TIMEOUT_S):
        if size < 1:
            raise ValueError(f"RewardPool size must be >= 1, got {size}")
        self.size, self.warmup, self.startup_timeout_s = int(size), warmup, float(startup_timeout_s)
        self.stats = collections.Counter()  # calls, timeouts, errors, kills, starts, failed_starts
        self._children: list[_Child] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._start_error = ""

    def map(self, fn: Callable, args_list: Sequence[Sequence], timeout_s: float) -> list[Outcome]:
        calls = [tuple(a) for a in args_list]
        if not calls:
            return []
        with self._lock:
            if os.getpid() != self._pid:  # a forked copy: those children belong to the parent
                self._children, self._pid = [], os.getpid()
            return self._run(fn, calls, float(timeout_s))

    def close(self) -> None:
        with self._lock:
            children, self._children = self._children, []
            for child in children:
                child.close(grace_s=1.0)

    # ------------------------------------------------------------------------------------
    def _start(self) -> _Child:
        self.stats["starts"] += 1
        return _Child(self.warmup)

    def _replace(self, k: int, reason: str) -> None:
        old = self._children[k]
        old.close()
        log.warning("reward pool: child %d replaced (%s)", old.proc.pid, reason)
        self._children[k] = self._start()

    def _run(self, fn: Callable, calls: list[tuple], timeout_s: float) -> list[Outcome]:
        out: list[Outcome | None] = [None] * len(calls)
        queue = collections.deque(range(len(calls)))
        failed_starts = 0
        while len(self._children) < self.size:
            self._children.append(self._start())
        soft_s = SOFT_FRACTION * timeout_s
        self.stats["calls"] += len(calls)
        while queue or any(c.job for c in self._children):
            now = time.monotonic()
            for k, child in enumerate(self._children):
                if child.ready and child.job is None and queue:
                    i = queue.popleft()
                    try:
                        child.requests.send((fn, calls[i], soft_s))
                    except (OSError, ValueError):  # the child died while idle: retry elsewhere
                        queue.appendleft(i)
                        self._replace(k, "pipe closed")
                        continue
                    except Exception as e:  # noqa: BLE001 - fn or args cannot be pickled
                        out[i] = Outcome("error", error=f"cannot send the call: {type(e).__name__}: {e}"[:500])
                        continue
                    child.job = (i, now, now + self.startup_timeout_s)
            waiting = [c for c in self._children if c.job or not c.ready]
            deadlines = [c.job[2] if c.job else c.started + self.startup_timeout_s for c in waiting]
            if not waiting:
                continue
            owner = {id(c.results): c for c in waiting}
            for conn in wait([c.results for c in waiting], max(0.0, min(deadlines) - time.monotonic())):
                failed_starts += self._receive(owner[id(conn)], out, timeout_s)
            now = time.monotonic()
            for k, child in enumerate(self._children):
                if child.job and now >= child.job[2] and not self._poll(child, out, timeout_s):
                    i, t0, _ = child.job
                    out[i] = Outcome("timeout", error=f"ran past its {timeout_s:g}s budget; process killed",
                                     elapsed_s=now - t0)  # (or its module took a minute to load)
                    self.stats["timeouts"] += 1
                    self.stats["kills"] += 1
                    self._replace(k, f"call past its {timeout_s:g}s budget")
                elif not child.ready and now >= child.started + self.startup_timeout_s:
                    failed_starts += 1
                    self._start_error = f"not ready after {self.startup_timeout_s:g}s"
                    self._replace(k, "slow start")
            if queue and failed_starts > 2 * self.size:  # cannot start (a missing package?)
                for i in queue:
                    out[i] = Outcome("error", error=f"reward processes failed to start: {self._start_error}")
                queue.clear()
        for o in out:
            self.stats["errors"] += o.status == "error"
        return out

    def _poll(self, child: _Child, out: list, timeout_s: float) -> bool:
        """Takes messages that arrived just before the deadline check; True if the call is done."""
        while child.job and child.results.poll(0):
            self._receive(child, out, timeout_s)
            if child.job and child.job[2] > time.monotonic():
                return True  # it had only just started: a new deadline
        return child.job is None

    def _receive(self, child: _Child, out: list, timeout_s: float) -> int:
        """Handles one message from child; returns 1 for a failed start, else 0."""
        k = self._children.index(child)
        try:
            msg = child.results.recv()
        except (EOFError, OSError):
            child.close()  # reaps it (kills it first if it somehow lives on)
            code = child.proc.returncode
            if child.job:
                i, t0, _ = child.job
                out[i] = Outcome("error", error=f"reward process died (exit code {code})",
                                 elapsed_s=time.monotonic() - t0)
                self._replace(k, f"died with exit code {code}")
                return 0
            self._start_error = f"exit code {code} before it was ready"
            self.stats["failed_starts"] += 1
            self._replace(k, f"failed to start (exit code {code})")
            return 1
        if msg[0] == "ready":
            child.ready = True
            return 0
        if msg[0] == "start":
            now = time.monotonic()
            child.job = (child.job[0], now, now + timeout_s)
            return 0
        status, value, error, elapsed = msg
        i, child.job = child.job[0], None
        out[i] = Outcome(status, value, error, elapsed)
        self.stats["timeouts"] += status == "timeout"
        return 0


_SHARED: dict[str, RewardPool] = {}
_SHARED_LOCK = threading.Lock()


def shared_pool(size: int, warmup: str = "") -> RewardPool:
    """The process-wide pool for this warmup (created on first use, grown to the largest size)."""
    with _SHARED_LOCK:
        pool = _SHARED.get(warmup)
        if pool is None or pool._pid != os.getpid():
            pool = _SHARED[warmup] = RewardPool(size, warmup)
        pool.size = max(pool.size, int(size))
        return pool


@atexit.register
def _close_shared() -> None:
    for pool in list(_SHARED.values()):
        if pool._pid == os.getpid():
            pool.close()
