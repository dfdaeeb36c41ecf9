"""Policy losses, aggregation, KL, off-policy weights, value loss and the assembled RLLoss:
hand-computed values, gradient identities and padding invariance."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from rlax_tpu import rl
from rlax_tpu.config import ConfigError
from tests.helpers.rl import settings as S


def _loss(s):
    """The loss as the learner applies it: advantages from the batch's rewards first."""
    fn = rl.build_loss(s)

    def loss(lp, batch, **kw):
        return fn(lp, batch if "advantages" in batch else rl.with_advantages(fn.settings, batch), **kw)

    return loss
log = np.log


def _pl(name, s, logp, old, adv, mask=None):
    logp = jnp.asarray(logp, jnp.float32)
    mask = jnp.ones(logp.shape, bool) if mask is None else jnp.asarray(mask, bool)
    return rl.POLICY_LOSSES.get(name)(s, logp, jnp.asarray(old, jnp.float32),
                                      jnp.asarray(adv, jnp.float32), mask)


# (ratio, A): unclipped, clipped low, clipped high, unclipped, unclipped, dual-clipped.
PPO_LOGP = [log([0.5, 0.5, 1.5, 1.5, 1.1, 4.0])]
PPO_ADV = [[1.0, -1.0, 1.0, -1.0, 1.0, -1.0]]
PPO_S = S(policy_loss="ppo", clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=3.0)


def test_ppo_clip_higher_and_dual_clip_values():
    loss, ratio, flags = _pl("ppo", PPO_S, PPO_LOGP, np.zeros((1, 6)), PPO_ADV)
    np.testing.assert_allclose(np.asarray(loss), [[-0.5, 0.8, -1.28, 1.5, -1.1, 3.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ratio), [[0.5, 0.5, 1.5, 1.5, 1.1, 4.0]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(flags["clipped_low"]), [[0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(flags["clipped_high"]), [[0, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(flags["dual_clipped"]), [[0, 0, 0, 0, 0, 1]])


def test_ppo_clipped_tokens_have_zero_gradient():
    f = lambda lp: jnp.sum(_pl("ppo", PPO_S, lp, np.zeros((1, 6)), PPO_ADV)[0])
    g = np.asarray(jax.grad(f)(jnp.asarray(PPO_LOGP, jnp.float32)))
    # d(-A r)/dlogp = -A r where unclipped; exactly 0 where a clip is active.
    np.testing.assert_allclose(g, [[-0.5, 0.0, 0.0, 1.5, -1.1, 0.0]], rtol=1e-6)


def test_gspo_sequence_ratio_value_and_gradient():
    s = S(policy_loss="gspo", clip_eps_low=0.2, clip_eps_high=0.2, loss_agg="seq_mean_token_mean",
          group_size=1)
    mask = jnp.asarray([[1, 1, 1], [1, 1, 0]], bool)
    logp = jnp.asarray([[0.3, 0.0, 0.0], [0.6, 0.0, 5.0]])  # padded token is junk
    adv = jnp.ones((2, 3))
    loss_fn = jax.jit(_loss(s))
    batch = {"mask": mask, "advantages": adv, "proximal_logp": jnp.zeros((2, 3))}
    # s_0 = e^0.1 (inside the clip), s_1 = e^0.3 > 1.2 (clipped) -> loss mean(-e^0.1, -1.2).
    loss, m = loss_fn(logp, batch)
    np.testing.assert_allclose(float(loss), (-math.exp(0.1) - 1.2) / 2, rtol=1e-6)
    g = np.asarray(jax.grad(lambda lp: loss_fn(lp, batch)[0])(logp))
    # Sequence-level: d/dlogp_t of -0.5 * exp(mean_t logp) = -0.5 * s_0 / 3; row 1 clipped.
    np.testing.assert_allclose(g[0], [-math.exp(0.1) / 6] * 3, rtol=1e-6)
    np.testing.assert_allclose(g[1], 0.0, atol=1e-7)
    assert float(m["clip_frac_high"]) == pytest.approx(2 / 5)


def test_cispo_values_and_stop_gradient_weight():
    s = S(policy_loss="cispo", clip_eps_low=1.0, clip_eps_high=1.0)
    logp = jnp.asarray([log([0.5, 1.0, 3.0])], jnp.float32)
    adv = [[1.0, -1.0, 2.0]]
    loss, _, flags = _pl("cispo", s, logp, np.zeros((1, 3)), adv)
    # weights sg(clip(r, 0, 2)) = [0.5, 1, 2]; loss = -w A log pi.
    np.testing.assert_allclose(np.asarray(loss), [[0.5 * log(2), 0.0, -4 * log(3)]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(flags["clipped_high"]), [[0, 0, 1]])
    g = jax.grad(lambda lp: jnp.sum(_pl("cispo", s, lp, np.zeros((1, 3)), adv)[0]))(logp)
    # Gradient is -w A only: the weight contributes nothing, even where it is not clipped.
    np.testing.assert_allclose(np.asarray(g), [[-0.5, 1.0, -4.0]], rtol=1e-6)


def test_reinforce_values_and_gradient():
    logp = jnp.asarray([[-1.0, -2.0]])
    loss, _, _ = _pl("reinforce", S(), logp, np.zeros((1, 2)), [[2.0, -1.0]])
    np.testing.assert_allclose(np.asarray(loss), [[2.0, -2.0]])
    g = jax.grad(lambda lp: jnp.sum(_pl("reinforce", S(), lp, lp, [[2.0, -1.0]])[0]))(logp)
    np.testing.assert_allclose(np.asarray(g), [[-2.0, 1.0]])


def test_aggregations():
    x = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
    m = jnp.asarray([[1, 1, 1], [1, 0, 0]], bool)
    assert float(rl.AGGREGATIONS.get("token_mean")(x, m)) == pytest.approx(10 / 4)
    assert float(rl.AGGREGATIONS.get("seq_mean_token_mean")(x, m)) == pytest.approx((2 + 4) / 2)
    assert float(rl.AGGREGATIONS.get("seq_mean_token_sum_norm")(x, m, 5)) == pytest.approx(1.0)
    assert float(rl.AGGREGATIONS.get("seq_mean_token_sum_norm")(x, m, 0)) == pytest.approx(5 / 3)


def test_kl_estimators():
    lp, ref = jnp.asarray([log(0.5)]), jnp.asarray([log(0.25)])
    assert float(rl.KL_ESTIMATORS.get("k1")(lp, ref)[0]) == pytest.approx(log(2), rel=1e-6)
    assert float(rl.KL_ESTIMATORS.get("k2")(lp, ref)[0]) == pytest.approx(0.5 * log(2) ** 2, rel=1e-6)
    assert float(rl.KL_ESTIMATORS.get("k3")(lp, ref)[0]) == pytest.approx(0.5 - 1 + log(2), rel=1e-5)
    for k in ("k1", "k2", "k3"):
        assert float(rl.KL_ESTIMATORS.get(k)(lp, lp)[0]) == 0.0


def test_off_policy_weights():
    prox = jnp.asarray([[0.0, log(3.0), log(1.5)]], jnp.float32)
    behav = jnp.zeros((1, 3))
    w, capped = rl.OFF_POLICY.get("tis")(S(is_cap=2.0), prox, behav)
    np.testing.assert_allclose(np.asarray(w), [[1.0, 2.0, 1.5]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(capped), [[0, 1, 0]])
    w, _ = rl.OFF_POLICY.get("decoupled")(S(is_cap=2.0), prox, behav)
    np.testing.assert_allclose(np.asarray(w), [[1.0, 0.0, 1.5]], rtol=1e-6)
    w, _ = rl.OFF_POLICY.get("decoupled")(S(is_cap=0.0), prox, behav)
    np.testing.assert_allclose(np.asarray(w), [[1.0, 3.0, 1.5]], rtol=1e-6)


def test_decoupled_ppo_in_the_loss():
    # Ratio against proximal (clip around it), times the behavior weight pi_prox / pi_behav.
    s = S(policy_loss="ppo", off_policy="tis", is_cap=2.0, clip_eps_low=0.2, clip_eps_high=0.2,
          group_size=1)
    logp = jnp.asarray([[log(1.1), log(1.5)]], jnp.float32)
    batch = {"mask": jnp.ones((1, 2), bool), "advantages": jnp.ones((1, 2)),
             "proximal_logp": jnp.zeros((1, 2)), "behavior_logp": jnp.asarray([[log(0.5), 0.0]])}
    loss, m = jax.jit(_loss(s))(logp, batch)
    # token 0: weight min(2, 2) = 2, -1.1 * 2; token 1: weight 1, clipped -1.2.
    assert float(loss) == pytest.approx((-2.2 - 1.2) / 2, rel=1e-6)
    assert float(m["is_weight_max"]) == pytest.approx(2.0)
    assert float(m["mismatch_kl"]) == pytest.approx(log(0.5) / 2, rel=1e-6)
    assert float(m["ratio_max"]) == pytest.approx(1.5, rel=1e-6)


def test_clipped_value_loss():
    loss, clipped = rl.clipped_value_loss(jnp.asarray([1.0, 0.0, 0.9]), jnp.asarray([0.5, 0.5, 0.5]),
                                          jnp.asarray([0.0, 1.0, 1.0]), 0.2)
    np.testing.assert_allclose(np.asarray(loss), [0.5, 0.5, 0.045], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(clipped), [0, 0, 1])
    g = jax.grad(lambda v: jnp.sum(rl.clipped_value_loss(v, jnp.asarray([0.5]), jnp.asarray([1.0]),
                                                         0.2)[0]))(jnp.asarray([0.9]))
    assert float(g[0]) == 0.0  # the clipped branch holds V_old + c, no gradient to V


def test_value_head():
    head = rl.ValueHead(8, rngs=nnx.Rngs(0))
    assert head.kernel.get_metadata()["out_sharding"] == ("embed",)
    hidden = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
    assert head(hidden).shape == (2, 3)
    np.testing.assert_allclose(np.asarray(head(hidden)), 0.0)  # zero-initialised
    graphdef, state = nnx.split(head)

    def f(state):
        return jnp.sum(jnp.square(nnx.merge(graphdef, state)(hidden) - 1.0))

    grads = jax.jit(jax.grad(f))(state)
    assert float(jnp.abs(grads["bias"][...])) == pytest.approx(12.0)


def _batch(b=4, t=5, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.asarray([5, 3, 4, 2][:b])
    mask = np.arange(t)[None, :] < lengths[:, None]
    logp = -rng.uniform(0.1, 2.0, size=(b, t)).astype(np.float32)
    noise = lambda scale: (scale * rng.standard_normal((b, t))).astype(np.float32)
    return jnp.asarray(logp), {
        "mask": mask, "rewards": np.asarray([1.0, 0.0, 2.0, 2.0][:b], np.float32),
        "proximal_logp": logp, "behavior_logp": logp + noise(0.05),
        "ref_logp": logp + noise(0.1), "truncated": lengths == t, "old_values": noise(1.0),
    }


@pytest.mark.parametrize("name,agg", [
    ("ppo", "token_mean"), ("ppo", "seq_mean_token_sum_norm"), ("gspo", "seq_mean_token_mean"),
    ("gspo", "token_mean"), ("cispo", "token_mean"), ("reinforce", "seq_mean_token_mean")])
def test_on_policy_gradient_is_the_policy_gradient(name, agg):
    # Ratio 1 everywhere: every loss's gradient is the PG estimate d/dlogp agg(-A logp).
    s = S(policy_loss=name, advantage="grpo", group_size=2, loss_agg=agg, agg_max_len=6)
    logp, batch = _batch()
    loss_fn = _loss(s)
    g, m = jax.jit(jax.grad(lambda lp: loss_fn(lp, batch), has_aux=True))(logp)
    adv = rl.compute_advantages(s, batch["rewards"], 2, batch["mask"]).advantages
    agg_fn = rl.AGGREGATIONS.get(agg)
    g_pg = jax.grad(lambda lp: agg_fn(-adv * lp, batch["mask"], 6))(logp)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_pg), rtol=1e-5, atol=1e-7)
    assert float(m["ratio_max"]) == pytest.approx(1.0)


def test_loss_terms_and_metrics():
    s = S(advantage="grpo", group_size=2, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01,
          loss_agg="token_mean", overlong_filter=True)
    logp, batch = _batch()
    entropy = jnp.full(logp.shape, 2.0)
    loss, m = jax.jit(_loss(s))(logp, batch, entropy=entropy)
    mask = np.asarray(batch["mask"]) & ~np.asarray(batch["truncated"])[:, None]
    kl = np.asarray(rl.KL_ESTIMATORS.get("k3")(logp, batch["ref_logp"]))
    want_kl = (kl * mask).sum() / mask.sum()
    assert float(m["kl_ref"]) == pytest.approx(want_kl, rel=1e-5)
    assert float(m["entropy"]) == pytest.approx(2.0)
    assert float(loss) == pytest.approx(float(m["pg_loss"]) + 0.1 * want_kl - 0.02, rel=1e-5)
    assert float(m["num_tokens"]) == mask.sum() == 9  # the truncated sample is filtered
    # Group 0 rewards [1, 0] vary, group 1 rewards [2, 2] do not.
    assert float(m["zero_adv_group_frac"]) == pytest.approx(0.5)
    behav, prox = np.asarray(batch["behavior_logp"]), np.asarray(batch["proximal_logp"])
    assert float(m["mismatch_kl"]) == pytest.approx(((behav - prox) * mask).sum() / mask.sum(),
                                                     rel=1e-4)
    for key in ("clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean", "ratio_max",
                "mismatch_kl_k3", "adv_mean", "adv_std", "adv_min", "adv_max", "loss"):
        assert np.isfinite(float(m[key])), key


def test_ppo_with_value_head_terms():
    s = S(advantage="gae", group_size=1, value_coef=0.5, value_clip=0.2, gae_lambda=1.0)
    logp, batch = _batch()
    values = batch["old_values"] + 0.5
    loss, m = jax.jit(_loss(s))(logp, batch, values=values)
    assert float(loss) == pytest.approx(float(m["pg_loss"]) + 0.5 * float(m["value_loss"]), rel=1e-6)
    assert float(m["value_clip_frac"]) > 0.0
    g = np.asarray(jax.jit(jax.grad(lambda v: _loss(s)(logp, batch, values=v)[0]))(values))
    returns = rl.compute_advantages(s, batch["rewards"], 1, batch["mask"],
                                    values=batch["old_values"]).returns
    _, clipped = rl.clipped_value_loss(values, batch["old_values"], returns, 0.2)
    clipped, mask = np.asarray(clipped), np.asarray(batch["mask"])
    assert clipped[mask].any() and (~clipped[mask]).any()
    assert np.all(g[clipped] == 0.0)  # the clipped branch holds V_old +- c: no gradient
    assert np.all(g[mask & ~clipped] != 0.0)
    with pytest.raises(ValueError, match="values"):
        _loss(s)(logp, batch)


def test_unknown_names_raise_config_error_naming_the_field():
    for field, bad in (("policy_loss", "ppo2"), ("advantage", "gpro"), ("loss_agg", "sum"),
                       ("kl_estimator", "k4"), ("off_policy", "is")):
        with pytest.raises(ConfigError, match=rf"config\.rl\.{field}"):
            _loss(dataclasses.replace(S(), **{field: bad}))
    with pytest.raises(ConfigError, match=r"config\.rl\.nope"):
        _loss({"nope": 1})


def test_missing_batch_keys_are_named():
    logp, batch = _batch()
    with pytest.raises(KeyError, match="ref_logp"):
        _loss(S(kl_coef=0.1, group_size=2))(logp, {k: v for k, v in batch.items()
                                                          if k != "ref_logp"})
    with pytest.raises(KeyError, match="behavior_logp"):
        _loss(S(off_policy="tis", group_size=2))(logp, {"mask": batch["mask"],
                                                               "rewards": batch["rewards"]})


# --- padding invariance -----------------------------------------------------------------

PAD_CASES = {
    "gspo_tis_kl": S(advantage="grpo", policy_loss="gspo", loss_agg="seq_mean_token_mean",
                     clip_eps_low=0.01, clip_eps_high=0.01, off_policy="tis", kl_coef=0.05),
    "cispo_dapo": S(advantage="rloo", policy_loss="cispo", clip_eps_low=1.0, clip_eps_high=0.5,
                    loss_agg="token_mean", overlong_filter=True, overlong_buffer=2,
                    overlong_max_len=4, entropy_coef=0.01),
    "drgrpo": S(advantage="drgrpo", loss_agg="seq_mean_token_sum_norm", agg_max_len=8,
                off_policy="decoupled", dual_clip_c=2.0, clip_eps_high=0.28),
    "reinforce_pp": S(advantage="reinforce_pp", kl_mode="reward", kl_coef=0.1),
    "ppo_gae": S(advantage="gae", whiten_advantages="batch", kl_mode="reward", kl_coef=0.1,
                 gae_lambda=0.9, gamma=0.99),
}
B, G, T, PAD_T = 4, 2, 4, 3


def _eval(s, logp, batch, values, entropy):
    def f(lp, v):
        return _loss(s)(lp, batch, values=v, entropy=entropy)

    (loss, m), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(logp, values)
    return loss, m, grads


_eval_jit = jax.jit(_eval, static_argnums=0)


@pytest.mark.parametrize("case", sorted(PAD_CASES))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_padding_does_not_change_results(case, data):
    s = dataclasses.replace(PAD_CASES[case], group_size=G)
    f32 = st.floats(-2.0, 0.0, allow_nan=False, width=32)
    arr = lambda n: np.asarray(data.draw(st.lists(f32, min_size=n, max_size=n)), np.float32)
    lengths = np.asarray(data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    rewards = np.asarray(data.draw(st.lists(st.sampled_from([0.0, 1.0, 0.5]), min_size=B,
                                            max_size=B)), np.float32)
    logp, prox = arr(B * T).reshape(B, T), arr(B * T).reshape(B, T) * 0.1
    mask = np.arange(T)[None, :] < lengths[:, None]
    small = {"mask": mask, "rewards": rewards, "truncated": lengths == T, "old_values": prox * 5,
             "proximal_logp": logp + prox, "behavior_logp": logp + prox[::-1] * 0.5,
             "ref_logp": logp + prox * 2}
    values, entropy = -prox * 3, -logp
    # Pad: PAD_T junk columns on the right, and a whole junk group of fully masked rows.
    junk = lambda x, fill: np.concatenate(
        [np.concatenate([x, np.full((x.shape[0], PAD_T), fill, x.dtype)], 1),
         np.full((G, T + PAD_T), fill, x.dtype)], 0)
    big = {k: (junk(v, 7) if v.ndim == 2 else np.concatenate([v, np.full((G,), 1, v.dtype)]))
           for k, v in small.items()}
    big["mask"] = junk(mask, False)
    out_s = _eval_jit(s, jnp.asarray(logp), small, jnp.asarray(values), jnp.asarray(entropy))
    out_b = _eval_jit(s, jnp.asarray(junk(logp, 7)), big, jnp.asarray(junk(values, 7)),
                      jnp.asarray(junk(entropy, 7)))
    np.testing.assert_allclose(float(out_b[0]), float(out_s[0]), rtol=1e-5, atol=1e-6)
    assert out_s[1].keys() == out_b[1].keys()
    for key, val in out_s[1].items():
        np.testing.assert_allclose(float(out_b[1][key]), float(val), rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    for gs, gb in zip(out_s[2], out_b[2], strict=True):
        np.testing.assert_allclose(np.asarray(gb)[:B, :T], np.asarray(gs), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(gb)[B:], 0.0)
        np.testing.assert_allclose(np.asarray(gb)[:, T:], 0.0)


def test_whiten_is_padding_invariant_when_values_sit_far_from_zero():
    # All rewards ~1 with tiny per-token KL terms: std << |mean|, so a one-pass mean's rounding
    # (which depends on how much padding is summed) is amplified by 1/std (CI found this).
    from rlax_tpu.rl.masked import whiten

    rng = np.random.default_rng(0)
    for _ in range(50):
        x = (1.0 + rng.normal(size=(4, 4)) * 1e-3).astype(np.float32)
        padded = np.full((6, 7), 7.0, np.float32)
        padded[:4, :4] = x
        mask = np.zeros((6, 7), bool)
        mask[:4, :4] = True
        small = whiten(jnp.asarray(x), jnp.ones((4, 4), bool), 1e-6)
        big = whiten(jnp.asarray(padded), jnp.asarray(mask), 1e-6)
        np.testing.assert_allclose(np.asarray(big)[:4, :4], np.asarray(small), atol=5e-6)
        assert not np.asarray(big)[~mask].any()
