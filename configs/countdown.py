"""The Countdown game with the ~1M-param toy model: the algorithms of the RL studies (docs/rl.md).

    python -m rlax_tpu.launch --config=configs/countdown.py[:variant] --workdir=runs/countdown

Variants: '' (GRPO: group mean/std advantages, PPO clip 0.2, token-mean loss), 'ppo' (a value
head with GAE, one sample per prompt, KL in the reward as in PPO-RLHF), 'dapo' (clip-higher
0.2/0.28, dynamic sampling, soft overlong penalty, token-mean loss), 'smoke'. All: a short SFT
on worked solutions, then 2 mini-batch updates x 2 epochs per batch, one step of staleness
corrected by truncated IS (decoupled PPO for 'ppo').
"""

from rlax_tpu.config import get_base_config, presets


def get_config(arg: str = ""):
    variant, _, size = arg.partition(",")  # e.g. 'dapo,smoke'
    if variant == "smoke":
        variant, size = "", "smoke"
    if variant not in ("", "grpo", "ppo", "dapo"):
        raise ValueError(f"unknown variant {arg!r} (expected '', 'ppo', 'dapo', optionally ',smoke')")
    c = presets.countdown(get_base_config(), size)
    c.name = f"countdown_{variant or 'grpo'}"
    c.rl.advantage = "grpo"
    c.rl.policy_loss = "ppo"
    c.rl.clip_eps_low = c.rl.clip_eps_high = 0.2
    c.rl.loss_agg = "token_mean"
    c.rl.off_policy = "tis"
    c.rl.dynamic_sampling = False
    if variant == "ppo":
        c.trainer.batch_size *= c.rl.group_size  # the same samples per step, one per prompt
        c.rl.group_size = 1
        c.rl.advantage = "gae"
        c.rl.whiten_advantages = "batch"
        c.rl.kl_mode = "reward"
        c.rl.kl_coef = 0.02
        c.rl.off_policy = "decoupled"
        c.rl.is_cap = 5.0
    elif variant == "dapo":
        c.rl.clip_eps_high = 0.28
        c.rl.dynamic_sampling = True
        c.rl.overlong_max_len = c.inference.max_new_tokens
        c.rl.overlong_buffer = c.inference.max_new_tokens // 4
    return c
