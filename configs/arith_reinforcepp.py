"""REINFORCE++ on the arithmetic task.

REINFORCE++ (Hu et al., arXiv 2501.03262): no critic and no group baseline; per-token returns
G_t = sum_{s>=t} gamma^(s-t) r_s where r_s carries the token-level KL penalty -beta * KL_s
(rl.kl_mode='reward', rl.kl_estimator, rl.kl_coef) and the outcome reward on the last token,
then whitened over the whole batch (global batch normalization, rl.advantage='reinforce_pp').
PPO clipped surrogate, token-level aggregation. 'baseline' selects REINFORCE++-baseline (group
mean subtracted first, then divided by the global std).
Variants: '' (default), 'smoke', 'baseline'.
"""

from rlax_tpu.config import get_base_config, presets


def get_config(arg: str = ""):
    c = presets.arith(get_base_config(), "smoke" if arg == "smoke" else "")
    c.name = "arith_reinforcepp"
    c.rl.advantage = "reinforce_pp"
    c.rl.policy_loss = "ppo"
    c.rl.loss_agg = "token_mean"
    c.rl.gamma = 1.0
    c.rl.kl_mode = "reward"
    c.rl.kl_estimator = "k2"
    c.rl.kl_coef = 0.01
    c.rl.off_policy = "tis"  # truncated IS against the engine's log-probs (max_staleness=1)
    if arg == "baseline":
        c.rl.advantage = "reinforce_pp_baseline"
    elif arg not in ("", "smoke"):
        raise ValueError(f"unknown variant {arg!r} (expected '', 'smoke' or 'baseline')")
    return c
