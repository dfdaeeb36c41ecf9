"""Dr.GRPO ("GRPO done right") on the arithmetic task.

Dr.GRPO (Liu et al., "Understanding R1-Zero-Like Training", arXiv 2503.20783) removes GRPO's
two length/difficulty biases: the advantage is A_i = r_i - mean_group (no std division,
rl.advantage='drgrpo') and the loss divides each sequence's token sum by a constant
(rl.loss_agg='seq_mean_token_sum_norm' with rl.agg_max_len = the maximum completion length)
instead of by the sequence's own length.

Knobs: rl.agg_max_len (set it to inference.max_new_tokens), rl.clip_eps_low/high, rl.group_size.
Variants: '' (default), 'smoke'.
"""

from rlax_tpu.config import get_base_config, presets


def get_config(arg: str = ""):
    c = presets.arith(get_base_config(), "smoke" if arg == "smoke" else "")
    c.name = "arith_drgrpo"
    c.rl.advantage = "drgrpo"
    c.rl.policy_loss = "ppo"
    c.rl.loss_agg = "seq_mean_token_sum_norm"
    c.rl.agg_max_len = c.inference.max_new_tokens
    c.rl.kl_coef = 0.0
    c.rl.off_policy = "tis"  # truncated IS against the engine's log-probs (max_staleness=1)
    if arg not in ("", "smoke"):
        raise ValueError(f"unknown variant {arg!r} (expected '' or 'smoke')")
    return c
