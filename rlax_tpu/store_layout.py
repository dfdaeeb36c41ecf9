"""The key layout of a run's store and the records every role shares, in one place.

```
run.json                     {"epoch", "acquired_at", ...}: the trainer epoch (rlax_tpu.fencing)
meta/model.json              the run's ModelConfig (JSON), written once by the trainer (run_meta)
meta/tokenizer/<file>        the tokenizer's files, written once by the trainer (run_meta)
params/...                   weight versions (layout: param_server/layout.py)
tasks/<task_id>              Task (msgpack), written by the controller
leases/<task_id>             {"worker", "token", "expires_at", "renewed_at"} (JSON), claimed by CAS
rollouts/<task_id>           RolloutGroup (msgpack), created once (create-if-absent): first wins
workers/<worker_id>          Heartbeat (JSON), rewritten by each inference worker
evals/step_<S:012d>          the eval record of trainer step S (JSON), written by the evaluator
params/pins/evaluator~step_<S>   pins step S's version against gc until it is evaluated
```
Task ids are decimal integers zero-padded to 12 digits so that key order is issue order.
"""

from __future__ import annotations

import dataclasses
import json
import time as _time
from typing import Any

RUN_KEY = "run.json"
MODEL_KEY = "meta/model.json"
TOKENIZER_PREFIX = "meta/tokenizer/"
PARAMS = "params/"
TASKS = "tasks/"
LEASES = "leases/"
ROLLOUTS = "rollouts/"
WORKERS = "workers/"
EVALS = "evals/"
EVAL_READER = "evaluator"  # the evaluator's reader (pin) name in the param server
ID_DIGITS = 12


# ---------------------------------------------------------------------- replay task ids
def task_id(n: int) -> str:
    if n < 0 or n >= 10**ID_DIGITS:
        raise ValueError(f"task number {n} does not fit in {ID_DIGITS} digits")
    return f"{n:0{ID_DIGITS}d}"


def task_number(tid: str) -> int | None:
    """The integer of a task id, or None for a key that is not one of ours."""
    if len(tid) != ID_DIGITS or not tid.isdigit():
        return None
    return int(tid)


def ids_under(keys: list[str], prefix: str) -> list[str]:
    """Valid task ids among listed keys (foreign keys are ignored)."""
    out = []
    for k in keys:
        tid = k[len(prefix):]
        if task_number(tid) is not None:
            out.append(tid)
    return out


# ---------------------------------------------------------------------- evaluation
def eval_record_key(step: int) -> str:
    return f"{EVALS}step_{int(step):012d}"


def eval_keep_reader(step: int) -> str:
    """The pin (reader name) under which the trainer keeps step ``step``'s version for the evaluator."""
    return f"{EVAL_READER}/step_{int(step)}"


# ---------------------------------------------------------------------- worker heartbeats
class HeartbeatError(ValueError):
    """A heartbeat record that does not parse (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    """What an inference worker says about itself under ``workers/<worker_id>``: read by the
    controller (why no rollout comes) and the param-server status."""

    worker: str
    time: float  # wall-clock seconds of the write
    state: str  # 'running', or 'stopped' (the worker's last word)
    tasks_done: int = 0
    weights_step: int | None = None  # the weights the worker generates with
    leases: tuple[str, ...] = ()
    pid: int | None = None
    host: str = ""
    counters: dict[str, int] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # any other fields, shown as they are

    def key(self) -> str:
        return WORKERS + self.worker

    def encode(self) -> bytes:
        return json.dumps(self.as_dict(), sort_keys=True).encode()

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **d, "leases": list(self.leases)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], worker: str = "") -> Heartbeat:
        if not isinstance(d, dict):
            raise HeartbeatError(f"not a JSON object: {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        seen = d.get("time", d.get("heartbeat_at", d.get("updated_at")))  # older workers' names
        try:
            return cls(worker=str(d.get("worker") or worker), time=float(seen) if seen is not None else 0.0,
                       state=str(d.get("state", "?")), tasks_done=int(d.get("tasks_done", 0)),
                       weights_step=None if d.get("weights_step") is None else int(d["weights_step"]),
                       leases=tuple(str(t) for t in d.get("leases") or ()),
                       pid=None if d.get("pid") is None else int(d["pid"]), host=str(d.get("host") or ""),
                       counters=dict(d.get("counters") or {}),
                       extra={k: v for k, v in d.items() if k not in names | {"heartbeat_at", "updated_at"}})
        except (TypeError, ValueError) as e:
            raise HeartbeatError(f"bad field: {e}") from e

    @classmethod
    def decode(cls, raw: bytes, worker: str = "") -> Heartbeat:
        """The heartbeat in ``raw``; HeartbeatError if it is not one."""
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise HeartbeatError(f"not JSON: {e}") from e
        return cls.from_dict(d, worker)

    def age(self, now: float | None = None) -> float:
        return (_time.time() if now is None else now) - self.time

    def alive(self, heartbeat_s: float, now: float | None = None) -> bool:
        """Running and heard from within three heartbeat periods (a killed worker says nothing)."""
        return self.state == "running" and self.age(now) < 3 * heartbeat_s
