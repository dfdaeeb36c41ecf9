"""PPO with a value head and GAE on the arithmetic task.

PPO (Schulman et al., arXiv 1707.06347) as used for RLHF (Ouyang et al., arXiv 2203.02155):
a value head (rlax_tpu.rl.ValueHead on the model's hidden states) predicts per-token values;
advantages are GAE(gamma, lambda) over completion tokens with the outcome reward on the last
token (rl.advantage='gae', rl.gamma, rl.gae_lambda), whitened over the batch
(rl.whiten_advantages='batch'); clipped surrogate with optional dual clip (rl.dual_clip_c);
clipped value loss (rl.value_clip) weighted by rl.value_coef; k3 KL to the reference as a
per-token reward penalty (rl.kl_mode='reward'). rl.group_size=1: no grouping is needed, and no
dynamic sampling (a group of one always has zero reward variance, so it would drop every group).
Variants: '' (default), 'smoke'.
"""

from rlax_tpu.config import get_base_config, presets


def get_config(arg: str = ""):
    c = presets.arith(get_base_config(), "smoke" if arg == "smoke" else "")
    c.name = "arith_ppo"
    c.rl.group_size = 1
    c.rl.dynamic_sampling = False
    c.rl.advantage = "gae"
    c.rl.gamma = 1.0
    c.rl.gae_lambda = 0.95
    c.rl.whiten_advantages = "batch"
    c.rl.policy_loss = "ppo"
    c.rl.clip_eps_low = 0.2
    c.rl.clip_eps_high = 0.2
    c.rl.dual_clip_c = 3.0
    c.rl.loss_agg = "token_mean"
    c.rl.value_coef = 0.5
    c.rl.value_clip = 0.2
    c.rl.kl_mode = "reward"
    c.rl.kl_estimator = "k3"
    c.rl.kl_coef = 0.02
    # Decoupled PPO (AReaL): clip against the proximal policy, weight by pi_prox / pi_behavior.
    c.rl.off_policy = "decoupled"
    c.rl.is_cap = 5.0
    # One sample per prompt: as many sequences per step as the GRPO configs.
    c.trainer.batch_size *= 4 if arg == "smoke" else 8
    if arg not in ("", "smoke"):
        raise ValueError(f"unknown variant {arg!r} (expected '' or 'smoke')")
    return c
