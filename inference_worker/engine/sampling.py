"""Sampling parameters and the on-device sampler.

Every row (decode slot) carries its own temperature, top-k and top-p, so requests with
different settings share one compiled decode step. Randomness is per request: a row's key is
derived from (request seed, sample index) and folded with the token index, so the same request
with the same weights gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


class SamplingError(ValueError):
    """Invalid sampling parameters; the message names the field."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample completions for one prompt.

    temperature: 0 means greedy. top_k: 0 disables. top_p: 1.0 disables.
    n: completions per prompt (a GRPO group); they share one prefill of the prompt.
    stop_token_ids: ids that end a sequence (EOS); the stop token is kept in the output.
    stop_sequences: token sequences that end a sequence; the matched sequence is kept.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    n: int = 1
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()

    def validate(self, vocab_size: int | None = None) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise SamplingError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise SamplingError(f"top_k must be an int >= 0 (0 disables), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise SamplingError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.n, int) and self.n >= 1):
            raise SamplingError(f"n must be an int >= 1, got {self.n!r}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise SamplingError(f"seed must be a non-negative int, got {self.seed!r}")
        for tok in self.stop_token_ids:
            if not isinstance(tok, int) or tok < 0 or (vocab_size is not None and tok >= vocab_size):
                raise SamplingError(f"stop_token_ids contains {tok!r}, not a token id of this vocab")
        for seq in self.stop_sequences:
            if not seq:
                raise SamplingError("stop_sequences contains an empty sequence")


def request_key(seed: int, sample_index: int) -> jax.Array:
    """The raw uint32[2] key of one completion: independent of batch and slot."""
    return jnp.asarray(request_keys([seed], [sample_index])[0])


def request_keys(seeds, sample_indices) -> np.ndarray:
    """request_key for many completions at once: uint32 [K, 2] (numpy), one device call.

    (Eager per-key jax.random calls cost milliseconds each on the host: dozens per batch.)"""
    seeds = [int(s) for s in seeds]
    lo = np.array([s % 2**32 for s in seeds], np.uint32)
    hi = np.array([s // 2**32 for s in seeds], np.uint32)
    return np.asarray(_request_keys(lo, hi, np.asarray(sample_indices, np.uint32)))


@jax.jit
def _request_keys(lo: jax.Array, hi: jax.Array, index: jax.Array) -> jax.Array:
    def one(lo, hi, index):
        key = jax.random.fold_in(jax.random.PRNGKey(lo), hi)
        return jax.random.key_data(jax.random.fold_in(key, index))

    return jax.vmap(one)(lo, hi, index)


def _argmax(x: jax.Array) -> jax.Array:
    """First index of the row max, as two plain reductions: XLA:CPU runs jnp.argmax's variadic
    (value, index) reduce several times slower."""
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    hit = x == jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(hit, iota, x.shape[-1] - 1), axis=-1)


def sample(
    logits: jax.Array,
    keys: jax.Array,
    step: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Samples one token per row.

    Args:
      logits: [N, V] raw model logits (f32).
      keys: [N, 2] uint32 per-row base keys; step: [N] int32 token index (folded into the key).
      temperature, top_k, top_p: [N] per-row settings.
    Returns:
      (tokens [N] int32, logp [N] under the distribution actually sampled from — 0 for greedy —,
       raw_logp [N] under the untempered, untruncated model distribution).
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    raw_logp_all = jax.nn.log_softmax(logits, axis=-1)
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]

    def truncate(scaled):
        # Sorting is the costly part; it only runs when some row asks for top-k or top-p.
        ordered = -jnp.sort(-scaled, axis=-1)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
        ordered = jnp.where(ordered >= kth, ordered, NEG_INF)
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = mass_before < top_p[:, None]
        threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(scaled >= jnp.maximum(kth, threshold), scaled, NEG_INF)

    needs_truncation = jnp.any((top_k > 0) | (top_p < 1.0))
    masked = jax.lax.cond(needs_truncation, truncate, lambda s: s, scaled)
    logp_all = jax.nn.log_softmax(masked, axis=-1)
    greedy_tokens = _argmax(logits)

    def draw(logp_all):
        # Inverse-CDF sampling: one uniform per row instead of a Gumbel per vocabulary entry (the
        # random bits dominated the step on CPU). Zero-probability entries can never be chosen.
        row_keys = jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(keys, step)
        u = jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(row_keys)
        cdf = jnp.cumsum(jnp.exp(logp_all), axis=-1)
        idx = jnp.sum(cdf < (u * cdf[:, -1])[:, None], axis=-1)
        return jnp.minimum(idx, vocab - 1).astype(jnp.int32)

    sampled = jax.lax.cond(jnp.all(greedy), lambda _: greedy_tokens, draw, logp_all)
    tokens = jnp.where(greedy, greedy_tokens, sampled)
    logp = jnp.take_along_axis(logp_all, tokens[:, None], axis=-1)[:, 0]
    logp = jnp.where(greedy, 0.0, logp)
    raw_logp = jnp.take_along_axis(raw_logp_all, tokens[:, None], axis=-1)[:, 0]
    return tokens, logp, raw_logp
