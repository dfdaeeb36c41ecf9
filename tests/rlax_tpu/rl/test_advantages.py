"""Advantage estimators, returns, GAE and reward shaping against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlax_tpu import rl
from tests.helpers.rl import settings as S

# Jitted with the settings static, as the trainer uses it (and so properties compile once).
_compute = jax.jit(rl.compute_advantages, static_argnums=(0, 2))


def _adv(settings_, rewards, mask, group_size=None, **kw):
    out = _compute(settings_, jnp.asarray(rewards, jnp.float32), group_size,
                   jnp.asarray(mask, bool), **kw)
    return np.asarray(out.advantages), out


MASK = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]]  # ragged, one with a prompt-side gap


def _expect(seq_adv):
    return np.asarray(MASK, np.float32) * np.asarray(seq_adv, np.float32)[:, None]


def test_grpo_group_mean_std():
    # Group [1,0,0,0]: mean 1/4, population std sqrt(3)/4.
    adv, _ = _adv(S(advantage="grpo", adv_eps=1e-6), [1, 0, 0, 0], MASK, 4)
    std = math.sqrt(3) / 4
    want = _expect([0.75 / (std + 1e-6), -0.25 / (std + 1e-6), -0.25 / (std + 1e-6),
                    -0.25 / (std + 1e-6)])
    np.testing.assert_allclose(adv, want, rtol=1e-6)
    np.testing.assert_allclose(adv[0, 0], math.sqrt(3), rtol=1e-5)


def test_drgrpo_no_std():
    adv, _ = _adv(S(advantage="drgrpo"), [1, 0, 0, 0], MASK, 4)
    np.testing.assert_allclose(adv, _expect([0.75, -0.25, -0.25, -0.25]), atol=1e-7)


def test_rloo_leave_one_out():
    adv, _ = _adv(S(advantage="rloo"), [1, 0, 0, 0], MASK, 4)
    np.testing.assert_allclose(adv, _expect([1.0, -1 / 3, -1 / 3, -1 / 3]), rtol=1e-6)
    # Two groups of two: [2, 0] -> [2, -2]; [1, 3] -> [-2, 2].
    adv, _ = _adv(S(advantage="rloo"), [2, 0, 1, 3], MASK, 2)
    np.testing.assert_allclose(adv, _expect([2, -2, -2, 2]), rtol=1e-6)


def test_explicit_group_ids_match_contiguous_layout():
    ids = jnp.asarray([1, 0, 1, 0], jnp.int32)  # interleaved groups
    adv, _ = _adv(S(advantage="drgrpo"), [1, 3, 0, 5], MASK, group_ids=ids)
    np.testing.assert_allclose(adv, _expect([0.5, -1, -0.5, 1]), atol=1e-7)


def test_reinforce_pp_global_normalization():
    mask = [[1, 1, 0], [1, 1, 1]]
    # gamma = 1: returns [[1,1,-],[0,0,0]]; 5 tokens, mean 0.4, std sqrt(0.24).
    adv, _ = _adv(S(advantage="reinforce_pp", adv_eps=0.0, group_size=1), [1, 0], mask)
    want = np.array([[math.sqrt(1.5), math.sqrt(1.5), 0], [-math.sqrt(2 / 3)] * 3])
    np.testing.assert_allclose(adv, want, rtol=1e-5)


def test_reinforce_pp_baseline_group_mean_then_batch_whitening():
    mask = [[1, 1], [1, 1]]
    adv, _ = _adv(S(advantage="reinforce_pp_baseline", adv_eps=0.0), [1, 0], mask, 2)
    # Baseline 0.5 -> returns +-0.5 on all tokens: token mean 0, std 0.5.
    np.testing.assert_allclose(adv, [[1, 1], [-1, -1]], rtol=1e-6)
    # Reward correlated with length: the token mean is off zero after the group baseline (the
    # long right answer has more tokens) and is subtracted, as OpenRLHF and verl whiten.
    mask = np.asarray([[1, 1, 1], [1, 0, 0]], bool)
    adv, _ = _adv(S(advantage="reinforce_pp_baseline", adv_eps=0.0), [1, 0], mask, 2)
    g = np.where(mask, np.asarray([[0.5], [-0.5]]), 0.0)  # returns after the group baseline
    mean = g[mask].mean()
    want = np.where(mask, (g - mean) / g[mask].std(), 0.0)
    np.testing.assert_allclose(adv, want, rtol=1e-5)
    assert abs(np.asarray(adv)[mask].mean()) < 1e-6


def test_grpo_passk_pushes_only_the_best_sample_by_its_margin():
    mask = np.ones((8, 2), bool)
    rewards = [0, 1, 0, 0,  1, 1, 0, 0]  # group 0: one success; group 1: two (no margin)
    adv, _ = _adv(S(advantage="grpo_passk", adv_eps=0.0), rewards, mask, 4)
    std0 = np.std([0, 1, 0, 0])
    np.testing.assert_allclose(adv[:, 0], [0, 1 / std0, 0, 0, 0, 0, 0, 0], rtol=1e-6)
    adv, _ = _adv(S(advantage="grpo_passk", adv_eps=0.0), [0.2, 0.9, 0.5, 0.9], np.ones((4, 1), bool), 4)
    np.testing.assert_allclose(adv[:, 0], 0.0, atol=1e-7)  # a tie at the top: the margin is 0
    adv, _ = _adv(S(advantage="grpo_passk", adv_eps=0.0), [0.2, 0.9, 0.5, 0.1], np.ones((4, 1), bool), 4)
    np.testing.assert_allclose(adv[:, 0], [0, 0.4 / np.std([0.2, 0.9, 0.5, 0.1]), 0, 0], rtol=1e-5)


def test_discounted_returns_skip_gaps():
    r = jnp.asarray([[0.1, 0.2, 1.0], [0.1, 9.0, 1.0]])
    m = jnp.asarray([[1, 1, 1], [1, 0, 1]], bool)
    g = np.asarray(rl.discounted_returns(r, m, 0.5))
    np.testing.assert_allclose(g, [[0.45, 0.7, 1.0], [0.6, 0.0, 1.0]], rtol=1e-6)


def test_gae_hand_computed_with_prompt_and_padding():
    # gamma 1, lambda 0.5, V = [.5, .6, .7], reward 1 on the last token:
    # delta = [.1, .1, .3]; A2 = .3, A1 = .1 + .5*.3 = .25, A0 = .1 + .5*.25 = .225.
    s = S(advantage="gae", gamma=1.0, gae_lambda=0.5, group_size=1)
    mask = [[0, 1, 1, 1, 0]]
    values = jnp.asarray([[9.0, 0.5, 0.6, 0.7, 9.0]])
    adv, out = _adv(s, [1.0], mask, values=values)
    np.testing.assert_allclose(adv, [[0, 0.225, 0.25, 0.3, 0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.returns), [[0, 0.725, 0.85, 1.0, 0]], rtol=1e-6)
    # gamma 0.9, lambda 1: A_t = G_t - V_t with G = [0.81, 0.9, 1].
    s = S(advantage="gae", gamma=0.9, gae_lambda=1.0, group_size=1)
    adv, _ = _adv(s, [1.0], mask, values=values)
    np.testing.assert_allclose(adv, [[0, 0.31, 0.3, 0.3, 0]], rtol=1e-5)


def test_gae_whitening_options():
    s = S(advantage="gae", gamma=1.0, gae_lambda=1.0, group_size=1, adv_eps=0.0)
    mask = [[1, 1], [1, 0]]
    values = jnp.zeros((2, 2))
    raw, _ = _adv(s, [1.0, 3.0], mask, values=values)  # A = returns = [[1, 1], [3, -]]
    np.testing.assert_allclose(raw, [[1, 1], [3, 0]])
    std = math.sqrt(((1 - 5 / 3) ** 2 * 2 + (3 - 5 / 3) ** 2) / 3)
    w, _ = _adv(S(**{**s.__dict__, "whiten_advantages": "batch"}), [1.0, 3.0], mask, values=values)
    np.testing.assert_allclose(w, [[(1 - 5 / 3) / std] * 2, [(3 - 5 / 3) / std, 0]], rtol=1e-5)
    w, _ = _adv(S(**{**s.__dict__, "whiten_advantages": "batch_scale"}), [1.0, 3.0], mask,
                values=values)
    np.testing.assert_allclose(w, [[1 / std] * 2, [3 / std, 0]], rtol=1e-5)


def test_kl_as_reward_penalty():
    # k1 penalty 0.5 * (0.1 + 0.2) on row 0 -> sequence rewards [0.85, 1]; Dr.GRPO: +-0.075.
    s = S(advantage="drgrpo", kl_coef=0.5, kl_mode="reward", kl_estimator="k1")
    logp = jnp.asarray([[0.1, 0.2], [0.0, 0.0]])
    adv, out = _adv(s, [1, 1], [[1, 1], [1, 1]], 2, logp=logp, ref_logp=jnp.zeros((2, 2)))
    np.testing.assert_allclose(adv, [[-0.075] * 2, [0.075] * 2], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.rewards), [0.85, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="kl_mode='reward'"):
        _adv(s, [1, 1], [[1, 1], [1, 1]], 2)


def test_overlong_penalty_soft_buffer():
    got = rl.overlong_penalty(jnp.asarray([5, 6, 8, 10, 12]), max_len=10, buffer=4, penalty=1.0)
    np.testing.assert_allclose(np.asarray(got), [0, 0, -0.5, -1, -1])
    # Applied to rewards inside compute_advantages (lengths default to the mask sums).
    s = S(advantage="drgrpo", overlong_buffer=2, overlong_max_len=3, overlong_penalty=0.5)
    _, out = _adv(s, [1, 1, 1, 1], MASK, 4)
    np.testing.assert_allclose(np.asarray(out.rewards), [0.75, 1, 0.5, 0.75])


def test_overlong_filter():
    m = rl.overlong_filter(jnp.ones((2, 2), bool), jnp.asarray([True, False]))
    np.testing.assert_array_equal(np.asarray(m), [[0, 0], [1, 1]])


# --- properties ---------------------------------------------------------------------------

GROUP_ESTIMATORS = ["grpo", "drgrpo", "rloo", "reinforce_pp_baseline"]
rewards_st = st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=8, max_size=8)
lengths_st = st.lists(st.integers(1, 5), min_size=8, max_size=8)


def _mask_from(lengths, t=5):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None])


def test_passk_is_each_samples_leave_one_out_share_of_the_groups_pass_at_k():
    import itertools

    def best_of_k(values, k):  # the unbiased estimator, by enumeration
        return np.mean([max(c) for c in itertools.combinations(values, k)])

    rng = np.random.default_rng(0)
    rewards = rng.choice([0.0, 1.0, 0.5], size=12).astype(np.float32)
    adv, _ = _adv(S(advantage="passk", passk_k=3, adv_eps=0.0), rewards, np.ones((12, 2), bool), 6)
    want = []
    for g in (rewards[:6], rewards[6:]):
        want += [(best_of_k(g, 3) - best_of_k(np.delete(g, i), 3)) / g.std() for i in range(6)]
    np.testing.assert_allclose(np.asarray(adv)[:, 0], want, atol=1e-5)
    # 0/1 rewards: a lone success gains k/n of pass@k; once a group mostly succeeds, nothing moves.
    adv, _ = _adv(S(advantage="passk", passk_k=2, adv_eps=0.0), [1, 0, 0, 0, 1, 1, 1, 0], np.ones((8, 1), bool), 4)
    a = np.asarray(adv)[:, 0]
    assert a[0] == pytest.approx((2 / 4) / np.std([1, 0, 0, 0]), rel=1e-5) and np.all(a[1:4] < 0)
    np.testing.assert_allclose(a[4:], 0.0, atol=1e-6)  # 3 of 4 solved: pass@2 is 1 either way


# reinforce_pp_baseline re-centres by the batch's token mean after the group baseline, so a
# constant group gets the (shared) shift: it is checked above against the formula instead.
@pytest.mark.parametrize("name", [n for n in GROUP_ESTIMATORS if n != "reinforce_pp_baseline"] +
                         ["grpo_passk", "passk"])
@settings(max_examples=25, deadline=None)
@given(value=st.floats(-3, 3, allow_nan=False, width=32), rewards=rewards_st, lengths=lengths_st)
def test_constant_reward_group_has_zero_advantage(name, value, rewards, lengths):
    rewards = np.asarray(rewards, np.float32)
    rewards[4:] = value  # second group of 4 is constant
    adv, _ = _adv(S(advantage=name), rewards, _mask_from(lengths), 4)
    np.testing.assert_allclose(adv[4:], 0.0, atol=1e-6)


@pytest.mark.parametrize("name", GROUP_ESTIMATORS + ["reinforce_pp", "gae"])
@settings(max_examples=25, deadline=None)
@given(rewards=rewards_st, lengths=lengths_st, perm=st.permutations(range(4)))
def test_permuting_a_group_permutes_its_advantages(name, rewards, lengths, perm):
    rewards = np.asarray(rewards, np.float32)
    mask = _mask_from(lengths)
    values = np.linspace(-1, 1, 40, dtype=np.float32).reshape(8, 5)
    order = np.concatenate([np.asarray(perm), np.arange(4, 8)])
    s = S(advantage=name, group_size=4)
    a, _ = _adv(s, rewards, mask, values=jnp.asarray(values))
    b, _ = _adv(s, rewards[order], mask[order], values=jnp.asarray(values[order]))
    np.testing.assert_allclose(b, a[order], rtol=1e-5, atol=1e-5)
