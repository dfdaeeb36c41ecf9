"""The sampler's two-level inverse-CDF pick (block, then entry), top-p frequencies and greedy ties."""

import jax
import jax.numpy as jnp
import numpy as np

from inference_worker.engine.sampling import _two_level_pick, sample

_pick = jax.jit(_two_level_pick)
_sample = jax.jit(sample)


def test_two_level_pick_is_the_inverse_cdf_and_never_picks_zero_mass():
    rng = np.random.default_rng(0)
    v = 300  # blocks of 128: two full, one partial (padded)
    e = rng.random((5, v)).astype(np.float32)
    e[1, :256] = 0.0  # all mass in the partial last block
    e[2, 100:200] = 0.0  # an empty stretch across a block boundary
    e[3] = 0.0
    e[3, [0, 127, 128, 299]] = 1.0  # entries on block edges
    e[4, 5] = 1.0
    e[4, 6:] = 0.0
    e[4, :5] = 0.0
    for u in (0.0, 1e-7, 0.25, 0.5, 0.75, 0.999999, 1.0 - 2**-24):
        got, total = _pick(jnp.asarray(e), jnp.full((5,), u, jnp.float32))
        cdf = np.cumsum(e.astype(np.float64), axis=-1)
        np.testing.assert_allclose(total, cdf[:, -1], rtol=1e-5)
        for row in range(5):
            tok = int(got[row])
            assert e[row, tok] > 0, (row, u, tok)
            want = int(np.flatnonzero((e[row] > 0) & (cdf[row] >= u * cdf[row, -1]))[0])
            # Rounding may move a pick by one entry with mass near a CDF step, never further.
            assert abs(np.searchsorted(np.flatnonzero(e[row] > 0), tok) -
                       np.searchsorted(np.flatnonzero(e[row] > 0), want)) <= 1, (row, u, tok, want)


def _run(logits, temperature, top_k=0, top_p=1.0, keys=None):
    n = logits.shape[0]
    if keys is None:
        keys = jnp.asarray(np.random.default_rng(0).integers(0, 2**32, size=(n, 2)), jnp.uint32)
    return _sample(jnp.asarray(logits, jnp.float32), keys, jnp.zeros((n,), jnp.int32),
                   jnp.full((n,), temperature, jnp.float32), jnp.full((n,), top_k, jnp.int32),
                   jnp.full((n,), top_p, jnp.float32))


def test_top_p_frequencies_and_logprobs():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1, 300)).astype(np.float32) * 2
    n, top_p = 20000, 0.6
    tok, logp, raw = _run(np.repeat(logits, n, axis=0), 1.0, 0, top_p)
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]
    kept = np.where(np.isin(np.arange(300), keep), probs, 0.0)
    kept /= kept.sum()
    tok = np.asarray(tok)
    assert kept[tok].min() > 0  # never a truncated token
    freq = np.bincount(tok, minlength=300) / n
    assert np.abs(freq - kept).max() < 5 * np.sqrt(kept.max() / n)
    np.testing.assert_allclose(np.asarray(logp), np.log(kept[tok]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(raw), np.log(probs[tok]), rtol=1e-4, atol=1e-5)


def test_greedy_takes_the_first_of_tied_maxima_beside_sampled_rows():
    logits = np.random.default_rng(0).normal(size=(4, 300)).astype(np.float32)
    logits[2, [5, 9]] = 50.0
    temps = jnp.asarray([0.0, 1.0, 0.0, 1.0], jnp.float32)
    keys = jnp.asarray(np.random.default_rng(1).integers(0, 2**32, size=(4, 2)), jnp.uint32)
    tok, logp, _ = _sample(jnp.asarray(logits), keys, jnp.zeros((4,), jnp.int32), temps,
                           jnp.zeros((4,), jnp.int32), jnp.ones((4,), jnp.float32))
    assert int(tok[0]) == int(np.argmax(logits[0])) and int(tok[2]) == 5
    assert float(logp[0]) == 0.0 and float(logp[2]) == 0.0 and float(logp[1]) < 0.0
