"""config.eval: held-out pass@k evaluation, run by the evaluator role (inference_worker.evaluator)."""

import ml_collections

from rlax_tpu.config.errors import ConfigError
from rlax_tpu.config.sections._checks import positive, require

SECTION = "eval"
# The evaluator samples with seeds from config.seed + this offset, apart from the rollouts' seeds.
SEED_OFFSET = 1000


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Samples per held-out prompt; pass@k is reported for every k in ks (k <= num_samples).
    # 0 turns evaluation off: no evaluator role is started and no version is kept for it.
    c.num_samples = 8
    c.ks = (1, 4, 8)
    c.temperature = 1.0
    # Weights steps the evaluator evaluates: 0 (before RL), the last step, and every this many
    # steps in between (0 = only those two). Must be a multiple of trainer.publish_every: only
    # published steps can be evaluated.
    c.every = 0
    # The trainer pins each version due for evaluation against garbage collection for this many
    # seconds (the evaluator releases it once evaluated), so a slow evaluator never finds it gone.
    c.keep_s = 86400.0
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    positive(SECTION, c, "num_samples", allow_zero=True)
    positive(SECTION, c, "every", allow_zero=True)
    positive(SECTION, c, "temperature", allow_zero=True)
    positive(SECTION, c, "keep_s")
    for k in c.ks:
        if c.num_samples and not (isinstance(k, int) and 1 <= k <= c.num_samples):
            raise ConfigError("eval.ks", f"each k must be in [1, num_samples={c.num_samples}], got {k!r}")
    publish_every = config.trainer.publish_every
    require(c.every % publish_every == 0, "eval.every",
            f"={c.every} must be a multiple of trainer.publish_every={publish_every}: the evaluator can only "
            "evaluate published weights")


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the run evaluates at all (an evaluator role, versions kept for it)."""
    return config.eval.num_samples > 0 and config.task.num_eval > 0


def due(config: ml_collections.ConfigDict, step: int) -> bool:
    """Whether the weights of trainer step ``step`` are evaluated."""
    every = config.eval.every
    return enabled(config) and (step == 0 or step == config.trainer.steps or bool(every and step % every == 0))
