"""config.rl: the RL objective (advantages, policy loss, KL, off-policy correction).

The string fields select functions from the registries in ``rlax_tpu/rl`` (see docs/rl.md);
``rlax_tpu.rl.build_loss(config.rl)`` turns this section into the loss the trainer uses.
"""

import ml_collections

from rlax_tpu.config.sections._checks import in_range, one_of, positive, require

SECTION = "rl"
WHITEN = ("none", "batch", "batch_scale")
KL_MODES = ("loss", "reward")


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Samples per prompt (the GRPO group size). Groups are contiguous rows of the batch unless
    # the batch carries explicit 'group_ids'.
    c.group_size = 8
    # A rollout generated with the weights of trainer step v is admitted at step s only if
    # s - v <= this. 0 is strictly on-policy (every batch from the newest published weights).
    c.max_staleness = 1
    # Stale rollouts (max_staleness > 0, or reuse) are corrected by off_policy ('tis' or
    # 'decoupled'); training on them uncorrected must be asked for explicitly.
    c.allow_uncorrected_staleness = False

    # --- the update schedule (trainer/learner.py) ---
    # Each admitted batch is split into mini_batches optimizer updates (groups are never split),
    # and passed over ppo_epochs times (verl's ppo_mini_batch_size / ppo_epochs, TRL's
    # num_iterations): after the first update the policy differs from the proximal one (fixed
    # before the first update), so the ratio moves and the clip acts. trainer.micro_batches
    # (gradient accumulation inside one update) is a separate memory knob.
    c.ppo_epochs = 1
    c.mini_batches = 1

    # --- advantages (rlax_tpu/rl/advantages.py) ---
    # Estimator: 'grpo' (group mean/std), 'drgrpo' (group mean, no std), 'rloo' (leave-one-out
    # baseline), 'reinforce_pp' (REINFORCE++: token returns, global batch normalization),
    # 'reinforce_pp_baseline' (group mean, then the batch's token mean and std), 'grpo_passk'
    # (only each group's best sample is pushed, by r_max - r_second over the group std),
    # 'passk' (each sample's leave-one-out share of its group's pass@k over the group std: trains
    # pass@k, keeping the policy's spread), 'gae' (PPO, needs a value head).
    c.advantage = "grpo"
    # k of advantage='passk' (1 <= k < group_size; k = 1 is RLOO-like pass@1).
    c.passk_k = 4
    # Epsilon added to every standard deviation used to normalize advantages.
    c.adv_eps = 1e-6
    # Whitening applied after the estimator over all valid tokens of the batch: 'none',
    # 'batch' (subtract mean, divide by std) or 'batch_scale' (divide by std, keep the mean).
    c.whiten_advantages = "none"
    # Discount over tokens (GAE and REINFORCE++ returns).
    c.gamma = 1.0
    # GAE lambda.
    c.gae_lambda = 0.95

    # --- policy loss (rlax_tpu/rl/policy_losses.py) ---
    # 'ppo' (clipped surrogate, optional dual clip), 'gspo' (sequence-level geometric-mean
    # ratio, clipped), 'cispo' (clipped stop-gradient IS weight times log-prob), 'reinforce'
    # (vanilla policy gradient, -A * log-prob).
    c.policy_loss = "ppo"
    # Clip range [1 - clip_eps_low, 1 + clip_eps_high] of the ratio (PPO, GSPO's sequence
    # ratio, CISPO's IS weight). clip_eps_high > clip_eps_low is DAPO's clip-higher. For CISPO
    # a clip_eps_low >= 1 leaves the weight without a lower bound.
    c.clip_eps_low = 0.2
    c.clip_eps_high = 0.2
    # Dual clip constant c (> 1) bounding the PPO loss of negative-advantage tokens by -c * A;
    # 0 disables it.
    c.dual_clip_c = 0.0

    # --- aggregation (rlax_tpu/rl/aggregation.py) ---
    # 'token_mean' (mean over all valid tokens of the batch), 'seq_mean_token_mean' (mean over
    # sequences of each sequence's token mean), 'seq_mean_token_sum_norm' (Dr.GRPO: token sum
    # divided by the constant agg_max_len, then mean over sequences).
    c.loss_agg = "token_mean"
    # Dr.GRPO's constant normalizer (the maximum completion length); 0 uses the padded T of
    # the batch, which makes the loss depend on padding.
    c.agg_max_len = 0

    # --- KL to the reference policy and entropy (rlax_tpu/rl/kl.py) ---
    # Coefficient beta of the KL term; 0 disables it (no reference log-probs needed).
    c.kl_coef = 0.0
    # Estimator of KL(pi || ref) from sampled tokens: 'k1' (log-ratio), 'k2' (half squared
    # log-ratio) or 'k3' (low-variance, exp(-x) - 1 + x).
    c.kl_estimator = "k3"
    # 'loss': beta * KL is added to the loss; 'reward': -beta * KL is a per-token reward
    # penalty folded into the advantages on the data side.
    c.kl_mode = "loss"
    # Coefficient of the entropy bonus (loss -= coef * entropy); 0 reports entropy only.
    c.entropy_coef = 0.0

    # --- off-policy correction (rlax_tpu/rl/off_policy.py) ---
    # Three policies meet in a step: the behavior policy (the engine's weights of the rollout's
    # weights step, whose log-probs the worker stored), the proximal policy (this step's
    # parameters before its first update, recomputed by the trainer) and the current one (the
    # parameters being updated). The PPO ratio is current / proximal; this weight is proximal /
    # behavior: 'none' (no behavior correction: only for on-policy data), 'tis' (truncated IS:
    # weight min(pi_prox / pi_behav, is_cap)), 'decoupled' (decoupled PPO, AReaL: weight
    # pi_prox / pi_behav, tokens whose weight exceeds is_cap are dropped).
    c.off_policy = "tis"
    # Cap C of the behavior importance weight; for 'decoupled', 0 means no cap.
    c.is_cap = 2.0

    # --- PPO value side (rlax_tpu/rl/value.py) ---
    # Weight of the value loss (used when advantage == 'gae').
    c.value_coef = 0.5
    # Value clip range around the rollout-time values; 0 disables value clipping.
    c.value_clip = 0.2

    # --- reward shaping and filtering (rlax_tpu/rl/shaping.py) ---
    # DAPO soft overlong penalty: completions longer than overlong_max_len - overlong_buffer
    # lose up to overlong_penalty reward linearly; 0 disables it.
    c.overlong_buffer = 0
    # Maximum completion length L_max of the soft penalty (usually inference.max_new_tokens);
    # must be > overlong_buffer when the penalty is on.
    c.overlong_max_len = 0
    # Penalty at (and beyond) overlong_max_len.
    c.overlong_penalty = 1.0
    # Overlong filtering: truncated completions (no EOS) get no loss.
    c.overlong_filter = False
    # Dynamic sampling (DAPO): the controller drops groups whose rewards are all equal and
    # refills the batch with new groups.
    c.dynamic_sampling = False
    # Difficulty-aware prompt selection (RLAX, Motif-2): track each prompt's pass rate across its
    # groups and stop issuing prompts that were always or never solved in at least
    # difficulty_min_groups groups. The tracked rates are checkpointed with the controller.
    c.difficulty_filter = False
    c.difficulty_min_groups = 2

    # --- rollout reuse (Motif-2's mixed-policy trajectory reuse; trainer/reuse.py) ---
    # Up to this fraction of each batch's groups are recently admitted groups trained on again,
    # corrected by their stored behavior log-probs (needs off_policy 'tis' or 'decoupled');
    # 0 turns reuse off. A group is reused at most reuse_max_uses times and only while its
    # weights are at most reuse_max_age steps old. The buffer is checkpointed with the controller.
    c.reuse_fraction = 0.0
    c.reuse_max_uses = 1
    c.reuse_max_age = 4
    return c


def validate(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    # Imported here: the rl package imports jax and this module is loaded by every role.
    from rlax_tpu import rl

    positive(SECTION, c, "group_size")
    positive(SECTION, c, "max_staleness", allow_zero=True)
    for f in ("ppo_epochs", "mini_batches", "reuse_max_uses", "reuse_max_age", "passk_k"):
        positive(SECTION, c, f)
        require(isinstance(c[f], int), f"{SECTION}.{f}", f"must be an int, got {c[f]!r}")
    in_range(SECTION, c, "reuse_fraction", 0.0, 1.0)
    require(c.advantage != "passk" or c.passk_k < c.group_size, f"{SECTION}.passk_k",
            f"={c.passk_k} must be below rl.group_size={c.group_size} for advantage='passk'")
    require(isinstance(c.allow_uncorrected_staleness, bool), f"{SECTION}.allow_uncorrected_staleness",
            f"must be a bool, got {c.allow_uncorrected_staleness!r}")
    groups = config.trainer.batch_size
    require(groups % c.mini_batches == 0, f"{SECTION}.mini_batches",
            f"={c.mini_batches} must divide trainer.batch_size={groups} (groups are never split)")
    require((groups // c.mini_batches) % config.trainer.micro_batches == 0, "trainer.micro_batches",
            f"={config.trainer.micro_batches} must divide the {groups // c.mini_batches} groups of each "
            f"mini-batch (trainer.batch_size / rl.mini_batches)")
    stale = c.max_staleness > 0 or c.reuse_fraction > 0
    require(not stale or c.off_policy != "none" or c.allow_uncorrected_staleness, f"{SECTION}.off_policy",
            f"is 'none' but rollouts can be stale (rl.max_staleness={c.max_staleness}, rl.reuse_fraction="
            f"{c.reuse_fraction}): use 'tis' or 'decoupled', or set rl.allow_uncorrected_staleness=True")
    one_of(SECTION, c, "advantage", rl.ADVANTAGES.names())
    one_of(SECTION, c, "policy_loss", rl.POLICY_LOSSES.names())
    one_of(SECTION, c, "loss_agg", rl.AGGREGATIONS.names())
    one_of(SECTION, c, "kl_estimator", rl.KL_ESTIMATORS.names())
    one_of(SECTION, c, "off_policy", rl.OFF_POLICY.names())
    one_of(SECTION, c, "whiten_advantages", WHITEN)
    one_of(SECTION, c, "kl_mode", KL_MODES)
    for f in ("adv_eps", "clip_eps_low", "clip_eps_high", "dual_clip_c", "agg_max_len",
              "kl_coef", "entropy_coef", "is_cap", "value_coef", "value_clip", "overlong_buffer",
              "overlong_max_len", "overlong_penalty"):
        positive(SECTION, c, f, allow_zero=True)
    for f in ("gamma", "gae_lambda"):
        value = c[f]
        require(isinstance(value, (int, float)) and 0.0 <= value <= 1.0, f"{SECTION}.{f}",
                f"must be in [0, 1], got {value!r}")
    require(c.dual_clip_c == 0 or c.dual_clip_c > 1, f"{SECTION}.dual_clip_c",
            f"must be 0 (off) or > 1, got {c.dual_clip_c!r}")
    require(c.policy_loss == "ppo" or c.dual_clip_c == 0, f"{SECTION}.dual_clip_c",
            f"applies to policy_loss='ppo' only, got policy_loss={c.policy_loss!r}")
    require(c.off_policy != "tis" or c.is_cap > 0, f"{SECTION}.is_cap",
            "must be > 0 for off_policy='tis'")
    require(isinstance(c.agg_max_len, int), f"{SECTION}.agg_max_len",
            f"must be an int, got {c.agg_max_len!r}")
    positive(SECTION, c, "difficulty_min_groups")
    for f in ("overlong_filter", "dynamic_sampling", "difficulty_filter"):
        require(isinstance(c[f], bool), f"{SECTION}.{f}", f"must be a bool, got {c[f]!r}")
    if c.overlong_buffer > 0:
        require(c.overlong_max_len > c.overlong_buffer, f"{SECTION}.overlong_max_len",
                f"must be > overlong_buffer={c.overlong_buffer} when the overlong penalty is on, "
                f"got {c.overlong_max_len}")
    _check_progress(c, config)
    publish_every = config.trainer.publish_every
    require(c.max_staleness >= publish_every - 1, "trainer.publish_every",
            f"={publish_every} publishes weights too rarely for rl.max_staleness={c.max_staleness}: "
            "rollouts of the newest weights could never be admitted (need publish_every <= "
            "max_staleness + 1)")


def _check_progress(c: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
    """Refuses combinations under which no batch can carry a learning signal: every group
    dropped by a filter, or every advantage 0 whatever the rewards."""
    from rlax_tpu.rl.advantages import BATCH_WHITENED, GROUP_RELATIVE

    require(not (c.dynamic_sampling and c.group_size == 1), f"{SECTION}.dynamic_sampling",
            "drops every group of rl.group_size=1 (a single sample has no reward variance): turn "
            "rl.dynamic_sampling off or raise rl.group_size")
    require(not (c.advantage in GROUP_RELATIVE and c.group_size == 1), f"{SECTION}.advantage",
            f"={c.advantage!r} compares each sample with the rest of its group, so rl.group_size=1 "
            "gives every sample a zero advantage: raise rl.group_size or use 'gae' / 'reinforce_pp'")
    rows = config.trainer.batch_size * c.group_size
    require(not (c.advantage in BATCH_WHITENED and rows == 1), f"{SECTION}.advantage",
            f"={c.advantage!r} whitens returns over the batch, and over a batch of one sequence "
            "(trainer.batch_size * rl.group_size = 1) nothing of its reward is left: use more rows")
