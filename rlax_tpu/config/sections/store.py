"""config.store: the run's kvstore shared by all roles (weights and the replay queue)."""

import ml_collections

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.config.sections._checks import one_of
from rlax_tpu.store import SUPPORTED_SCHEMES

SECTION = "store"


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # kvstore URL: file://..., gs://bucket/run/, memory:// (tests). '' = file://<workdir>/store/.
    c.url = ""
    # dtype in which weights are published to workers.
    c.publish_dtype = "bfloat16"
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    if c.url and not c.url.startswith(SUPPORTED_SCHEMES):
        raise ConfigError("store.url", f"unknown scheme in {c.url!r}; expected one of {SUPPORTED_SCHEMES}")
    one_of(SECTION, c, "publish_dtype", ("float32", "bfloat16"))
