"""Named fault points on the publish path, for the kill tests that show a publish killed at any
point never exposes a partial version.

``RLAX_PS_FAULT=<point>[:<n>][:pause]`` makes the publishing process stop at ``point``:
by default it kills itself with SIGKILL; with ``pause`` it prints ``RLAX_PS_FAULT_AT <point>``
to stdout and sleeps so the parent can kill -9 it. Points: ``after_leaves`` (after the n-th leaf
is fully written), ``after_data`` (all leaves written), ``after_manifest``, ``before_cas``,
``after_cas``. Unset in production: one environment lookup per point.
"""

from __future__ import annotations

import os
import signal
import sys
import time

ENV = "RLAX_PS_FAULT"
POINTS = ("after_leaves", "after_data", "after_manifest", "before_cas", "after_cas")


def point(name: str, count: int | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != name:
        return
    pause = parts[-1] == "pause"
    if pause:
        parts = parts[:-1]
    if len(parts) > 1 and count is not None and int(parts[1]) != count:
        return
    if pause:
        print(f"RLAX_PS_FAULT_AT {name}", flush=True)
        sys.stdout.flush()
        while True:
            time.sleep(60)
    os.kill(os.getpid(), signal.SIGKILL)
