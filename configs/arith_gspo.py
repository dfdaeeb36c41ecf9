"""GSPO on the arithmetic task.

GSPO (Zheng et al., "Group Sequence Policy Optimization", arXiv 2507.18071): the importance
ratio is the sequence-level geometric mean s_i = exp(mean_t log(pi / pi_old)) and the clip
acts on s_i (rl.policy_loss='gspo'), with GRPO group advantages. Because s_i averages the log
ratio over the sequence it sits much closer to 1 than token ratios, so the clip range is
small: the paper uses 3e-4 / 4e-4 (rl.clip_eps_low / rl.clip_eps_high). Aggregate per
sequence (rl.loss_agg='seq_mean_token_mean'); that makes the token form exactly sequence-level.
Variants: '' (default), 'smoke'.
"""

from rlax_tpu.config import get_base_config, presets


def get_config(arg: str = ""):
    c = presets.arith(get_base_config(), "smoke" if arg == "smoke" else "")
    c.name = "arith_gspo"
    c.rl.advantage = "grpo"
    c.rl.policy_loss = "gspo"
    c.rl.clip_eps_low = 3e-4
    c.rl.clip_eps_high = 4e-4
    c.rl.loss_agg = "seq_mean_token_mean"
    c.rl.kl_coef = 0.0
    c.rl.off_policy = "tis"  # truncated IS against the engine's log-probs (max_staleness=1)
    if arg not in ("", "smoke"):
        raise ValueError(f"unknown variant {arg!r} (expected '' or 'smoke')")
    return c
