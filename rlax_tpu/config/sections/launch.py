"""config.launch: how rlax_tpu.launch runs the roles on one machine."""

import ml_collections

from rlax_tpu.config.sections._checks import positive, require

SECTION = "launch"


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Inference worker processes started by rlax_tpu.launch (--num_workers overrides it).
    c.num_workers = 2
    # On stop, each role gets SIGTERM and this many seconds to exit before SIGKILL. Must exceed
    # trainer.sigterm_grace_s so the trainer can save its checkpoint.
    c.grace_s = 60.0
    # Print a status line (which roles are alive) every this many seconds.
    c.status_every_s = 30.0
    # Echo the trainer's progress lines from logs/trainer.log to the console.
    c.tail_trainer = True
    # Pin the trainer to the first trainer_cores CPU cores and each inference worker to one core
    # of the rest (round robin), XLA's CPU thread pool off on single-core roles: on a CPU host
    # throughput comes from more workers, one per core, as on a pod, and the trainer and workers
    # stop competing for the same cores.
    c.pin_workers = False
    c.trainer_cores = 1
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    positive(SECTION, c, "num_workers", allow_zero=True)
    require(isinstance(c.num_workers, int), f"{SECTION}.num_workers",
            f"must be an int, got {c.num_workers!r}")
    positive(SECTION, c, "grace_s")
    require(isinstance(c.pin_workers, bool), f"{SECTION}.pin_workers", f"must be a bool, got {c.pin_workers!r}")
    positive(SECTION, c, "trainer_cores", allow_zero=True)
    positive(SECTION, c, "status_every_s")
    grace = config.trainer.sigterm_grace_s if "trainer" in config else 0
    require(c.grace_s > grace, f"{SECTION}.grace_s",
            f"must exceed trainer.sigterm_grace_s={grace} so the trainer can save before SIGKILL, "
            f"got {c.grace_s}")
