"""RLOO on the arithmetic task.

RLOO (Ahmadian et al., "Back to Basics", arXiv 2402.14740; Kool et al. 2019): REINFORCE with a
leave-one-out baseline, A_i = r_i - mean_{j != i} r_j over the group (rl.advantage='rloo'),
and the vanilla policy gradient -A * log pi (rl.policy_loss='reinforce'); no clipping, so it
suits on-policy training (rl.max_staleness=0). Set rl.policy_loss='ppo' for the clipped
off-policy variant.
Knobs: rl.group_size (>= 2), rl.kl_coef with rl.kl_mode='reward' (KL as a reward penalty).
Variants: '' (default), 'smoke'.
"""

from rlax_tpu.config import get_base_config, presets


def get_config(arg: str = ""):
    c = presets.arith(get_base_config(), "smoke" if arg == "smoke" else "")
    c.name = "arith_rloo"
    c.rl.advantage = "rloo"
    c.rl.policy_loss = "reinforce"
    c.rl.loss_agg = "seq_mean_token_mean"
    c.rl.max_staleness = 0
    c.rl.kl_coef = 0.0
    c.rl.kl_mode = "reward"
    if arg not in ("", "smoke"):
        raise ValueError(f"unknown variant {arg!r} (expected '' or 'smoke')")
    return c
