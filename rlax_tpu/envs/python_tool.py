"""The `python` tool: runs the model's code in the sandbox pool and answers with its output."""

from __future__ import annotations

from collections.abc import Callable

from rlax_tpu.envs.base import Infra
from rlax_tpu.sandbox import SandboxPool

MAX_REPLY_CHARS = 2000


def make_python_tool(pool: SandboxPool) -> Callable[[str], str]:
    def python(code: str) -> str:
        """Runs a Python program and returns what it printed (stdout, then stderr on failure).

        Args:
            code: The complete program; print the values you need.
        """
        res = pool.submit(code).result()
        if res.infra:
            raise Infra(res.detail or "sandbox unavailable")
        out = res.stdout
        if not res.ok:
            out += f"\n[{res.reason}] {res.stderr[-MAX_REPLY_CHARS // 2:]}"
        out = out.strip() or "(no output)"
        return out if len(out) <= MAX_REPLY_CHARS else out[:MAX_REPLY_CHARS] + "\n[output truncated]"

    return python
