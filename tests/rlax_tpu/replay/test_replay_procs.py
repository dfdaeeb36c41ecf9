"""Replay queue with real processes: kill -9, SIGTERM, controller restart, staleness, 3 workers."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from rlax_tpu import store_layout as keys
from rlax_tpu.kvstore import KVStore
from tests.helpers import ROOT
from tests.helpers.fake_worker import fake_samples
from trainer.replay_controller import ReplayController

pytestmark = pytest.mark.slow


class Proc:
    """A child process whose JSON-lines stdout is collected by a thread."""

    def __init__(self, argv):
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        self.events: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.p.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                pass

    def wait_for(self, pred, timeout=60.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                ev = self.events.get(timeout=0.05)
            except queue.Empty:
                # Only the reader knows that every line is queued (it stops at EOF): asking the
                # process instead races with a last line (e.g. "done") still on its way to the queue.
                assert self._reader.is_alive() or not self.events.empty(), \
                    f"exited rc={self.p.poll()}; events so far: {self.seen[-5:]}"
                continue
            self.seen.append(ev)
            if pred(ev):
                return ev
        raise AssertionError(f"timed out; events so far: {self.seen[-5:]}")

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=60)

    def terminate(self) -> int:
        """SIGTERM (a testing worker gives its leases back and exits 143); waits for the exit."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        return self.p.wait(timeout=60)


def worker(url, wid, *extra):
    return Proc([sys.executable, "-m", "tests.helpers.fake_worker", "--url", url,
                 "--worker-id", wid, *map(str, extra)])


@pytest.fixture
def store(tmp_path):
    url = f"file://{tmp_path}/store/"
    procs = []
    yield url, KVStore.open(url), procs
    for p in procs:
        p.stop()


def _issue(ctl, n, n_samples=2):
    return [ctl.issue(f"p{i}", np.arange(4) + i, {"mixed_rewards": True}, n_samples, 0) for i in range(n)]


def _admit_all(ctl, step, want, timeout=120.0):
    got = []
    deadline = time.time() + timeout
    while len(got) < want and time.time() < deadline:
        got += ctl.poll(step).admitted
        time.sleep(0.02)
    return got


def test_killed_worker_task_is_taken_over_and_admitted_once(store):
    url, kv, procs = store
    ctl = ReplayController(kv, max_in_flight=4, max_staleness=1)
    (task,) = _issue(ctl, 1)
    a = worker(url, "a", "--lease-seconds", 0.6, "--gen-seconds", 60)
    procs.append(a)
    a.wait_for(lambda e: e["event"] == "leased")
    time.sleep(0.5)  # a renews its lease while "generating"
    assert json.loads(kv.get(keys.LEASES + task.task_id))["worker"] == "a"
    a.p.send_signal(signal.SIGKILL)
    a.p.wait()
    assert kv.list(keys.LEASES) == [keys.LEASES + task.task_id]  # a died holding it
    b = worker(url, "b", "--lease-seconds", 0.6)
    procs.append(b)
    b.wait_for(lambda e: e["event"] == "submitted" and e["won"])
    (adm,) = _admit_all(ctl, 0, 1)
    assert adm.group.worker_id == "b" and adm.task.task_id == task.task_id
    want = fake_samples(task, 0, 16)
    assert all(np.array_equal(s.tokens, w.tokens) for s, w in zip(adm.group.samples, want, strict=True))
    time.sleep(0.3)
    assert ctl.poll(0).admitted == [] and ctl.counters["admitted"] == 1


def test_sigterm_releases_leases_at_once(store):
    url, kv, procs = store
    ctl = ReplayController(kv, max_in_flight=4, max_staleness=1)
    _issue(ctl, 3)
    # Leases far longer than the test: whatever b gets before they would expire was given back.
    a = worker(url, "a", "--lease-seconds", 300, "--gen-seconds", 600, "--batch", 3)
    procs.append(a)
    for _ in range(3):
        a.wait_for(lambda e: e["event"] == "leased")
    held = kv.list(keys.LEASES)
    assert len(held) == 3
    expires = {k[len(keys.LEASES):]: json.loads(kv.get(k))["expires_at"] for k in held}
    a.p.send_signal(signal.SIGTERM)
    assert a.p.wait(timeout=60) == 143
    assert kv.list(keys.LEASES) == []  # given back at once, not after 300 s
    assert json.loads(kv.get(keys.WORKERS + "a"))["state"] == "stopped"
    procs.append(worker(url, "b", "--lease-seconds", 30))
    got = _admit_all(ctl, 0, 3)
    assert len(got) == 3
    # b leased every task before a's lease on it would have expired (a take-over waits for expiry):
    # measured against the leases themselves, not the wall clock of a loaded machine.
    assert all(g.group.worker_id == "b" and g.group.timings["leased_at"] < expires[g.task.task_id]
               for g in got), ([g.group.timings for g in got], expires)


def test_staleness_bound_is_enforced(store):
    url, kv, procs = store
    ctl = ReplayController(kv, max_in_flight=4, max_staleness=1)
    tasks = _issue(ctl, 4)
    old = worker(url, "old", "--weights-step", 0, "--max-tasks", 4)
    procs.append(old)
    assert old.p.wait(timeout=120) == 0 and len(kv.list(keys.ROLLOUTS)) == 4
    res = ctl.poll(step=2)  # 2 - 0 > 1
    assert res.admitted == [] and len(res.dropped_stale) == 4 and ctl.in_flight == 4
    procs.append(worker(url, "new", "--weights-step", 1))
    got = _admit_all(ctl, 2, 4)
    assert sorted(a.task.task_id for a in got) == [t.task_id for t in tasks]
    assert all(a.staleness == 1 and a.group.worker_id == "new" for a in got)


def test_restarted_controller_loses_no_task_and_admits_none_twice(store, tmp_path):
    url, kv, procs = store
    ckpt = str(tmp_path / "ckpt.json")
    # Only the trainer is killed here: leases long enough that no worker stalled by a loaded machine
    # loses one (a take-over's late duplicate, written after the final ack, would be an orphan
    # rollout that only a later ack collects).
    for i in range(2):
        procs.append(worker(url, f"w{i}", "--lease-seconds", 30, "--weights-step-key", "testing/weights_step",
                            "--gen-seconds", 0.02))
    argv = [sys.executable, os.path.join(ROOT, "tests", "helpers", "fake_trainer.py"), "--url", url,
            "--ckpt", ckpt, "--prompts", 30, "--batch", 3, "--ckpt-every", 3]
    argv = list(map(str, argv))
    kills = 0
    for kill_at in (4, 5):  # mid-way between checkpoints (3, 6, ...), tasks issued after C
        # The trainer parks itself there (next tasks issued) so that the kill cannot come late: a
        # trainer left running while the test looks on could reach a checkpoint or even finish.
        t = Proc([*argv, "--pause-after", str(kill_at)])
        procs.append(t)
        start = t.wait_for(lambda e: e["event"] == "start")
        paused = t.wait_for(lambda e: e["event"] == "paused", timeout=120)
        assert paused["step"] == start["step"] + kill_at and paused["step"] % 3, (start, paused)
        t.p.send_signal(signal.SIGKILL)
        t.p.wait()
        kills += 1
    t = Proc(argv)
    procs.append(t)
    done = t.wait_for(lambda e: e["event"] == "done", timeout=120)
    with open(ckpt) as f:
        final = json.load(f)
    assert sorted(final["trained"]) == sorted(f"p{i}" for i in range(30))  # each exactly once
    assert done["max_staleness"] <= 1 and kills == 2
    assert done["counters"]["reissued_same"] >= 1  # tasks issued after C were found, not lost
    assert kv.list(keys.TASKS) == [] and kv.list(keys.ROLLOUTS) == []  # all acked and cleaned


def test_three_workers_two_hundred_tasks_each_admitted_once(store):
    url, kv, procs = store
    ctl = ReplayController(kv, max_in_flight=48, max_staleness=0)
    for i in range(3):
        procs.append(worker(url, f"w{i}", "--lease-seconds", 2, "--batch", 4))
    for p in procs[-3:]:  # on a loaded machine one may start long after the others drained the queue
        p.wait_for(lambda e: e["event"] == "ready", timeout=60)
    admitted, n, deadline = [], 200, time.time() + 180
    while len(admitted) < n and time.time() < deadline:
        while ctl.free_slots() and ctl.next_task_number < n:
            i = ctl.next_task_number
            ctl.issue(f"p{i}", [i], {"mixed_rewards": True}, 2, 0)
        admitted += ctl.poll(0).admitted
        time.sleep(0.01)
    ids = [a.task.task_id for a in admitted]
    assert len(ids) == n and sorted(ids) == [keys.task_id(i) for i in range(n)]
    by_worker = {w: sum(a.group.worker_id == w for a in admitted) for w in ("w0", "w1", "w2")}
    assert all(by_worker.values()), by_worker
    time.sleep(0.2)
    assert ctl.poll(0).admitted == [] and ctl.counters["admitted"] == n
    # Stop the workers before the ack: one stalled past its 2 s lease on a loaded machine may
    # still write a late duplicate, which only an ack after it lands can garbage-collect.
    for p in procs[-3:]:
        assert p.terminate() == 143
    ctl.ack(ctl.state_dict())
    assert kv.list(keys.TASKS) == [] and kv.list(keys.ROLLOUTS) == []
