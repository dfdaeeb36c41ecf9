"""Graceful shutdown on SIGTERM/SIGINT (preemption, Ctrl-C) with a hard deadline.

Usage in the step loop::

    with GracefulExit(config.trainer.sigterm_grace_s) as stop:
        for step in ...:
            ...one step (may check ``stop.requested`` between phases to cut it short)...
            if stop.requested:
                break
        checkpointer.save(step, ...); checkpointer.wait()   # then release resources
    sys.exit(0)

- The first SIGTERM or SIGINT only sets ``requested`` and starts a watchdog.
- A second SIGINT raises KeyboardInterrupt at once (the user insists); a second SIGTERM is
  logged and otherwise ignored (schedulers often repeat it).
- If the process has not exited ``grace_s`` seconds after the first signal, the watchdog prints
  why to stderr and calls ``os._exit(FORCED_EXIT_CODE)``: a hung save or collective never keeps a
  preempted VM (or the launcher) waiting forever.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

# Exit status when the grace period ran out (distinct from 0 = clean, 1 = crash, 128+n = signal).
FORCED_EXIT_CODE = 75


class GracefulExit:
    """Turns SIGTERM/SIGINT into a flag; force-exits if shutdown exceeds ``grace_s`` seconds."""

    def __init__(self, grace_s: float, *, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
                 name: str = "trainer"):
        if grace_s <= 0:
            raise ValueError(f"grace_s must be positive, got {grace_s}")
        self.grace_s = float(grace_s)
        self.signals = tuple(signals)
        self.name = name
        self.signal_name: str | None = None  # the first signal received
        self.requested_at: float | None = None
        self._event = threading.Event()
        self._previous: dict[int, object] = {}
        self._watchdog: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        """True once a stop was requested (signal or ``request()``)."""
        return self._event.is_set()

    def install(self) -> GracefulExit:
        """Installs the handlers (main thread only); returns self."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("GracefulExit.install() must be called from the main thread")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restores the previous handlers and cancels the watchdog (shutdown finished in time)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def request(self, reason: str = "requested") -> None:
        """Requests a stop from code (e.g. a fencing error); starts the watchdog like a signal."""
        if self._event.is_set():
            return
        self.signal_name = reason
        self.requested_at = time.monotonic()
        self._event.set()
        self._watchdog = threading.Timer(self.grace_s, self._force_exit)
        self._watchdog.daemon = True
        self._watchdog.start()

    def remaining_s(self) -> float:
        """Seconds left of the grace period (inf before any stop request)."""
        if self.requested_at is None:
            return float("inf")
        return max(0.0, self.grace_s - (time.monotonic() - self.requested_at))

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self._event.is_set():
            print(f"[{self.name}] {name} received: finishing the current step, saving and exiting "
                  f"(force exit in {self.grace_s:g}s)", file=sys.stderr, flush=True)
            self.request(name)
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name} during graceful shutdown")
        print(f"[{self.name}] {name} received again: already shutting down "
              f"({self.remaining_s():.0f}s left)", file=sys.stderr, flush=True)

    def _force_exit(self) -> None:
        print(f"[{self.name}] graceful shutdown after {self.signal_name} did not finish within "
              f"{self.grace_s:g}s (config.trainer.sigterm_grace_s): forcing exit with status "
              f"{FORCED_EXIT_CODE}", file=sys.stderr, flush=True)
        os._exit(FORCED_EXIT_CODE)

    def __enter__(self) -> GracefulExit:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
