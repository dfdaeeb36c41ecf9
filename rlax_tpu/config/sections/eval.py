"""config.eval: held-out pass@k evaluation."""

import ml_collections

from rlax_tpu.config.sections._checks import positive

SECTION = "eval"


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Samples per held-out prompt; pass@k is reported for every k in ks (k <= num_samples).
    c.num_samples = 8
    c.ks = (1, 4, 8)
    c.temperature = 1.0
    # The trainer evaluates before RL, at the end, and every this many steps (0 = only those two).
    # num_samples = 0 turns the trainer's evaluation off.
    c.every = 0
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    positive(SECTION, c, "num_samples", allow_zero=True)
    positive(SECTION, c, "every", allow_zero=True)
    positive(SECTION, c, "temperature", allow_zero=True)
    from rlax_tpu.config.errors import ConfigError

    for k in c.ks:
        if c.num_samples and not (isinstance(k, int) and 1 <= k <= c.num_samples):
            raise ConfigError("eval.ks", f"each k must be in [1, num_samples={c.num_samples}], got {k!r}")
