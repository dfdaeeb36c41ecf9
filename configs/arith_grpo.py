"""GRPO on the arithmetic task: the default demo algorithm.

GRPO (Shao et al., DeepSeekMath, arXiv 2402.03300): sample rl.group_size completions per
prompt, advantage A_i = (r_i - mean_group) / (std_group + rl.adv_eps), PPO clipped surrogate
(rl.clip_eps_low / rl.clip_eps_high) on the ratio pi / pi_proximal, each sequence's token
mean averaged over sequences (rl.loss_agg='seq_mean_token_mean'), optional k3 KL to the
reference policy in the loss (rl.kl_coef).

Knobs: rl.group_size, rl.clip_eps_low/high, rl.kl_coef, rl.kl_estimator, rl.max_staleness,
rl.off_policy (truncated IS against the engine's log-probs).
Variants: '' (the CPU demo), 'smoke' (tiny and short, for tests and the chaos test).
"""

from rlax_tpu.config import get_base_config, presets


def get_config(arg: str = ""):
    c = get_base_config()
    c.name = "arith_grpo"
    c.rl.advantage = "grpo"
    c.rl.policy_loss = "ppo"
    # Clip-higher (DAPO) and a k3 KL to the SFT policy keep exploration: on this task they are
    # what keeps held-out pass@8 from falling while pass@1 rises (docs/rl.md, the demo study).
    c.rl.clip_eps_low = 0.2
    c.rl.clip_eps_high = 0.28
    c.rl.loss_agg = "seq_mean_token_mean"
    c.rl.kl_coef = 0.1
    c.rl.kl_estimator = "k3"
    c.rl.off_policy = "tis"
    c.rl.is_cap = 2.0
    return presets.arith(c, arg)
