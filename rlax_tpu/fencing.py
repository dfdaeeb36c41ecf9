"""Trainer fencing: two trainers can never write one run.

``run.json`` in the store holds the trainer epoch. Each trainer start bumps it by CAS and keeps
the epoch it got; every write that only the trainer may make (publishing weights, deleting
consumed records) first checks that the stored epoch is still its own. A stale trainer (an old
process still running after its replacement started) gets FencedError and stops.
"""

from __future__ import annotations

import json
import time

from rlax_tpu.kvstore import KVStore
from rlax_tpu.store_layout import RUN_KEY


class FencedError(RuntimeError):
    """This trainer's epoch is no longer current: a newer trainer owns the run."""


def read_run(kv: KVStore) -> dict:
    raw = kv.get(RUN_KEY)
    if raw is None:
        return {"epoch": 0}
    return _parse_run(kv, raw)


def _parse_run(kv: KVStore, raw: bytes) -> dict:
    try:
        run = json.loads(raw)
        int(run["epoch"])
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"{kv.url}{RUN_KEY} is corrupt ({e}); refusing to guess the epoch") from e
    return run


def current_epoch(kv: KVStore) -> int:
    return int(read_run(kv)["epoch"])


def acquire_epoch(kv: KVStore, **info) -> int:
    """Bumps the trainer epoch by CAS and returns the new one; older trainers are now fenced."""
    while True:
        entry = kv.read(RUN_KEY)
        # Parse the value read with the generation we CAS against (a re-read could be newer).
        run = _parse_run(kv, entry.value) if entry.exists else {"epoch": 0}
        run = {**run, **info, "epoch": int(run["epoch"]) + 1, "acquired_at": time.time()}
        if kv.cas(RUN_KEY, json.dumps(run).encode(), entry.generation):
            return run["epoch"]


def check_epoch(kv: KVStore, epoch: int) -> None:
    """Raises FencedError unless ``epoch`` is still the run's current trainer epoch."""
    now = current_epoch(kv)
    if now != epoch:
        raise FencedError(
            f"trainer epoch {epoch} is fenced out by epoch {now} in {kv.url}{RUN_KEY}: "
            "a newer trainer owns this run")
