"""DAPO on the arithmetic task.

DAPO (Yu et al., arXiv 2503.14476): GRPO advantages with
- clip-higher: a wider upper clip (rl.clip_eps_high=0.28 > rl.clip_eps_low=0.2) so low-prob
  tokens can grow, which keeps entropy from collapsing;
- dynamic sampling (rl.dynamic_sampling=True): the controller drops groups whose rewards are
  all equal (zero advantage) and refills the batch;
- token-level loss (rl.loss_agg='token_mean'): every token of the batch weighs the same;
- overlong reward shaping: soft penalty over the last rl.overlong_buffer tokens before
  rl.overlong_max_len (rl.overlong_penalty at the limit); or, instead, overlong filtering
  (rl.overlong_filter=True, variant 'filter') which masks truncated samples out of the loss;
- no KL term (rl.kl_coef=0);
- difficulty-aware prompt selection (rl.difficulty_filter=True, not in 'smoke'): a prompt whose
  first rl.difficulty_min_groups groups were all solved or all failed is no longer issued, so the
  workers stop generating groups that dynamic sampling would drop (an untrained smoke model fails
  everything, which would leave no prompt to issue).
Variants: '' (default), 'smoke', 'filter' (overlong filtering instead of the soft penalty).
"""

from rlax_tpu.config import get_base_config, presets


def get_config(arg: str = ""):
    c = presets.arith(get_base_config(), "smoke" if arg == "smoke" else "")
    c.name = "arith_dapo"
    c.rl.advantage = "grpo"
    c.rl.policy_loss = "ppo"
    c.rl.clip_eps_low = 0.2
    c.rl.clip_eps_high = 0.28
    c.rl.loss_agg = "token_mean"
    c.rl.kl_coef = 0.0
    c.rl.off_policy = "tis"  # truncated IS against the engine's log-probs (max_staleness=1)
    c.rl.dynamic_sampling = True
    c.rl.difficulty_filter = arg != "smoke"
    c.rl.difficulty_min_groups = 2
    c.rl.overlong_max_len = c.inference.max_new_tokens
    c.rl.overlong_buffer = c.inference.max_new_tokens // 4
    c.rl.overlong_penalty = 1.0
    if arg == "filter":
        c.rl.overlong_buffer = 0
        c.rl.overlong_filter = True
    elif arg not in ("", "smoke"):
        raise ValueError(f"unknown variant {arg!r} (expected '', 'smoke' or 'filter')")
    return c
