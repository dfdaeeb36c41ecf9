"""SandboxPool: N sandboxed executions at once behind futures, off the caller's thread."""

from __future__ import annotations

import concurrent.futures
import threading

from rlax_tpu.sandbox.limits import SandboxLimits, SandboxResult, infra_error
from rlax_tpu.sandbox.runner import UidSlots, execute


class SandboxPool:
    """Runs programs in the sandbox on `workers` threads, each waiting on one child process, so
    a generation loop can keep decoding while tools and verifiers run. Never raises from
    submit(): once the pool is shut down (or a run fails outside the sandbox) the future holds an
    infrastructure result (reason 'error', infra=True), which callers mask.

        pool = SandboxPool.from_config(config.sandbox)
        fut = pool.submit("print(6 * 7)")      # Future[SandboxResult]
        fut.result().stdout == "42\\n"
    """

    def __init__(self, workers: int, limits: SandboxLimits, first_uid: int, num_uids: int):
        self.limits = limits
        self.workers = workers
        self._slots = UidSlots(first_uid, num_uids)
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sandbox")
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_config(cls, section) -> SandboxPool:
        """From config.sandbox (the section, or the whole config)."""
        if "sandbox" in section:
            section = section.sandbox
        return cls(int(section.workers), SandboxLimits.from_config(section), int(section.first_uid),
                   int(section.num_uids))

    def submit(self, source: str, stdin: str = "", limits: SandboxLimits | None = None
               ) -> concurrent.futures.Future[SandboxResult]:
        with self._lock:
            if not self._closed:
                try:
                    return self._executor.submit(self._run, source, stdin, limits or self.limits)
                except RuntimeError:  # the interpreter is shutting down
                    pass
        fut: concurrent.futures.Future[SandboxResult] = concurrent.futures.Future()
        fut.set_result(infra_error("the sandbox pool is shut down"))
        return fut

    def map(self, sources: list[str], stdin: str = "", limits: SandboxLimits | None = None) -> list[SandboxResult]:
        """Runs every source concurrently and returns the results in order."""
        return [f.result() for f in [self.submit(s, stdin, limits) for s in sources]]

    def _run(self, source: str, stdin: str, limits: SandboxLimits) -> SandboxResult:
        try:
            return execute(source, stdin, limits, self._slots)
        except Exception as e:  # noqa: BLE001 - a bug outside the child is the infrastructure's
            return infra_error(f"{type(e).__name__}: {e}")

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
