"""Host-side records of the engine: requests, their sequences, completions, stop rules and the
checks that refuse a request (or weights) the engine cannot serve."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from inference_worker.engine.pages import PageAllocator, pages_for
from inference_worker.engine.sampling import SamplingParams

FINISH_REASONS = ("eos", "stop", "length", "cache", "error")


class EngineError(ValueError):
    """A request the engine cannot serve (the message says which and why)."""


def check_same_params(old_params, new_params) -> None:
    """Raises EngineError unless the new weights have the engine's shapes and dtypes."""
    old_leaves = jax.tree_util.tree_leaves_with_path(old_params)
    new_leaves = jax.tree_util.tree_leaves(new_params)
    if len(old_leaves) != len(new_leaves):
        raise EngineError(f"new params have {len(new_leaves)} leaves, the engine has {len(old_leaves)}")
    for (path, old), new in zip(old_leaves, new_leaves, strict=True):
        if old.shape != new.shape or old.dtype != new.dtype:
            raise EngineError(f"param {jax.tree_util.keystr(path)}: new {new.shape} {new.dtype} does not match "
                              f"{old.shape} {old.dtype}")


def check_tokens(tokens: Sequence[int], what: str, vocab_size: int) -> None:
    arr = np.asarray(tokens)
    if len(tokens) and (arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer)):
        raise EngineError(f"{what} must be a flat list of int token ids")
    if len(tokens) and (arr.min() < 0 or arr.max() >= vocab_size):
        raise EngineError(f"{what} has token ids outside [0, {vocab_size})")


def check_fits(context_len: int, params: SamplingParams, max_seq_len: int, page_size: int,
               allocator: PageAllocator) -> None:
    """Raises EngineError if a sequence of this context can never be served: no room for one
    generated token, or more pages than the whole pool for its longest possible length."""
    if context_len >= max_seq_len:
        raise EngineError(f"prompt of {context_len} tokens does not fit the KV cache of max_seq_len={max_seq_len} "
                          "(at least one generated token must fit)")
    positions = min(context_len + params.max_new_tokens, max_seq_len) - 1
    need = pages_for(positions, page_size)
    if need > allocator.usable:
        raise EngineError(f"a sequence of {positions} cached positions needs {need} KV pages of page_size="
                          f"{page_size}; the pool has num_pages={allocator.num_pages} ({allocator.usable} usable)")


@dataclasses.dataclass
class Completion:
    """One sampled completion.

    tokens: the new tokens only. logprobs: each token's log-prob under the distribution it was
    sampled from (temperature, top-k/top-p applied; 0.0 for greedy). raw_logprobs: under the
    raw model (temperature 1, no truncation). finish_reason: 'eos' (a stop token id), 'stop'
    (a stop sequence), 'length' (max_new_tokens), 'cache' (the sequence reached max_seq_len) or
    'error'.
    """

    tokens: list[int]
    logprobs: list[float]
    raw_logprobs: list[float]
    finish_reason: str
    error: str | None = None


@dataclasses.dataclass
class Seq:
    """One sample's sequence: its context (every token before this request's generation), its
    page table and its completion so far. ``cached`` positions have K/V in the pages: the
    context and every generated token but the last (which the next step feeds)."""

    request: int
    sample: int
    context: list[int]
    params: SamplingParams
    pages: list[int]
    completion: Completion
    slot: int | None = None

    @property
    def context_len(self) -> int:
        return len(self.context)

    @property
    def cached(self) -> int:
        return self.context_len + max(len(self.completion.tokens) - 1, 0)

    def tokens(self) -> list[int]:
        """The whole sequence: context and completion."""
        return self.context + self.completion.tokens


@dataclasses.dataclass
class Request:
    """A submitted request: n samples of one context. ``base`` is the retained sequence it
    continues (its pages hold the context's first ``base.cached`` positions), else None."""

    id: int
    context: list[int]
    params: SamplingParams
    base: Seq | None
    retain: bool = False
    results: list[Completion | None] = dataclasses.field(default_factory=list)


def buckets(limit: int, start: int) -> list[int]:
    """start, 2 start, 4 start, ... below limit, then limit."""
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    out.append(limit)
    return out


def bucket(value: int, options: Sequence[int]) -> int:
    for b in options:
        if value <= b:
            return b
    raise AssertionError(f"{value} exceeds the largest bucket {options[-1]}")


def append_tokens(seq: Seq, tokens: np.ndarray, logps: np.ndarray, raws: np.ndarray, max_seq_len: int) -> int:
    """Appends new tokens to a sequence's completion up to the first stop rule that fires
    (vectorized: a per-token Python loop was a visible share of a small model's step). Sets
    ``finish_reason`` when one fires; returns the number of tokens kept."""
    c, p = seq.completion, seq.params
    if c.finish_reason:
        return 0
    before = len(c.tokens)
    cut, reason = len(tokens), ""
    to_length = p.max_new_tokens - before
    to_cache = max_seq_len - seq.context_len - before
    if min(to_length, to_cache) <= cut:
        cut, reason = min(to_length, to_cache), "length" if to_length <= to_cache else "cache"
    if p.stop_token_ids:
        hits = np.flatnonzero(np.isin(tokens[:cut], p.stop_token_ids))
        if hits.size:
            cut, reason = int(hits[0]) + 1, "eos"
    if p.stop_sequences:
        longest = max(len(q) for q in p.stop_sequences)
        context = len(c.tokens[-(longest - 1):]) if longest > 1 else 0
        seen = (c.tokens[-(longest - 1):] if longest > 1 else []) + tokens[:cut].tolist()
        for i in range(context, len(seen)):  # the earliest match; eos wins at the same token
            if any(i + 1 >= len(q) and tuple(seen[i + 1 - len(q): i + 1]) == tuple(q) for q in p.stop_sequences):
                n = i + 1 - context
                if n < cut or reason != "eos":
                    cut, reason = n, "stop"
                break
    c.tokens.extend(tokens[:cut].tolist())
    c.logprobs.extend(logps[:cut].tolist())
    c.raw_logprobs.extend(raws[:cut].tolist())
    c.finish_reason = reason
    return cut
