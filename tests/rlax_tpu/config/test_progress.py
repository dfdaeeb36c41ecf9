"""Validation refuses configs that cannot make progress (every group dropped, or every advantage
zero whatever the rewards), and a property test: no accepted config is one of them."""

from __future__ import annotations

import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlax_tpu import rl
from rlax_tpu.config import ConfigError, finalize, get_base_config
from trainer.controller import is_zero_variance


def _config(**fields):
    c = get_base_config()
    for dotted, value in fields.items():
        section, name = dotted.split(".")
        c[section][name] = value
    return c


@pytest.mark.parametrize("fields,named", [
    ({"rl.group_size": 1, "rl.dynamic_sampling": True, "rl.advantage": "gae"}, r"rl\.dynamic_sampling.*rl\.group_size"),
    ({"rl.group_size": 1, "rl.advantage": "grpo"}, r"rl\.advantage.*rl\.group_size"),
    ({"rl.group_size": 1, "rl.advantage": "rloo"}, r"rl\.advantage.*rl\.group_size"),
    ({"rl.group_size": 1, "rl.advantage": "reinforce_pp", "trainer.batch_size": 1},
     r"rl\.advantage.*trainer\.batch_size"),
])
def test_configs_that_cannot_make_progress_are_refused_naming_the_fields(fields, named):
    with pytest.raises(ConfigError, match=named):
        finalize(_config(**fields))


def test_every_shipped_ppo_variant_is_accepted():
    from rlax_tpu.config import load_config

    for spec in ("configs/arith_ppo.py", "configs/arith_ppo.py:smoke"):
        assert load_config(spec).rl.group_size == 1


T, ROWS = 5, 12  # one padded shape for every sampled config: eager ops compile once


def _signal(config) -> bool:
    """Whether a batch of this config keeps a group and gives it a non-zero advantage when one
    sample of the batch is solved (the signal every estimator must see: a rare success)."""
    r = config.rl
    g, n = config.trainer.batch_size, r.group_size
    rewards = (np.arange(g * n) == 0).astype(np.float32)
    groups = rewards.reshape(g, n)
    kept = [i for i in range(g) if not (r.dynamic_sampling and
                                        is_zero_variance(types.SimpleNamespace(group=types.SimpleNamespace(
                                            samples=[types.SimpleNamespace(reward=x, loss_mask=[1])
                                                     for x in groups[i]]))))]
    if not kept:
        return False
    rows = np.concatenate([np.arange(i * n, (i + 1) * n) for i in kept])
    b = len(rows)
    rng = np.random.default_rng(0)
    # The kept groups, then padding rows (no tokens, not valid) up to ROWS: whole padding groups.
    mask = np.zeros((ROWS, T), bool)
    mask[:b] = np.arange(T)[None, :] < rng.integers(2, T + 1, size=b)[:, None]
    full_rewards = np.zeros(ROWS, np.float32)
    full_rewards[:b] = rewards[rows]
    logp = -rng.uniform(0.1, 2.0, size=(ROWS, T)).astype(np.float32)
    res = rl.compute_advantages(r, full_rewards, None, mask, values=rng.normal(size=(ROWS, T)).astype(np.float32),
                                logp=logp, ref_logp=logp,  # the reference policy itself: no KL signal
                                sample_mask=np.arange(ROWS) < b)
    return bool(np.any(np.abs(np.asarray(res.advantages)[:b]) > 1e-6))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(group_size=st.integers(1, 4), batch_size=st.integers(1, 3), advantage=st.sampled_from(rl.ADVANTAGES.names()),
       dynamic_sampling=st.booleans(), whiten=st.sampled_from(("none", "batch", "batch_scale")),
       gamma=st.sampled_from((1.0, 0.9)), passk_k=st.integers(1, 3), kl_mode=st.sampled_from(("loss", "reward")),
       kl_coef=st.sampled_from((0.0, 0.05)))
def test_no_accepted_config_drops_every_group_or_zeroes_every_advantage(group_size, batch_size, advantage,
                                                                      dynamic_sampling, whiten, gamma, passk_k,
                                                                      kl_mode, kl_coef):
    config = _config(**{"rl.group_size": group_size, "trainer.batch_size": batch_size, "rl.advantage": advantage,
                        "rl.dynamic_sampling": dynamic_sampling, "rl.whiten_advantages": whiten,
                        "rl.gamma": gamma, "rl.passk_k": passk_k, "rl.kl_mode": kl_mode, "rl.kl_coef": kl_coef})
    try:
        finalize(config)
    except ConfigError:
        return
    assert _signal(config), config.rl
