"""Running untrusted Python: bubblewrap, an unprivileged uid, rlimits and a wall-clock kill.

    from rlax_tpu import sandbox
    res = sandbox.run_python("print(input()[::-1])", stdin="abc")   # SandboxResult, never raises
    res.ok, res.reason, res.stdout                                  # True, '', 'cba\\n'
    pool = sandbox.SandboxPool.from_config(config.sandbox)          # N at once, futures

Layers and reasons: docs/envs.md and rlax_tpu/sandbox/runner.py.
"""

from __future__ import annotations

import threading

from rlax_tpu.sandbox.limits import REASONS, SandboxLimits, SandboxResult, infra_error
from rlax_tpu.sandbox.pool import SandboxPool
from rlax_tpu.sandbox.runner import UidSlots, execute, layers

__all__ = ["REASONS", "SandboxLimits", "SandboxPool", "SandboxResult", "infra_error", "layers", "run_python"]

_slots: UidSlots | None = None
_slots_lock = threading.Lock()


def run_python(source: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Runs source as a Python program in the sandbox and waits for it; never raises.

    limits: None = config.sandbox's defaults. The uid range is the default section's too (a
    SandboxPool built from a config uses that config's)."""
    global _slots
    from rlax_tpu.config.sections import sandbox as section

    with _slots_lock:
        if _slots is None:
            d = section.defaults()
            _slots = UidSlots(int(d.first_uid), int(d.num_uids))
    return execute(source, stdin, limits or SandboxLimits.default(), _slots)
