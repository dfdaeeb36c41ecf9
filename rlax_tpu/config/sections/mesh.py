"""config.mesh: the trainer's device mesh, axes ('data', 'fsdp', 'tensor')."""

import ml_collections

from rlax_tpu.config.sections._checks import require

SECTION = "mesh"
AXES = ("data", "fsdp", "tensor")


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Size of each mesh axis; exactly one may be -1 to take all remaining devices.
    c.data = 1
    c.fsdp = -1
    c.tensor = 1
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict, section: str = SECTION) -> None:
    sizes = [c[a] for a in AXES]
    shown = dict(zip(AXES, sizes, strict=True))
    require(all(isinstance(s, int) and (s == -1 or s >= 1) for s in sizes), section,
            f"axis sizes must be positive ints or -1, got {shown}")
    require(sizes.count(-1) <= 1, section, f"at most one axis may be -1, got {shown}")
