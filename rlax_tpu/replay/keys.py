"""Key layout of the replay queue in the run's store (see docs/replay.md).

    tasks/<task_id>      Task (msgpack), written by the controller
    leases/<task_id>     {"worker", "token", "expires_at", "renewed_at"} (JSON), claimed by CAS
    rollouts/<task_id>   RolloutGroup (msgpack), created once (create-if-absent): first result wins
    workers/<worker_id>  heartbeat {"time", "tasks_done", "weights_step", ...} (JSON)

Task ids are decimal integers zero-padded to 12 digits so that key order is issue order.
"""

from __future__ import annotations

TASKS = "tasks/"
LEASES = "leases/"
ROLLOUTS = "rollouts/"
WORKERS = "workers/"
ID_DIGITS = 12


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
