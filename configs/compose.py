"""Compositions of list operations with the ~1M-param toy model: the extrapolation study.

    python -m rlax_tpu.launch --config=configs/compose.py --workdir=runs/compose

Trained (SFT, then GRPO) on compositions of 1-2 operations; held-out evaluation on depth 2, and
in docs/rl.md on depths 3 and 4 (task.eval_min_difficulty / eval_difficulty) before and after RL.
Variants: '' and 'smoke'.
"""

from rlax_tpu.config import get_base_config, presets


def get_config(arg: str = ""):
    c = presets.compose(get_base_config(), arg)
    c.name = "compose_grpo"
    c.rl.advantage = "grpo"
    c.rl.policy_loss = "ppo"
    c.rl.loss_agg = "token_mean"
    c.rl.off_policy = "tis"
    return c
