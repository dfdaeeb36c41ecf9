"""config.sandbox: limits and layers of the code-execution sandbox (see docs/envs.md)."""

import ml_collections

from rlax_tpu.config.sections._checks import positive, require

SECTION = "sandbox"


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # CPU seconds one execution may use (RLIMIT_CPU; SIGKILL one second later). Reason 'timeout'.
    c.cpu_seconds = 2
    # Wall-clock seconds before the whole process group is killed (sleeping programs use no
    # CPU). Reason 'timeout'.
    c.wall_seconds = 5.0
    # Address-space cap of each process in MiB (RLIMIT_AS); past it allocations fail with
    # MemoryError. Reason 'memory'.
    c.memory_mb = 512
    # Processes (threads included) the sandbox's uid may have at once (RLIMIT_NPROC); a fork bomb
    # hits it. Reason 'forbidden'.
    c.max_processes = 16
    # Largest file the program may write, in MiB (RLIMIT_FSIZE); also the size of its private
    # tmpfs /tmp. Reason 'output_limit'.
    c.file_size_mb = 16
    # Bytes of stdout and of stderr kept; a program writing more is killed. Reason 'output_limit'.
    c.output_bytes = 65536
    # Concurrent executions of a SandboxPool (threads each waiting on one sandboxed child).
    c.workers = 4
    # Without a working bubblewrap: True refuses every execution (reason 'error', infra=True);
    # False runs degraded (rlimits, unprivileged uid when root, empty environment, fresh
    # working directory, wall-clock kill; no filesystem or network isolation). Either way one
    # warning names the active layers.
    c.require_bwrap = True
    # When running as root, each concurrent execution drops to its own uid from
    # [first_uid, first_uid + num_uids), taken under a lock file so that processes sharing the
    # host never share a uid (RLIMIT_NPROC counts every process of a uid).
    c.first_uid = 61000
    c.num_uids = 64
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    require(isinstance(c.cpu_seconds, int) and not isinstance(c.cpu_seconds, bool) and c.cpu_seconds >= 1,
            "sandbox.cpu_seconds", f"must be an int >= 1, got {c.cpu_seconds!r}")
    for f in ("wall_seconds", "memory_mb", "max_processes", "file_size_mb", "output_bytes", "workers",
              "num_uids"):
        positive(SECTION, c, f)
    require(c.memory_mb >= 64, "sandbox.memory_mb", f"must be >= 64 (the interpreter needs it), got {c.memory_mb}")
    require(c.max_processes >= 2, "sandbox.max_processes", f"must be >= 2, got {c.max_processes}")
    require(isinstance(c.require_bwrap, bool), "sandbox.require_bwrap", f"must be a bool, got {c.require_bwrap!r}")
    require(isinstance(c.first_uid, int) and 1000 <= c.first_uid and c.first_uid + c.num_uids <= 65534,
            "sandbox.first_uid", f"uids [first_uid, first_uid + num_uids) must lie in [1000, 65534), "
            f"got first_uid={c.first_uid!r}, num_uids={c.num_uids!r}")
    require(c.workers <= c.num_uids, "sandbox.workers",
            f"must be <= sandbox.num_uids={c.num_uids} (one uid per concurrent execution), got {c.workers}")
