"""rlax_tpu.launch: supervision of role processes (fake roles), signals, workdir handling, worker
pinning, and one real smoke run (janitor, trainer, two inference workers, the evaluator) to
completion."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rlax_tpu import launch
from rlax_tpu.config import ConfigError, load_config
from tests.helpers import ROOT

_ROLE = textwrap.dedent("""
    import os, signal, sys, time
    name, mode, d, roles = sys.argv[1:5]
    def term(*a):
        open(os.path.join(d, name + ".stopped"), "w").write("TERM")
        sys.exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore_term" else term)
    def usr1(*a):  # the evaluator asked to finish: one more 'evaluation', then a clean exit
        time.sleep(0.5)
        open(os.path.join(d, name + ".finished"), "w").write("USR1")
        sys.exit(0)
    signal.signal(signal.SIGUSR1, usr1)
    open(os.path.join(d, name + ".pid"), "w").write(str(os.getpid()))
    print(f"{name} up", flush=True)
    if mode in ("fail", "finish"):
        # End only once every role is up: each writes its pid file after setting its SIGTERM
        # handler, and a role still starting when the launcher stops the others would die of
        # SIGTERM's default action (no .stopped mark, no "did not exit" for ignore_term).
        while not all(os.path.exists(os.path.join(d, r + ".pid")) for r in roles.split(",")):
            time.sleep(0.02)
    if mode == "fail":
        time.sleep(0.3)
        print("boom: something broke", flush=True)
        sys.exit(3)
    if mode == "finish":
        print("[progress] step 1/2", flush=True)
        time.sleep(0.3)
        print("noise line", flush=True)
        print("[progress] step 2/2", flush=True)
        sys.exit(0)
    while True:
        time.sleep(0.05)
""")


def _config(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(
        "from rlax_tpu.config import get_base_config\n"
        "def get_config(arg=''):\n"
        "    c = get_base_config()\n"
        "    c.trainer.sigterm_grace_s = 1.0\n"
        "    c.launch.grace_s = 2.0\n"
        "    c.launch.status_every_s = 0.3\n"
        "    return c\n"
    )
    return str(path)


def _commands(d, **modes):
    roles = ",".join(modes)
    return {name: [sys.executable, "-c", _ROLE, name, mode, str(d), roles] for name, mode in modes.items()}


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_role_dies_stops_others_and_names_it(tmp_path):
    d = tmp_path / "marks"
    d.mkdir()
    out = io.StringIO()
    cmds = _commands(d, param_server="run", trainer="run", worker_0="fail", worker_1="ignore_term")
    t0 = time.monotonic()
    rc = launch.run(_config(tmp_path), str(tmp_path / "wd"), [], commands=cmds, out=out)
    text = out.getvalue()
    assert rc == 1, text
    assert "role worker_0 died unexpectedly (exit code 3)" in text and "boom: something broke" in text
    assert (d / "param_server.stopped").exists() and (d / "trainer.stopped").exists()
    assert "worker_1 did not exit within 2s: SIGKILL" in text
    for name in cmds:
        assert not _pid_alive(int((d / f"{name}.pid").read_text()))
    assert "boom" in (tmp_path / "wd" / "logs" / "worker_0.log").read_text()
    assert "alive 4/4" in text or "alive 3/4" in text
    # The SIGKILL line above shows the 2 s grace was used; this only bounds the whole run (start-up
    # of 4 processes on a loaded machine included) well below the 60 s default grace.
    assert time.monotonic() - t0 < 55


def test_trainer_exit_zero_stops_all_and_echoes_progress(tmp_path):
    d = tmp_path / "marks"
    d.mkdir()
    wd = tmp_path / "wd"
    out = io.StringIO()
    rc = launch.run(_config(tmp_path), str(wd), [],
                    commands=_commands(d, param_server="run", trainer="finish", worker_0="run"), out=out)
    text = out.getvalue()
    assert rc == 0, text
    assert "[trainer] [progress] step 1/2" in text and "[trainer] [progress] step 2/2" in text
    assert "noise line" not in text
    assert (d / "param_server.stopped").exists() and (d / "worker_0.stopped").exists()
    assert (wd / launch.MARKER).exists()
    # Resume: the workdir is kept and logs are appended to.
    rc = launch.run(_config(tmp_path), str(wd), [],
                    commands=_commands(d, trainer="finish"), out=io.StringIO())
    assert rc == 0
    assert (wd / "logs" / "trainer.log").read_text().count("[progress] step 2/2\n") == 2


def test_after_the_trainer_the_evaluator_is_asked_to_finish_and_waited_for(tmp_path):
    d = tmp_path / "marks"
    d.mkdir()
    out = io.StringIO()
    rc = launch.run(_config(tmp_path), str(tmp_path / "wd"), [],
                    commands=_commands(d, param_server="run", trainer="finish", worker_0="run", evaluator="run"),
                    out=out)
    text = out.getvalue()
    assert rc == 0, text
    assert (d / "worker_0.stopped").exists() and (d / "param_server.stopped").exists()
    assert (d / "evaluator.finished").exists() and not (d / "evaluator.stopped").exists()
    assert "waiting for the evaluator" in text


def test_pinned_workers_get_one_core_each(tmp_path):
    names = ["param_server", "trainer", "worker_0", "worker_1", "worker_2", "evaluator"]
    assert launch.pinned_cores(names, 1, cores=[0, 1, 2]) == \
        {"trainer": [0], "worker_0": [1], "worker_1": [2], "worker_2": [1]}
    assert launch.pinned_cores(["worker_0"], 2, cores=[0, 1]) == {"worker_0": [0]}  # no core left: share
    d = tmp_path / "marks"
    d.mkdir()
    cfg = tmp_path / "pin.py"
    cfg.write_text(open(_config(tmp_path)).read().replace("return c", "c.launch.pin_workers = True\n    return c"))
    probe = ("import os, sys; open(sys.argv[1], 'w').write(repr((sorted(os.sched_getaffinity(0)), "
             "os.environ.get('XLA_FLAGS', ''))))")
    wait = f"; import os, time\nwhile not os.path.exists({str(d / 'w0.txt')!r}): time.sleep(0.05)"
    cmds = {"trainer": [sys.executable, "-c", probe + wait, str(d / "trainer.txt")],
            "worker_0": [sys.executable, "-c", probe + "; import time; time.sleep(30)", str(d / "w0.txt")]}
    launch.run(str(cfg), str(tmp_path / "wd"), [], commands=cmds, out=io.StringIO())
    cores, flags = eval((d / "w0.txt").read_text())
    want = launch.pinned_cores(["trainer", "worker_0"], 1)
    assert cores == want["worker_0"] and launch.SINGLE_THREAD_XLA in flags
    cores, flags = eval((d / "trainer.txt").read_text())
    assert cores == want["trainer"] and (launch.SINGLE_THREAD_XLA in flags) == (len(cores) == 1)


def test_sigint_to_launcher_stops_every_role(tmp_path):
    d = tmp_path / "marks"
    d.mkdir()
    cmds = _commands(d, param_server="run", trainer="run", worker_0="run", worker_1="ignore_term")
    code = ("import json, sys; from rlax_tpu.launch import run; "
            "sys.exit(run(sys.argv[1], sys.argv[2], [], commands=json.loads(sys.argv[3])))")
    proc = subprocess.Popen([sys.executable, "-c", code, _config(tmp_path), str(tmp_path / "wd"),
                             json.dumps(cmds)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180  # the launcher's own start-up (imports, config) included
        while not all((d / f"{n}.pid").exists() for n in cmds):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        pids = {n: int((d / f"{n}.pid").read_text()) for n in cmds}
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "launcher got SIGINT" in out
    for n in ("param_server", "trainer", "worker_0"):
        assert (d / f"{n}.stopped").exists()
    assert not any(_pid_alive(p) for p in pids.values())


def test_commands_overrides_and_config(tmp_path):
    cfg = _config(tmp_path)
    ov = launch.passthrough_overrides(["--config=x", "--workdir=w", "--config.rl.max_staleness=0",
                                       "--noconfig.trainer.remat", "--num_workers=2"])
    assert ov == ["--config.rl.max_staleness=0", "--noconfig.trainer.remat"]
    with pytest.raises(launch.LaunchError, match="--config.rl.max_staleness=VALUE"):
        launch.passthrough_overrides(["--config.rl.max_staleness", "0"])
    cmds = launch.role_commands(f"{cfg}:smoke", "/w", ov, 2, evaluator=True)
    assert list(cmds) == ["param_server", "trainer", "worker_0", "worker_1", "evaluator"]
    assert cmds["evaluator"][2] == "inference_worker.evaluator"
    assert cmds["trainer"] == [sys.executable, "-m", "trainer.main", f"--config={cfg}:smoke",
                               "--workdir=/w", *ov]
    assert cmds["worker_1"][2] == "inference_worker.main" and cmds["worker_1"][-1] == "--worker_id=worker_1"
    assert cmds["param_server"][2] == "param_server.main" and cmds["param_server"][-1] == "--mode=janitor"
    config = load_config(cfg, ["--config.launch.grace_s=7", "--config.rl.max_staleness=0"])
    assert config.launch.grace_s == 7.0 and config.rl.max_staleness == 0
    with pytest.raises(ConfigError, match=r"launch\.grace_s"):
        load_config(cfg, ["--config.launch.grace_s=0.5"])  # <= trainer.sigterm_grace_s


def test_fresh_only_deletes_launcher_workdirs(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    with pytest.raises(launch.LaunchError, match="refusing to delete"):
        launch.prepare_workdir(str(foreign), fresh=True)
    assert (foreign / "precious.txt").exists()
    launch.prepare_workdir(str(foreign), fresh=False)  # resuming adopts nothing, deletes nothing
    assert (foreign / "precious.txt").exists() and not (foreign / launch.MARKER).exists()
    mine = tmp_path / "mine"
    launch.prepare_workdir(str(mine), fresh=False)
    (mine / "old.txt").write_text("x")
    launch.prepare_workdir(str(mine), fresh=True)
    assert not (mine / "old.txt").exists() and (mine / launch.MARKER).exists()


def test_cli_rejects_bad_override(tmp_path):
    cmd = [sys.executable, "-m", "rlax_tpu.launch", f"--config={_config(tmp_path)}",
           f"--workdir={tmp_path / 'wd'}", "--config.launch.grace_s=0.5"]
    res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "launch.grace_s" in res.stderr
    assert not (tmp_path / "wd").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_roles_smoke_run_to_completion(tmp_path):
    """The real roles: janitor, trainer, config.launch.num_workers=2 workers and the evaluator, to
    exit 0."""
    wd = tmp_path / "wd"
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
    # launch.grace_s 120 (smoke: 30): a worker that is compiling a new shape when the trainer exits
    # runs its SIGTERM handler (which writes the 'stopped' heartbeat checked below) only after the
    # compile, which on a loaded 2-core machine can outlast 30 s and end in SIGKILL.
    cmd = [sys.executable, "-m", "rlax_tpu.launch", "--config=configs/arith_grpo.py:smoke", f"--workdir={wd}",
           "--config.task.num_eval=4", "--config.sft.steps=5", "--config.store.janitor_interval_s=2",
           "--config.launch.grace_s=120"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert "[trainer] [progress] step 4/4" in out and "trainer finished (exit code 0)" in out, out[-4000:]
    assert "alive 5/5: param_server trainer worker_0 worker_1 evaluator" in out
    logs = wd / "logs"
    assert sorted(os.listdir(logs)) == ["evaluator.log", "param_server.log", "trainer.log", "worker_0.log",
                                        "worker_1.log"]
    evals = [json.loads(line) for line in (wd / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 4] and all(0 <= e["pass@1"] <= e["pass@2"] <= 1 for e in evals)
    assert '{"gc":' in (logs / "param_server.log").read_text()  # the janitor ran
    for i in range(2):
        assert "weights v" in (logs / f"worker_{i}.log").read_text()
    assert "4" in os.listdir(wd / "checkpoints")
    records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "replay/task_ids" in r] == [1, 2, 3, 4]

    # The status command shows the real workers' heartbeats (stopped by SIGTERM) and the epoch.
    res = subprocess.run([sys.executable, "-m", "param_server.main", "--config=configs/arith_grpo.py:smoke",
                          f"--workdir={wd}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "run: trainer epoch 1," in res.stdout, res.stdout
    for i in range(2):
        assert f"  worker_{i}: stopped, last seen" in res.stdout, res.stdout
    # The trainer published step 4; a worker's last heartbeat may predate its pull of it (it is
    # stopped as soon as the trainer exits), so only the store's LATEST must say 4.
    assert re.search(r"LATEST: version \d+ step 4 ", res.stdout), res.stdout
    for i in range(2):
        assert re.search(rf"worker_{i}: stopped, .*weights step [1-4], groups done \d+", res.stdout), res.stdout

    # Running it again resumes: the trainer finds checkpoint 4 and exits at once.
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "resuming in existing workdir" in res.stdout
    assert "resumed from checkpoint 4" in (logs / "trainer.log").read_text()
