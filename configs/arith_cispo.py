"""CISPO on the arithmetic task.

CISPO (MiniMax-M1, arXiv 2506.13585): instead of clipping the token update away, clip the
importance weight and stop its gradient: loss_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high))
* A * log pi_t (rl.policy_loss='cispo'). Every token keeps a gradient (rare "fork" tokens
included). The paper puts no lower bound on the weight (rl.clip_eps_low >= 1) and tunes only
the upper one (rl.clip_eps_high); token-level aggregation (rl.loss_agg='token_mean').
Variants: '' (default), 'smoke'.
"""

from rlax_tpu.config import get_base_config, presets


def get_config(arg: str = ""):
    c = presets.arith(get_base_config(), "smoke" if arg == "smoke" else "")
    c.name = "arith_cispo"
    c.rl.advantage = "grpo"
    c.rl.policy_loss = "cispo"
    c.rl.clip_eps_low = 1.0
    c.rl.clip_eps_high = 2.0
    c.rl.loss_agg = "token_mean"
    c.rl.kl_coef = 0.0
    c.rl.off_policy = "tis"  # truncated IS against the engine's log-probs (max_staleness=1)
    if arg not in ("", "smoke"):
        raise ValueError(f"unknown variant {arg!r} (expected '' or 'smoke')")
    return c
