"""config.launch: how rlax_tpu.launch runs the roles on one machine."""

import ml_collections

from rlax_tpu.config.sections._checks import positive

SECTION = "launch"


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Inference worker processes started by rlax_tpu.launch.
    c.num_workers = 2
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    positive(SECTION, c, "num_workers", allow_zero=True)
