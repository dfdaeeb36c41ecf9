"""The sandbox against hostile programs: each ends with a named reason and the caller alive."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from rlax_tpu import sandbox
from rlax_tpu.config import ConfigError, get_base_config, validate
from rlax_tpu.sandbox import SandboxLimits, SandboxPool
from tests.rlax_tpu.sandbox.usable import needs_bwrap

pytestmark = needs_bwrap

TIGHT = SandboxLimits.default().replace(cpu_seconds=1, wall_seconds=2.0, memory_mb=256, max_processes=8,
                                        file_size_mb=4, output_bytes=4096)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=4, limits=TIGHT, first_uid=61000, num_uids=64) as p:
        yield p


def test_plain_program_runs_with_stdin():
    res = sandbox.run_python("import sys\nprint(sys.stdin.read()[::-1])", stdin="abc", limits=TIGHT)
    assert res.ok and res.reason == "" and res.stdout == "cba\n" and res.exit_code == 0
    assert not res.infra and res.wall_s > 0


def test_an_exception_is_a_crash_with_its_traceback():
    res = sandbox.run_python("def f():\n    raise ValueError('boom')\nf()", limits=TIGHT)
    assert (res.ok, res.reason) == (False, "crashed")
    assert "ValueError: boom" in res.stderr and "ValueError" in res.detail


def test_hostile_programs_end_with_their_reason(pool, tmp_path):
    # a host service the sandbox must not reach
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-TOKEN")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)  # readable by any uid on the host: only the mount namespace hides it
    os.environ["RLAX_SANDBOX_TEST_SECRET"] = "HOST-ENV-VALUE"
    outside = tmp_path / "written_from_inside"
    cases = {
        "infinite loop": ("while True:\n    pass", "timeout"),
        "sleep forever": ("import time\ntime.sleep(10**6)", "timeout"),
        "ignores SIGTERM": ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                            "time.sleep(10**6)", "timeout"),
        "fork bomb": ("import os\nwhile True:\n    os.fork()", "forbidden"),
        # growing 16 MiB then 512 MiB at a time (zero-filling hundreds of MiB is slow on a loaded host)
        "memory hog": ("x = [bytearray(16 << 20) for _ in range(4)]\nwhile True:\n"
                       "    x.append(bytearray(512 << 20))", "memory"),
        "tcp to host": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)", "forbidden"),
        "dns lookup": ("import socket\nsocket.getaddrinfo('example.com', 80)", "forbidden"),
        "read file outside": (f"print(open({str(secret)!r}).read())", "crashed"),
        "read /root": ("import os\nprint(os.listdir('/root'))", "crashed"),
        "read /etc/shadow": ("print(open('/etc/shadow').read())", "crashed"),
        "write outside tmp": ("open('/usr/pwned', 'w').write('x')", "forbidden"),
        "write host path": (f"open({str(outside)!r}, 'w').write('x')", "crashed"),
        "huge file": ("with open('/tmp/big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))",
                      "output_limit"),
        "huge stdout": ("while True:\n    print('y' * 1000)", "output_limit"),
        # the parent (the namespace's init) belongs to another uid: the kill is refused
        "kill parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "forbidden"),
        # every process of its uid in its namespace, itself included; nothing outside
        "kill everything": ("import os, signal, time\nos.kill(-1, signal.SIGKILL)\ntime.sleep(10**6)",
                            "crashed"),
        "exits non-zero": ("import sys\nsys.exit(3)", "crashed"),
        "segfault": ("import ctypes\nctypes.string_at(0)", "crashed"),
    }
    try:
        t0 = time.monotonic()
        futures = {name: pool.submit(src) for name, (src, _) in cases.items()}
        results = {name: f.result(timeout=60) for name, f in futures.items()}
        elapsed = time.monotonic() - t0
    finally:
        server.close()
        del os.environ["RLAX_SANDBOX_TEST_SECRET"]
    wrong = {name: (r.reason, r.detail, r.wall_s) for name, r in results.items() if r.reason != cases[name][1]}
    assert wrong == {}
    for name, r in results.items():
        assert not r.ok and not r.infra, name
        assert r.wall_s < TIGHT.wall_seconds + 2.0, (name, r.wall_s)
        assert "TOP-SECRET-TOKEN" not in r.stdout + r.stderr, name
    assert not outside.exists()
    assert "FileNotFoundError" in results["read file outside"].stderr
    assert len(results["huge stdout"].stdout.encode()) <= TIGHT.output_bytes
    assert elapsed < 30  # four at a time: the wall kills keep it bounded


def test_the_host_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("RLAX_SANDBOX_TEST_SECRET", "HOST-ENV-VALUE")
    res = sandbox.run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('HOME'))", limits=TIGHT)
    assert res.ok
    assert "RLAX_SANDBOX_TEST_SECRET" not in res.stdout and "HOST-ENV-VALUE" not in res.stdout
    assert "'PATH'" not in res.stdout and res.stdout.endswith("None\n")


def test_isolation_is_what_the_program_sees():
    res = sandbox.run_python(
        "import os\nprint(os.getuid() != 0, os.getpid() < 10, sorted(os.listdir('/')))\n"
        "open('/tmp/ok', 'w').write('fine')\nprint(open('/tmp/ok').read())", limits=TIGHT)
    assert res.ok, res
    first, second = res.stdout.splitlines()
    assert first.startswith("True True")
    assert "root" not in first and "home" not in first and "work" not in first
    assert second == "fine"


def test_a_child_left_behind_is_killed_with_the_group(tmp_path):
    # the program starts a sleeper and exits at once; the sleeper must not outlive the run
    marker = f"rlax-sandbox-orphan-{os.getpid()}"
    src = ("import subprocess, sys\n"
           f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}])\n"
           "print('started')")
    res = sandbox.run_python(src, limits=TIGHT)
    assert res.ok and res.stdout == "started\n", res
    time.sleep(0.3)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert marker not in ps


def test_process_limit_is_per_execution_uid(pool):
    # concurrent executions each get their own uid, so one fork bomb does not starve the others
    src = "import os, time\ntime.sleep(0.5)\nprint(os.getuid())"
    results = pool.map([src] * 4)
    assert all(r.ok for r in results), results
    uids = {int(r.stdout) for r in results}
    assert len(uids) == 4 and all(61000 <= u < 61064 for u in uids)


def test_infra_failures_are_marked():
    p = SandboxPool(workers=1, limits=TIGHT, first_uid=61000, num_uids=4)
    p.shutdown()
    res = p.submit("print(1)").result()
    assert (res.ok, res.reason, res.infra) == (False, "error", True)
    assert "shut down" in res.detail


def test_refuses_without_bubblewrap(monkeypatch, caplog):
    from rlax_tpu.sandbox import runner

    monkeypatch.setattr(runner, "_probe", {})
    which = shutil.which
    monkeypatch.setattr(runner.shutil, "which", lambda name: None if name == "bwrap" else which(name))
    res = sandbox.run_python("print(1)", limits=TIGHT)
    assert (res.reason, res.infra) == ("error", True)
    assert "bubblewrap unusable" in res.detail and "refused" in res.detail
    assert any("bubblewrap unusable" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(runner, "_probe", {})
    monkeypatch.setenv("RLAX_SANDBOX_TEST_SECRET", "HOST-ENV-VALUE")
    degraded = sandbox.run_python("import os\nprint(sorted(os.environ))", limits=TIGHT.replace(require_bwrap=False))
    assert degraded.ok and "RLAX_SANDBOX_TEST_SECRET" not in degraded.stdout  # (Python adds LC_CTYPE)
    timeout = sandbox.run_python("while True: pass", limits=TIGHT.replace(require_bwrap=False))
    assert timeout.reason == "timeout"


def test_config_section_is_validated():
    c = get_base_config()
    validate(c)
    c.sandbox.workers = 1000
    with pytest.raises(ConfigError, match="sandbox.workers"):
        validate(c)
    c = get_base_config()
    c.sandbox.cpu_seconds = 0
    with pytest.raises(ConfigError, match="sandbox.cpu_seconds"):
        validate(c)
    limits = SandboxLimits.from_config(get_base_config())
    assert limits == SandboxLimits.default() and limits.cpu_seconds == get_base_config().sandbox.cpu_seconds
