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


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample completions for one prompt.

    temperature: 0 means greedy. top_k: 0 disables. top_p: 1.0 disables.
    n: completions per prompt (a GRPO group); they share one prefill of the prompt.
    stop_token_ids: ids that end a sequence (EOS); the stop token is kept in the output.
    stop_sequences: token sequences that end a sequence; the matched sequence is kept.
    """

    # No defaults for the choices config.inference / config.eval make (roles pass theirs);
    # top_k and top_p default to off.
    temperature: float
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int
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


def seed_words(seeds) -> tuple[np.ndarray, np.ndarray]:
    """64-bit request seeds as (low, high) uint32 words, the form derive_keys takes."""
    seeds = [int(s) for s in seeds]
    return (np.array([s % 2**32 for s in seeds], np.uint32), np.array([s // 2**32 for s in seeds], np.uint32))


def derive_keys(lo: jax.Array, hi: jax.Array, index: jax.Array) -> jax.Array:
    """Per-completion base keys [K, 2] from seed words and sample indices (traceable: the engine
    derives them inside its insert program, with no separate device call per batch; eager
    per-key jax.random calls would cost milliseconds each on the host)."""
    def one(lo, hi, index):
        key = jax.random.fold_in(jax.random.PRNGKey(lo), hi)
        return jax.random.key_data(jax.random.fold_in(key, index))

    return jax.vmap(one)(lo, hi, index)


def _uniform(keys: jax.Array, counter: jax.Array) -> jax.Array:
    """One uniform in [0, 1) per row: jax.random's, from the row's key folded with its counter."""
    return jax.vmap(lambda k, c: jax.random.uniform(jax.random.fold_in(k, c)))(keys, counter.astype(jnp.uint32))


def _first_reaching(e: jax.Array, cdf: jax.Array, target: jax.Array) -> jax.Array:
    """The first entry with mass whose CDF reaches the target [N, 1]. Asking for mass (not just
    counting CDF entries below the target) keeps a rounding wobble of the CDF from ever landing on
    a zero-probability entry; the last entry with mass catches u -> 1."""
    iota = jax.lax.broadcasted_iota(jnp.int32, e.shape, e.ndim - 1)
    first = jnp.min(jnp.where((e > 0) & (cdf >= target), iota, e.shape[-1]), axis=-1)
    last = jnp.max(jnp.where(e > 0, iota, 0), axis=-1)
    return jnp.minimum(first, last)


_PICK_BLOCK = 128


def _two_level_pick(e: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse-CDF pick of one entry per row of unnormalized masses e [N, V] at uniform u [N], in
    two levels: the CDF of block sums picks a block, then the CDF inside that block picks the
    entry. Two short cumsums instead of one over the whole vocabulary (a long jnp.cumsum is a
    slow reduce-window on XLA:CPU; this form is cheap everywhere). Returns (index, total mass)."""
    n, v = e.shape
    nb = -(-v // _PICK_BLOCK)
    blocks = jnp.pad(e, ((0, 0), (0, nb * _PICK_BLOCK - v))).reshape(n, nb, _PICK_BLOCK)
    mass = jnp.sum(blocks, axis=-1)
    block_cdf = jnp.cumsum(mass, axis=-1)
    total = block_cdf[:, -1]
    target = u * total
    b = _first_reaching(mass, block_cdf, target[:, None])
    inside = jnp.take_along_axis(blocks, b[:, None, None], axis=1)[:, 0]  # [N, block]
    before = jnp.take_along_axis(block_cdf - mass, b[:, None], axis=1)
    j = _first_reaching(inside, jnp.cumsum(inside, axis=-1), target[:, None] - before)
    return b * _PICK_BLOCK + j, total


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
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    raw_lse = row_max[:, 0] + jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=-1))
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
    # Only computed when some row is greedy (an all-sampled batch skips the reduction).
    greedy_tokens = jax.lax.cond(jnp.any(greedy), lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32),
                                 lambda x: jnp.zeros(x.shape[:1], jnp.int32), logits)

    def draw(masked):
        # Inverse-CDF sampling: one uniform per row instead of a Gumbel per vocabulary entry (the
        # random bits dominated the step on CPU). Zero-probability entries can never be chosen.
        # The CDF's last entry is the softmax normalizer, so no separate log-softmax pass.
        m = jnp.max(masked, axis=-1, keepdims=True)
        e = jnp.exp(masked - m)
        token, total = _two_level_pick(e, _uniform(keys, step))
        return token, m[:, 0] + jnp.log(total)

    sampled, lse = jax.lax.cond(jnp.all(greedy), lambda _: (greedy_tokens, jnp.zeros_like(raw_lse)),
                                draw, masked)
    tokens = jnp.where(greedy, greedy_tokens, sampled)
    logp = jnp.where(greedy, 0.0, jnp.take_along_axis(masked, tokens[:, None], axis=-1)[:, 0] - lse)
    raw_logp = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - raw_lse
    return tokens, logp, raw_logp
