"""Both samplers ('portable': jax.random and jnp; 'cpu': shaped for XLA:CPU) draw from the same
distribution, respect top-k / top-p, never pick a zero-probability token and are reproducible."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference_worker.engine.sampling import SAMPLERS, SamplingError, sample


@functools.cache
def _jit(impl):
    return jax.jit(functools.partial(sample, impl=impl))


def _sample(impl, logits, temperature, top_k=0, top_p=1.0, keys=None, step=None):
    n = logits.shape[0]
    if keys is None:
        keys = jnp.asarray(np.random.default_rng(0).integers(0, 2**32, size=(n, 2)), jnp.uint32)
    step = jnp.zeros((n,), jnp.int32) if step is None else step
    return _jit(impl)(jnp.asarray(logits, jnp.float32), keys, step, jnp.full((n,), temperature, jnp.float32),
                      jnp.full((n,), top_k, jnp.int32), jnp.full((n,), top_p, jnp.float32))


@pytest.mark.parametrize("impl", SAMPLERS)
def test_frequencies_truncation_and_logprobs(impl):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1, 40)).astype(np.float32) * 2
    logits[0, 7] = -np.inf  # probability exactly zero
    n = 20000
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 10, 1.0), (1.0, 0, 0.6)):
        tok, logp, raw = _sample(impl, np.repeat(logits, n, axis=0), temperature, top_k, top_p)
        scaled = logits[0] / temperature
        if top_k:
            scaled = np.where(scaled >= np.sort(scaled)[-top_k], scaled, -np.inf)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if top_p < 1.0:
            order = np.argsort(-probs)
            keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]
            probs = np.where(np.isin(np.arange(40), keep), probs, 0.0)
            probs /= probs.sum()
        tok = np.asarray(tok)
        assert probs[tok].min() > 0  # never a truncated or zero-probability token
        freq = np.bincount(tok, minlength=40) / n
        assert np.abs(freq - probs).max() < 5 * np.sqrt(probs.max() / n)
        np.testing.assert_allclose(np.asarray(logp), np.log(probs[tok]), rtol=1e-4, atol=1e-5)
        full = np.exp(logits[0] - logits[0].max())
        np.testing.assert_allclose(np.asarray(raw), np.log(full[tok] / full.sum()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", SAMPLERS)
def test_greedy_and_reproducibility(impl):
    logits = np.random.default_rng(0).normal(size=(6, 300)).astype(np.float32)
    logits[2, [5, 9]] = 50.0  # a tie: the first index wins
    tok, logp, _ = _sample(impl, logits, 0.0)
    assert np.asarray(tok).tolist() == np.argmax(logits, axis=-1).tolist() and np.all(np.asarray(logp) == 0)
    a = [np.asarray(_sample(impl, logits, 1.0, step=jnp.full((6,), s))[0]) for s in range(3)]
    b = [np.asarray(_sample(impl, logits, 1.0, step=jnp.full((6,), s))[0]) for s in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(a[0], x) for x in a[1:])  # the step is folded into the key
    keys = jnp.asarray(np.random.default_rng(1).integers(0, 2**32, size=(6, 2)), jnp.uint32)
    together = np.asarray(_sample(impl, logits, 0.9, 5, 0.9, keys=keys)[0])
    alone = [int(_sample(impl, logits[i:i + 1], 0.9, 5, 0.9, keys=keys[i:i + 1])[0][0]) for i in range(6)]
    assert together.tolist() == alone  # a row's draw depends on its key and step only


def test_unknown_sampler_is_refused():
    with pytest.raises(SamplingError, match="sampler"):
        sample(jnp.zeros((1, 4)), jnp.zeros((1, 2), jnp.uint32), jnp.zeros((1,), jnp.int32), jnp.ones((1,)),
               jnp.zeros((1,), jnp.int32), jnp.ones((1,)), impl="gpu")
