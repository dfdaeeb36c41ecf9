"""config.lora: low-rank adapters on the policy's projections (LoRA RL, adapter-only publishing)."""

import ml_collections

from rlax_tpu.config.sections._checks import positive, require

SECTION = "lora"
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Adapter rank; 0 = off (full fine-tuning). With a rank the base weights are frozen, the
    # optimizer updates only the adapters, and each published version holds the adapters only.
    c.rank = 0
    # Adapter scale numerator: the update is (alpha / rank) * A @ B (PEFT's lora_alpha).
    c.alpha = 16.0
    # Projections that get an adapter, comma-separated among q, k, v, o (attention) and gate, up,
    # down (MLP); 'all' is all seven.
    c.targets = "all"
    # Dropout probability on each adapter's input (PEFT's lora_dropout: s * (dropout(x) A) B,
    # inverted scaling 1 / (1 - p)), in the training gradient pass only: never in the proximal,
    # reference or engine log-probs, evaluation or merged weights. Masks come from config.seed,
    # the step, the update and the micro-batch. On-policy the PPO ratio is then no longer exactly
    # 1 (the differentiated forward is a dropped-out one); 0 = off.
    c.dropout = 0.0
    return c


def target_names(c: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The targeted projections, in TARGETS order."""
    if c.targets.strip() == "all":
        return TARGETS
    picked = {t.strip() for t in c.targets.split(",") if t.strip()}
    return tuple(t for t in TARGETS if t in picked)


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    require(isinstance(c.rank, int) and not isinstance(c.rank, bool) and c.rank >= 0, "lora.rank",
            f"must be a non-negative int (0 = off), got {c.rank!r}")
    positive(SECTION, c, "alpha")
    p = c.dropout
    require(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1, "lora.dropout",
            f"must be a probability in [0, 1), got {p!r}")
    require(isinstance(c.targets, str), "lora.targets", f"must be a string, got {c.targets!r}")
    if c.targets.strip() != "all":
        names = [t.strip() for t in c.targets.split(",") if t.strip()]
        unknown = [t for t in names if t not in TARGETS]
        require(not unknown, "lora.targets", f"unknown projection(s) {unknown}; choose among {TARGETS} or 'all'")
        require(bool(names), "lora.targets", "names no projection")
