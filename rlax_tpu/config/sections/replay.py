"""config.replay: the replay queue between the controller and the inference workers."""

import ml_collections

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.config.sections._checks import positive

SECTION = "replay"


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Seconds a worker's lease on a task lasts without renewal; a dead worker's tasks are leased
    # again after this. Workers renew every lease_seconds / 3. Must exceed clock skew between hosts.
    c.lease_seconds = 60.0
    # Tasks outstanding at once (issued, not yet admitted). 0 derives it from the batch and the
    # staleness bound: trainer.batch_size * (rl.max_staleness + 1).
    c.max_in_flight = 0
    # Seconds between polls of the store when there is nothing to do (controller and workers).
    c.poll_seconds = 0.2
    # Seconds between a worker's heartbeat records (workers/<worker_id>).
    c.heartbeat_seconds = 10.0
    # Most tasks a worker leases at once (its continuous-batching window, in groups).
    c.worker_max_leases = 4
    # The trainer stops with a clear error when no rollout arrives for this many seconds.
    c.collect_timeout_s = 600.0
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    for f in ("lease_seconds", "poll_seconds", "heartbeat_seconds", "worker_max_leases", "collect_timeout_s"):
        positive(SECTION, c, f)
    positive(SECTION, c, "max_in_flight", allow_zero=True)
    if c.poll_seconds >= c.lease_seconds:
        raise ConfigError("replay.poll_seconds", f"must be below replay.lease_seconds={c.lease_seconds}")


def max_in_flight(config: ml_collections.ConfigDict) -> int:
    """replay.max_in_flight, or the derived trainer.batch_size * (rl.max_staleness + 1)."""
    if config.replay.max_in_flight:
        return int(config.replay.max_in_flight)
    return int(config.trainer.batch_size) * (int(config.rl.max_staleness) + 1)
