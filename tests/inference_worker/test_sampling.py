"""The on-device sampler: greedy, temperature, top-k / top-p support, log-probs, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference_worker.engine.sampling import (
    SamplingError,
    SamplingParams,
    derive_keys,
    sample,
    seed_words,
)

_derive = jax.jit(derive_keys)


def request_key(seed: int, sample_index: int) -> jax.Array:
    """One completion's base key, as the engine's insert program derives it."""
    return _derive(*seed_words([seed]), np.asarray([sample_index], np.uint32))[0]


def _sample(logits, temperature, top_k, top_p, keys=None, step=None):
    n = logits.shape[0]
    if keys is None:
        keys = jnp.stack([request_key(7, i) for i in range(n)])
    step = jnp.zeros((n,), jnp.int32) if step is None else step
    return _jit_sample(jnp.asarray(logits, jnp.float32), keys, step, jnp.full((n,), temperature, jnp.float32),
                  jnp.full((n,), top_k, jnp.int32), jnp.full((n,), top_p, jnp.float32))


_jit_sample = jax.jit(sample)
LOGITS = np.log(np.array([[0.5, 0.25, 0.125, 0.0625, 0.0625]], np.float32))


def test_greedy_takes_argmax_with_zero_logp_and_raw_logp():
    tok, logp, raw = _sample(LOGITS, 0.0, 0, 1.0)
    assert int(tok[0]) == 0 and float(logp[0]) == 0.0
    np.testing.assert_allclose(raw[0], np.log(0.5), rtol=1e-6)


def test_top_k_restricts_support_and_renormalizes():
    logits = np.repeat(LOGITS, 400, axis=0)
    keys = jnp.stack([request_key(i, 0) for i in range(400)])
    tok, logp, raw = _sample(logits, 1.0, 2, 1.0, keys=keys)
    assert set(np.asarray(tok).tolist()) == {0, 1}
    expected = np.where(np.asarray(tok) == 0, np.log(2 / 3), np.log(1 / 3))
    np.testing.assert_allclose(logp, expected, rtol=1e-5)
    np.testing.assert_allclose(raw, np.log(np.array([0.5, 0.25])[np.asarray(tok)]), rtol=1e-5)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = np.repeat(LOGITS, 400, axis=0)
    keys = jnp.stack([request_key(i, 1) for i in range(400)])
    tok, logp, _ = _sample(logits, 1.0, 0, 0.7, keys=keys)  # 0.5 < 0.7 <= 0.75: keep {0, 1}
    assert set(np.asarray(tok).tolist()) == {0, 1}
    tok, _, _ = _sample(logits, 1.0, 0, 0.5, keys=keys)  # the first token alone reaches 0.5
    assert set(np.asarray(tok).tolist()) == {0}


def test_temperature_scales_the_sampled_distribution_logp():
    tok, logp, raw = _sample(LOGITS, 2.0, 0, 1.0)
    probs = np.exp(np.asarray(LOGITS[0]) / 2.0)
    probs /= probs.sum()
    np.testing.assert_allclose(logp[0], np.log(probs[int(tok[0])]), rtol=1e-5)


def test_same_key_and_step_give_the_same_token_different_steps_differ():
    logits = np.zeros((1, 1000), np.float32)
    keys = jnp.stack([request_key(3, 0)])
    a = [int(_sample(logits, 1.0, 0, 1.0, keys=keys, step=jnp.array([s]))[0][0]) for s in range(5)]
    b = [int(_sample(logits, 1.0, 0, 1.0, keys=keys, step=jnp.array([s]))[0][0]) for s in range(5)]
    assert a == b and len(set(a)) > 1


def test_rows_are_independent_of_batch_composition():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32)
    keys = jnp.stack([request_key(11, i) for i in range(4)])
    full = _sample(logits, 0.8, 5, 0.9, keys=keys)[0]
    alone = [int(_sample(logits[i : i + 1], 0.8, 5, 0.9, keys=keys[i : i + 1])[0][0]) for i in range(4)]
    assert np.asarray(full).tolist() == alone


@pytest.mark.parametrize(
    "kwargs,field",
    [({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p"),
     ({"max_new_tokens": 0}, "max_new_tokens"), ({"n": 0}, "n"),
     ({"stop_token_ids": (10**9,)}, "stop_token_ids"),
     ({"temperature": float("nan")}, "temperature")],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**{"temperature": 1.0, "max_new_tokens": 8, **kwargs}).validate(vocab_size=100)


def test_request_key_is_deterministic_and_distinct():
    assert np.array_equal(request_key(5, 2), request_key(5, 2))
    assert not np.array_equal(request_key(5, 2), request_key(5, 3))
    assert not np.array_equal(request_key(5, 2), request_key(2**40 + 5, 2))
    assert jax.random.key_data(jax.random.PRNGKey(0)).dtype == np.uint32


def test_sampled_frequencies_match_the_distribution_and_truncated_tokens_never_appear():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1, 40)).astype(np.float32) * 2
    logits[0, 7] = -np.inf  # a masked-out token: probability exactly zero
    n = 20000
    keys = jnp.asarray(rng.integers(0, 2**32, size=(n, 2)), jnp.uint32)
    for temperature, top_k in ((1.0, 0), (0.7, 10)):
        tok, logp, _ = _sample(np.repeat(logits, n, axis=0), temperature, top_k, 1.0, keys=keys)
        scaled = logits[0] / temperature
        if top_k:
            scaled = np.where(scaled >= np.sort(scaled)[-top_k], scaled, -np.inf)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        tok = np.asarray(tok)
        assert probs[tok].min() > 0  # never a zero-probability token
        freq = np.bincount(tok, minlength=40) / n
        assert np.abs(freq - probs).max() < 5 * np.sqrt(probs.max() / n)
        np.testing.assert_allclose(np.asarray(logp), np.log(probs[tok]), rtol=1e-4, atol=1e-5)
