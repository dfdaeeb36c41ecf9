"""The worker half of the replay queue (runs in each inference worker;
the trainer holds the other half in trainer.replay_controller, the wire format is rlax_tpu.replay).

Protocol (docs/replay.md): list ``tasks/``, ``leases/`` and ``rollouts/`` keys (no values) and take
the oldest tasks that have neither; claim each by creating ``leases/<id>`` (create-if-absent),
or by CAS over a lease whose ``expires_at`` has passed. Renew by CAS on the lease's generation
(a failed renewal means the lease was lost). Submit by creating ``rollouts/<id>``
(create-if-absent: the first complete result wins; a late writer's result is ignored), then
delete the lease. On SIGTERM every held lease is deleted at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from rlax_tpu import store_layout as keys
from rlax_tpu.kvstore import KVStore
from rlax_tpu.replay.records import (
    RecordError,
    RolloutGroup,
    Sample,
    Task,
    decode_task,
    encode_rollout,
    task_digest,
)

log = logging.getLogger(__name__)
EXPIRY_SCAN = 64  # most lease records read per expiry scan
COUNTERS = ("leased", "taken_over", "renewed", "lost", "submitted", "late_writes_ignored",
            "released", "corrupt_tasks", "corrupt_leases", "lease_conflicts",
            "canary_checked", "canary_failed")  # the last two: inference_worker.policy_check


@dataclasses.dataclass
class Lease:
    """A task this worker holds. ``generation`` is the lease record's, for the next CAS."""

    task: Task
    task_digest: str
    token: str
    leased_at: float
    expires_at: float
    generation: bytes
    lost: bool = False

    @property
    def task_id(self) -> str:
        return self.task.task_id


def parse_lease(raw: bytes | None) -> dict | None:
    """A lease record, or None when it is corrupt (treated as expired)."""
    try:
        d = json.loads(raw)
        float(d["expires_at"])
        str(d["token"])
        return d
    except (TypeError, ValueError, KeyError):
        return None


class ReplayWorker:
    """Leases tasks, keeps the leases alive and writes rollout groups. One per worker process.

    Thread-safe: the background renewer (``start()``) and the generation loop share it.
    """

    def __init__(self, kv: KVStore, worker_id: str, *, lease_seconds: float, max_leases: int,
                 heartbeat_seconds: float):
        if "/" in worker_id or not worker_id:
            raise ValueError(f"worker_id {worker_id!r} must be non-empty and contain no '/'")
        self.kv = kv
        self.worker_id = worker_id
        self.lease_seconds = float(lease_seconds)
        self.max_leases = int(max_leases)
        self.heartbeat_seconds = float(heartbeat_seconds)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.weights_step: int | None = None  # weights in use, shown in the heartbeat
        self._held: dict[str, Lease] = {}
        self._bad: set[str] = set()  # task ids whose record could not be decoded
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_expiry_scan = 0.0
        self._scan_pos = 0
        self._rng = random.Random(hash((worker_id, os.getpid())))
        self._pool = ThreadPoolExecutor(max(2, self.max_leases), thread_name_prefix="replay-worker")

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def count(self, name: str) -> None:
        """Counts one event of ``name`` (one of COUNTERS), shown in the heartbeat."""
        self._count(name)

    @classmethod
    def from_config(cls, kv: KVStore, config, worker_id: str) -> ReplayWorker:
        r = config.replay
        return cls(kv, worker_id, lease_seconds=r.lease_seconds, max_leases=r.worker_max_leases,
                   heartbeat_seconds=r.heartbeat_seconds)

    # ------------------------------------------------------------------ leasing

    @property
    def held(self) -> list[Lease]:
        with self._lock:
            return list(self._held.values())

    def lease(self, max_tasks: int = 1) -> list[Lease]:
        """Claims up to ``max_tasks`` tasks (bounded by max_leases held at once), oldest first."""
        with self._lock:
            want = min(max_tasks, self.max_leases - len(self._held))
        if want <= 0:
            return []
        tasks = keys.ids_under(self.kv.list(keys.TASKS), keys.TASKS)
        if not tasks:
            return []
        leased = set(keys.ids_under(self.kv.list(keys.LEASES), keys.LEASES))
        done = set(keys.ids_under(self.kv.list(keys.ROLLOUTS), keys.ROLLOUTS))
        free = [t for t in tasks if t not in leased and t not in done and t not in self._bad]
        # Oldest first, shuffled within a small window so that workers rarely collide.
        window = free[: max(4 * want, 8)]
        self._rng.shuffle(window)
        got: list[Lease] = []
        while window and len(got) < want:  # claims run concurrently, topped up after conflicts
            batch, window = window[: want - len(got)], window[want - len(got):]
            got += [lease for lease in self._pool.map(lambda t: self._claim(t, None), batch) if lease]
        if len(got) < want:
            got += self._take_expired(
                [t for t in tasks if t in leased and t not in done and t not in self._bad], want - len(got))
        return got

    def _take_expired(self, candidates: list[str], want: int) -> list[Lease]:
        # Reading lease values costs one read each: do it at most a few times per lease period,
        # and read at most EXPIRY_SCAN of them, resuming where the last scan stopped, so that the
        # cost per poll stays flat however many tasks are leased.
        now = time.time()
        if not candidates or now - self._last_expiry_scan < min(1.0, self.lease_seconds / 4):
            return []
        self._last_expiry_scan = now
        start = self._scan_pos % len(candidates)
        batch = (candidates[start:] + candidates[:start])[:EXPIRY_SCAN]
        self._scan_pos = start + len(batch)
        got = []
        with self._lock:
            mine = set(self._held)
        for tid in batch:
            if len(got) >= want:
                break
            if tid in mine:
                continue
            entry = self.kv.read(keys.LEASES + tid)
            if not entry.exists:
                continue
            rec = parse_lease(entry.value)
            if rec is None:
                self._count("corrupt_leases")
                log.warning("replay: corrupt lease record %s%s; taking it over", keys.LEASES, tid)
            elif float(rec["expires_at"]) > time.time():
                continue
            lease = self._claim(tid, entry.generation)
            if lease is not None:
                self._count("taken_over")
                got.append(lease)
        return got

    def _claim(self, tid: str, generation: bytes | None) -> Lease | None:
        """Creates (generation None) or takes over (CAS) the lease on ``tid``."""
        traw = self.kv.get(keys.TASKS + tid)
        if traw is None:
            return None  # acknowledged and deleted meanwhile
        try:
            task = decode_task(traw)
            if task.task_id != tid:
                raise RecordError(f"record under {keys.TASKS}{tid} is task {task.task_id!r}")
        except RecordError as e:
            log.warning("replay: corrupt task %s%s skipped: %s", keys.TASKS, tid, e)
            self._count("corrupt_tasks")
            self._bad.add(tid)
            return None
        now = time.time()
        token = uuid.uuid4().hex
        rec = {"worker": self.worker_id, "token": token, "leased_at": now,
               "expires_at": now + self.lease_seconds, "renewed_at": now}
        key = keys.LEASES + tid
        ok = (self.kv.create(key, _json(rec)) if generation is None
              else self.kv.cas(key, _json(rec), generation))
        if not ok:
            self._count("lease_conflicts")
            return None
        # The CAS returned no generation to us through the facade: read it back (ours unless lost).
        entry = self.kv.read(key)
        if parse_lease(entry.value) is None or parse_lease(entry.value)["token"] != token:
            return None
        lease = Lease(task, task_digest(task), token, now, rec["expires_at"], entry.generation)
        with self._lock:
            self._held[tid] = lease
        self._count("leased")
        return lease

    def renew(self, lease: Lease) -> bool:
        """Extends the lease by lease_seconds; False (and ``lease.lost``) if another worker has it."""
        with self._lock:
            if lease.lost:
                return False
            now = time.time()
            rec = {"worker": self.worker_id, "token": lease.token, "leased_at": lease.leased_at,
                   "expires_at": now + self.lease_seconds, "renewed_at": now}
            key = keys.LEASES + lease.task_id
            if not self.kv.cas(key, _json(rec), lease.generation):
                lease.lost = True
                self._held.pop(lease.task_id, None)
                self._count("lost")
                log.info("replay: lease on %s lost (expired and taken over, or acknowledged)", key)
                return False
            lease.generation = self.kv.read(key).generation
            lease.expires_at = rec["expires_at"]
            self._count("renewed")
            return True

    def renew_all(self) -> int:
        return sum(self.renew(lease) for lease in self.held)

    # ------------------------------------------------------------------ results

    def submit(self, lease: Lease, samples: Sequence[Sample], timings: dict | None = None) -> bool:
        """Writes the rollout group under ``rollouts/<task_id>`` if no result is there yet.

        Returns True if this result is the one kept; False if another (first) result won, in
        which case this one is dropped. Either way the lease is given back.
        """
        timings = dict(timings or {})
        timings.setdefault("leased_at", lease.leased_at)
        timings.setdefault("done_at", time.time())
        group = RolloutGroup(task_id=lease.task_id, samples=tuple(samples), worker_id=self.worker_id,
                             timings=timings, task_digest=lease.task_digest)
        won = self.kv.create(keys.ROLLOUTS + lease.task_id, encode_rollout(group))
        if won:
            self._count("submitted")
        else:
            self._count("late_writes_ignored")
            log.info("replay: result for %s already present; ours ignored", lease.task_id)
        self.release(lease, count=False)
        return won

    def submit_many(self, results: Sequence[tuple[Lease, Sequence[Sample], dict | None]]) -> list[bool]:
        """``submit`` for several (lease, samples, timings) at once; the writes run concurrently."""
        return list(self._pool.map(lambda r: self.submit(*r), results))

    def release(self, lease: Lease, count: bool = True) -> bool:
        """Gives a lease back (deletes it if still ours) so that another worker can take the task."""
        with self._lock:
            self._held.pop(lease.task_id, None)
            if lease.lost:
                return False
            lease.lost = True
            ok = self.kv.cas(keys.LEASES + lease.task_id, None, lease.generation)
        if ok and count:
            self._count("released")
        return ok

    def release_all(self) -> int:
        return sum(self.release(lease) for lease in self.held)

    # ------------------------------------------------------------------ liveness

    def heartbeat(self, state: str = "running", **extra) -> None:
        """Writes this worker's Heartbeat under ``workers/<worker_id>`` (read by the controller and
        the param-server status)."""
        hb = keys.Heartbeat(worker=self.worker_id, time=time.time(), state=state,
                            tasks_done=self.counters["submitted"], weights_step=self.weights_step,
                            leases=tuple(sorted(lease.task_id for lease in self.held)), pid=os.getpid(),
                            host=socket.gethostname(), counters=dict(self.counters), extra=extra)
        self.kv.put(hb.key(), hb.encode())

    def start(self) -> None:
        """Starts the background thread that renews leases (every lease_seconds/3) and heartbeats."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"replay-renew-{self.worker_id}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = self.lease_seconds / 3
        next_beat = 0.0
        while not self._stop.wait(period):
            try:
                self.renew_all()
                if time.time() >= next_beat:
                    self.heartbeat()
                    next_beat = time.time() + self.heartbeat_seconds
            except Exception:  # a flaky store must not kill the renewer; the lease may lapse
                log.exception("replay: lease renewal failed")

    def _stop_renewer(self) -> None:
        """Stops the renewal thread and waits for it, so a renewal in flight cannot land a
        'running' heartbeat after a final 'stopped' one."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def stop(self, release: bool = True) -> None:
        """Stops the renewer; gives back every lease unless release=False."""
        self._stop_renewer()
        if release:
            self.release_all()
            self.heartbeat(state="stopped")


def install_sigterm_handler(worker: ReplayWorker, exit_code: int = 143) -> None:
    """On SIGTERM: give back every lease at once, write a final heartbeat, and exit."""

    def handler(signum, frame):
        worker._stop_renewer()
        n = worker.release_all()
        try:
            worker.heartbeat(state="stopped")
        finally:
            log.info("replay: SIGTERM, released %d leases", n)
            raise SystemExit(exit_code)

    signal.signal(signal.SIGTERM, handler)


def _json(d: dict) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode()
