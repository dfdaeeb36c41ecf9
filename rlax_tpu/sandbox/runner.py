"""One sandboxed Python execution: bubblewrap, an unprivileged uid, rlimits, a wall-clock kill.

Layers, outermost first:
  bubblewrap  new network namespace (only a loopback device: no host services, no DNS), new PID
              namespace (everything left behind dies with its init), /usr and the interpreter's
              prefix read-only (at /opt/py, since a pyenv prefix under /root is unreadable to
              other uids), a private tmpfs /tmp as the only writable place, an empty environment,
              --die-with-parent, --new-session. No home directory, workdir or host /tmp.
  setpriv     when running as root, a uid of its own per concurrent execution (RLIMIT_NPROC is
              ignored for root and counts every process of a uid on the host).
  launcher    python -I -S (isolated, no site: the standard library only, and no site-packages
              .pth hooks, which cost a pyenv interpreter 150 ms a start) running a few lines that
              set RLIMIT_CPU/AS/NPROC/FSIZE (hard = soft, so
              the program cannot raise them), report that it started, run the program in the
              same interpreter (one interpreter start per execution) and report the exception
              that ended it on a side pipe, which names the reason without parsing stderr.
  parent      a wall-clock kill of the whole process group and output truncated at a limit.

Children are started with subprocess (exec, never a fork that runs Python: tensorstore aborts in
a forked child). Without bubblewrap the run refuses or degrades per limits.require_bwrap.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from rlax_tpu.sandbox.limits import SandboxLimits, SandboxResult, infra_error

log = logging.getLogger(__name__)

INSIDE_PREFIX = "/opt/py"
SOURCE_PATH = "/sandbox/main.py"
_MIB = 1 << 20
# errnos that mean an isolation layer refused: permissions, read-only mounts, no route, the
# process limit (fork's EAGAIN), a refused connection (nothing of the host listens inside).
_FORBIDDEN_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENETUNREACH, errno.EAGAIN,
                     errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL}
_FORBIDDEN_TYPES = {"PermissionError", "gaierror", "ConnectionRefusedError", "BlockingIOError"}
_OUTPUT_ERRNOS = {errno.EFBIG, errno.ENOSPC}

# Runs inside: argv = report fd, cpu s, address space bytes, processes, file size bytes.
LAUNCHER = """\
import builtins, os, resource, sys
fd = int(sys.argv[1]); cpu, mem, nproc, fsize = map(int, sys.argv[2:6]); src_path = sys.argv[6]
os.set_inheritable(fd, False)
builtins.exit = builtins.quit = sys.exit  # -S skips site, which would define them
for r, v, h in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, mem, mem),
                (resource.RLIMIT_NPROC, nproc, nproc), (resource.RLIMIT_FSIZE, fsize, fsize),
                (resource.RLIMIT_CORE, 0, 0)):
    resource.setrlimit(r, (v, h))
with open(src_path) as f:
    src = f.read()
sys.argv = ["main.py"]
os.write(fd, b"R")
try:
    exec(compile(src, "main.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except SystemExit:
    raise
except BaseException as e:
    try:
        os.write(fd, ("E%s %d" % (type(e).__name__, getattr(e, "errno", None) or 0)).encode())
        import traceback  # only on failure: importing it costs more than the interpreter's start
        traceback.print_exc()
    finally:
        sys.exit(1)
"""


class UidSlots:
    """Hands out uids from [first, first + count), each under an exclusive lock file so that
    concurrent executions, in this process or another on the host, never share one."""

    def __init__(self, first: int, count: int):
        self.first, self.count = first, count
        self.dir = os.path.join(tempfile.gettempdir(), "rlax_tpu_sandbox_uids")
        os.makedirs(self.dir, exist_ok=True)

    def acquire(self, timeout_s: float) -> tuple[int, int] | None:
        """(uid, lock fd), or None when every uid stayed taken for timeout_s."""
        end = time.monotonic() + timeout_s
        while True:
            start = random.randrange(self.count)
            for i in range(self.count):
                uid = self.first + (start + i) % self.count
                fd = os.open(os.path.join(self.dir, str(uid)), os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return uid, fd
                except BlockingIOError:
                    os.close(fd)
            if time.monotonic() > end:
                return None
            time.sleep(0.01)

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)  # closing drops the flock


def interpreter() -> tuple[str, str]:
    """(the base interpreter's real path, its prefix): a venv's python is a link to it."""
    exe = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    candidate = os.path.join(prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")
    if os.path.exists(candidate):
        exe = os.path.realpath(candidate)
    return exe, prefix


def _system_binds() -> list[str]:
    """/usr read-only, and the top-level /bin, /lib* either as the host's symlinks into /usr or
    bound read-only where they are real directories."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def bwrap_command(limits: SandboxLimits, uid: int | None, source_fd: int, report_fd: int) -> list[str]:
    """The bubblewrap command line running the launcher on the source read from source_fd."""
    exe, prefix = interpreter()
    cmd = ["bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
           "--unshare-cgroup-try", "--die-with-parent", "--new-session", *_system_binds()]
    if prefix == "/usr" or prefix.startswith("/usr/"):
        inside_exe = exe
    else:
        # bwrap makes missing parents mode 0700: the dropped uid could not reach the interpreter
        cmd += ["--perms", "0755", "--dir", os.path.dirname(INSIDE_PREFIX), "--ro-bind", prefix, INSIDE_PREFIX]
        inside_exe = INSIDE_PREFIX + exe[len(prefix):] if exe.startswith(prefix + "/") else exe
    cmd += ["--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(limits.file_size_mb * _MIB), "--tmpfs", "/tmp",
            "--perms", "0755", "--dir", os.path.dirname(SOURCE_PATH),
            "--perms", "0444", "--ro-bind-data", str(source_fd), SOURCE_PATH,
            "--chdir", "/tmp", "--clearenv"]
    if not (prefix == "/usr" or prefix.startswith("/usr/")):
        # a shared libpython found through the build's RPATH, which points at the host prefix
        cmd += ["--setenv", "LD_LIBRARY_PATH", INSIDE_PREFIX + "/lib"]
    if uid is not None:
        cmd += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return cmd + [inside_exe, "-I", "-S", "-c", LAUNCHER, *_launcher_args(limits, report_fd, SOURCE_PATH)]


def _launcher_args(limits: SandboxLimits, report_fd: int, source_path: str) -> list[str]:
    return [str(report_fd), str(limits.cpu_seconds), str(limits.memory_mb * _MIB),
            str(limits.max_processes), str(limits.file_size_mb * _MIB), source_path]


_probe_lock = threading.Lock()
_probe: dict[str, object] = {}


def layers(limits: SandboxLimits) -> tuple[bool, str]:
    """(whether bubblewrap works here, a sentence naming the active layers); probed once per
    process, and said once in the log (a warning when bubblewrap is missing)."""
    with _probe_lock:
        if "bwrap" not in _probe:
            _probe["bwrap"], why = _probe_bwrap(limits)
            root = os.geteuid() == 0
            priv = "setpriv to a uid per execution" if root and shutil.which("setpriv") else (
                "the caller's own unprivileged uid" if not root else "NO uid drop (setpriv missing: root)")
            common = f"rlimits (cpu, address space, processes, file size), {priv}, empty environment, " \
                     "wall-clock kill of the process group, output truncation"
            if _probe["bwrap"]:
                _probe["text"] = ("sandbox layers: bubblewrap (no network, pid namespace, read-only system "
                                  f"dirs, private /tmp, dies with parent), {common}")
                log.info(_probe["text"])
            else:
                mode = ("executions are refused (sandbox.require_bwrap=True) or run DEGRADED, without "
                        "filesystem or network isolation (require_bwrap=False)")
                _probe["text"] = f"sandbox: bubblewrap unusable ({why}); {mode}; active layers: {common}"
                log.warning(_probe["text"])
        return bool(_probe["bwrap"]), str(_probe["text"])


def _probe_bwrap(limits: SandboxLimits) -> tuple[bool, str]:
    if shutil.which("bwrap") is None:
        return False, "bwrap not installed (scripts/setup.sh installs it with apt-get when root)"
    try:
        # a generous wall clock: a probe slowed by a loaded host must not disable bubblewrap
        res = _run(limits.replace(wall_seconds=max(30.0, limits.wall_seconds)), "print('ok')", "", uid=None,
                   use_bwrap=True)
    except OSError as e:
        return False, f"bwrap failed to start: {e}"
    if res.ok and res.stdout.strip() == "ok":
        return True, ""
    return False, f"bwrap probe failed: {(res.detail or res.stderr).strip()[:300]}"


def execute(source: str, stdin: str, limits: SandboxLimits, slots: UidSlots) -> SandboxResult:
    """Runs source in the sandbox; never raises. A uid is held from slots for the run."""
    if not isinstance(source, str) or not isinstance(stdin, str):
        return SandboxResult(ok=False, reason="error", stdout="", stderr="", exit_code=None, wall_s=0.0,
                             detail="source and stdin must be str")
    bwrap_ok, text = layers(limits)
    if not bwrap_ok and limits.require_bwrap:
        return infra_error(text)
    held = None
    if os.geteuid() == 0 and shutil.which("setpriv"):
        held = slots.acquire(timeout_s=limits.wall_seconds)
        if held is None:
            return infra_error(f"no free sandbox uid in [{slots.first}, {slots.first + slots.count})")
    try:
        return _run(limits, source, stdin, uid=held[0] if held else None, use_bwrap=bwrap_ok)
    except Exception as e:  # noqa: BLE001 - a failure to start is the infrastructure's
        return infra_error(f"sandbox could not start: {type(e).__name__}: {e}")
    finally:
        if held:
            slots.release(held[1])


def _run(limits: SandboxLimits, source: str, stdin: str, uid: int | None, use_bwrap: bool) -> SandboxResult:
    t0 = time.monotonic()
    report_r, report_w = os.pipe()
    tmpdir = None
    src_fd = -1
    try:
        if use_bwrap:
            src_fd = os.memfd_create("main.py")
            os.write(src_fd, source.encode("utf-8", "surrogatepass"))
            os.lseek(src_fd, 0, os.SEEK_SET)
            cmd, cwd, fds = bwrap_command(limits, uid, src_fd, report_w), None, (src_fd, report_w)
        else:
            tmpdir = tempfile.mkdtemp(prefix="rlax_sandbox_")
            os.chmod(tmpdir, 0o777)
            path = os.path.join(tmpdir, "main.py")
            with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
                f.write(source)
            os.chmod(path, 0o444)
            cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid is not None else []
            cmd += [interpreter()[0], "-I", "-S", "-c", LAUNCHER, *_launcher_args(limits, report_w, path)]
            cwd, fds = tmpdir, (report_w,)
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={}, cwd=cwd, pass_fds=fds, start_new_session=True, close_fds=True)
    finally:
        os.close(report_w)
        if src_fd >= 0:
            os.close(src_fd)
    try:
        out, err, report, why = _communicate(proc, stdin.encode(), report_r, limits, t0)
        if not why and not _reap(proc, t0 + limits.wall_seconds):
            why = "timeout"  # pipes closed but the launcher is still running
    finally:
        _kill_group(proc)
        _reap(proc, None)
        os.close(report_r)
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
    wall = time.monotonic() - t0
    stdout = out[:limits.output_bytes].decode("utf-8", "replace")
    stderr = err[:limits.output_bytes].decode("utf-8", "replace")
    rc = proc.returncode
    reason, infra, detail = _classify(rc, report, why, wall >= limits.cpu_seconds)
    if infra:
        detail = f"{detail}: {stderr.strip()[-500:]}"
    return SandboxResult(ok=reason == "", reason=reason, stdout=stdout, stderr=stderr, exit_code=rc,
                         wall_s=wall, infra=infra, detail=detail)


def _communicate(proc: subprocess.Popen, data: bytes, report_fd: int, limits: SandboxLimits,
                 t0: float) -> tuple[bytes, bytes, bytes, str]:
    """Feeds stdin and collects stdout, stderr and the launcher's report until every pipe closes,
    the wall clock runs out ('timeout') or an output passes its limit ('output_limit')."""
    sel = selectors.DefaultSelector()
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), report_fd: bytearray()}
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    stdin_fd = proc.stdin.fileno()
    if data:
        os.set_blocking(stdin_fd, False)
        sel.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    view, why = memoryview(data), ""
    deadline = t0 + limits.wall_seconds
    open_reads = 3
    try:
        while open_reads:
            left = deadline - time.monotonic()
            if left <= 0:
                why = "timeout"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        n = os.write(fd, view[:65536])
                    except (BrokenPipeError, BlockingIOError) as e:
                        n = len(view) if isinstance(e, BrokenPipeError) else 0
                    view = view[n:]
                    if not view:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    open_reads -= 1
                    continue
                bufs[fd] += chunk
                if fd != report_fd and len(bufs[fd]) > limits.output_bytes:
                    why = "output_limit"
                    break
            if why:
                break
    finally:
        sel.close()
        if not proc.stdin.closed:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), bytes(bufs[report_fd]), why


def _reap(proc: subprocess.Popen, deadline: float | None) -> bool:
    """Waits for the child until deadline (None = for good); False if it is still running."""
    try:
        proc.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        return True
    except subprocess.TimeoutExpired:
        return False


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the child's whole process group (bwrap, or the degraded launcher's group); in
    bwrap everything else is in the PID namespace, which dies with its init."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(rc: int | None, report: bytes, why: str, ran_long: bool) -> tuple[str, bool, str]:
    """(reason, infra, detail) from how the run ended, the launcher's report and whether it ran
    for at least its CPU limit in wall time (only then can a SIGKILL be the hard CPU limit; the
    child's CPU time is not visible through bwrap's reaper)."""
    started = report.startswith(b"R")
    if not started:
        return "error", True, "the sandbox did not start" + (f" ({why})" if why else "")
    if why:
        return why, False, why
    if rc == 0:
        return "", False, ""
    if report[1:2] == b"E":
        name, _, num = report[2:].decode(errors="replace").partition(" ")
        code = int(num) if num.lstrip("-").isdigit() else 0
        detail = f"{name} errno={code}"
        if name == "MemoryError":
            return "memory", False, detail
        if code in _OUTPUT_ERRNOS:
            return "output_limit", False, detail
        if name in _FORBIDDEN_TYPES or code in _FORBIDDEN_ERRNOS:
            return "forbidden", False, detail
        return "crashed", False, detail
    sig = (rc - 128) if rc is not None and rc > 128 else (-rc if rc is not None and rc < 0 else 0)
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and ran_long):
        return "timeout", False, f"signal {sig} (CPU limit)"
    if sig == signal.SIGXFSZ:
        return "output_limit", False, "signal SIGXFSZ"
    return "crashed", False, f"exit status {rc}"
