"""Per-execution limits and the result of one sandboxed run."""

from __future__ import annotations

import dataclasses

# Every reason a run can end with; '' is success.
REASONS = ("", "timeout", "memory", "output_limit", "forbidden", "crashed", "error")


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """What one execution may use; the values live in config.sandbox (see its documentation)."""

    cpu_seconds: int
    wall_seconds: float
    memory_mb: int
    max_processes: int
    file_size_mb: int
    output_bytes: int
    require_bwrap: bool

    @classmethod
    def from_config(cls, section) -> SandboxLimits:
        """From config.sandbox (the section, or the whole config)."""
        if "sandbox" in section:
            section = section.sandbox
        return cls(cpu_seconds=int(section.cpu_seconds), wall_seconds=float(section.wall_seconds),
                   memory_mb=int(section.memory_mb), max_processes=int(section.max_processes),
                   file_size_mb=int(section.file_size_mb), output_bytes=int(section.output_bytes),
                   require_bwrap=bool(section.require_bwrap))

    @classmethod
    def default(cls) -> SandboxLimits:
        """The config section's defaults."""
        from rlax_tpu.config.sections import sandbox

        return cls.from_config(sandbox.defaults())

    def replace(self, **changes) -> SandboxLimits:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """How one execution ended.

    ok: exit status 0 within every limit. reason: '' when ok, else one of REASONS[1:]:
    'timeout' (wall clock or CPU time), 'memory' (address-space limit), 'output_limit' (stdout /
    stderr past output_bytes, or a file past file_size_mb / a full /tmp), 'forbidden' (the
    program hit an isolation layer: network, permissions, process limit), 'crashed' (any other
    non-zero exit or fatal signal), 'error' (the sandbox itself failed). infra: the failure is
    the infrastructure's (pool down, sandbox could not start), not the program's: callers mask
    such a sample instead of scoring it.
    """

    ok: bool
    reason: str
    stdout: str
    stderr: str
    exit_code: int | None
    wall_s: float
    infra: bool = False
    detail: str = ""

    def __post_init__(self):
        if self.reason not in REASONS:
            raise ValueError(f"unknown reason {self.reason!r}")
        if self.ok != (self.reason == ""):
            raise ValueError(f"ok={self.ok} disagrees with reason={self.reason!r}")


def infra_error(detail: str, wall_s: float = 0.0) -> SandboxResult:
    """The result of an execution the sandbox could not run."""
    return SandboxResult(ok=False, reason="error", stdout="", stderr="", exit_code=None, wall_s=wall_s,
                         infra=True, detail=detail[:2000])
