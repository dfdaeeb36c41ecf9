"""Every configs/arith_*.py loads, validates, builds its loss and gives a finite value and
gradient on a small random batch; bad rl.* values fail naming the field."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlax_tpu import rl
from rlax_tpu.config import ConfigError, finalize, get_base_config, load_config
from tests.helpers import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "arith_*.py")))
EXPECTED = {"arith_grpo", "arith_drgrpo", "arith_dapo", "arith_gspo", "arith_cispo", "arith_rloo",
            "arith_reinforcepp", "arith_ppo"}


def test_every_algorithm_family_has_a_config():
    assert EXPECTED <= {os.path.basename(p)[:-3] for p in CONFIGS}


def _random_batch(group_size, b_groups=2, t=6, h=8, seed=0):
    # numpy, not jax.random: eager jax ops each compile once, which dominates tiny tests.
    rng = np.random.default_rng(seed)
    b = group_size * b_groups
    lengths = rng.integers(1, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    logp = -rng.uniform(0.05, 3.0, size=(b, t)).astype(np.float32)
    noise = lambda scale: (scale * rng.standard_normal((b, t))).astype(np.float32)
    batch = {
        "mask": mask,
        "rewards": rng.integers(0, 2, size=b).astype(np.float32),
        "behavior_logp": logp + noise(0.05),
        "proximal_logp": logp + noise(0.05),
        "ref_logp": logp + noise(0.2),
        "truncated": lengths == t,
        "lengths": lengths.astype(np.int32),
        "old_values": noise(0.1),
    }
    hidden = rng.standard_normal((b, t, h)).astype(np.float32)
    return logp, batch, hidden


@pytest.mark.parametrize("spec", [f"{p}{v}" for p in CONFIGS
                                  for v in ("", ":smoke", ":filter", ":baseline")
                                  if v in ("", ":smoke") or f"'{v[1:]}'" in open(p).read()],
                         ids=lambda s: os.path.basename(s))
def test_every_variant_loads_and_builds(spec):
    config = load_config(spec)
    assert isinstance(rl.build_loss(config.rl), rl.RLLoss)


@pytest.mark.parametrize("spec", CONFIGS, ids=os.path.basename)
def test_config_builds_a_finite_loss(spec):
    config = load_config(spec)
    loss_fn = rl.build_loss(config.rl)
    logp, batch, hidden = _random_batch(config.rl.group_size)
    head = rl.ValueHead(hidden.shape[-1], rngs=nnx.Rngs(0))
    graphdef, head_state = nnx.split(head)
    entropy = -logp

    batch = rl.with_advantages(loss_fn.settings, batch)

    def f(lp, head_state):
        values = nnx.merge(graphdef, head_state)(hidden) if loss_fn.settings.uses_values else None
        return loss_fn(lp, batch, values=values, entropy=entropy)

    (loss, metrics), (g_logp, g_head) = jax.jit(
        jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(logp, head_state)
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(np.asarray(g_logp))) and np.any(np.asarray(g_logp) != 0)
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    if loss_fn.settings.uses_values:
        assert float(jnp.abs(g_head["kernel"][...]).sum()) > 0  # the value head is trained
        assert "value_loss" in metrics
    for key in ("clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean", "ratio_max",
                "mismatch_kl", "entropy", "adv_mean", "adv_std", "zero_adv_group_frac", "kl_ref"):
        assert key in metrics, key


@pytest.mark.parametrize("field,value", [
    ("policy_loss", "ppo3"), ("advantage", "a2c"), ("loss_agg", "sum"), ("kl_estimator", "k5"),
    ("off_policy", "vtrace"), ("kl_mode", "both"), ("whiten_advantages", "yes"),
    ("dual_clip_c", 0.5), ("gae_lambda", 1.5), ("clip_eps_high", -0.1), ("overlong_max_len", 2),
])
def test_bad_rl_values_name_the_field(field, value):
    config = get_base_config()
    config.rl[field] = value
    if field == "overlong_max_len":
        config.rl.overlong_buffer = 4
    with pytest.raises(ConfigError, match=rf"config\.rl\.{field}"):
        finalize(config)


def test_build_loss_ignores_rl_fields_it_does_not_own():
    # Other components may add their own rl.* fields (e.g. data-side selection knobs).
    config = get_base_config()
    config.rl.some_controller_knob = 3
    config.rl.policy_loss = "cispo"
    assert rl.build_loss(config.rl).settings.policy_loss == "cispo"
