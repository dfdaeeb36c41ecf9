"""The generation engine: a fixed set of decode slots fed by continuous batching.

Host side, per iteration: (1) while slots are free and requests wait, prefill a batch of
prompts (bucketed in batch and length, so shapes repeat and nothing recompiles after warm-up)
and insert each prompt's n samples into free slots, sharing one prefill; (2) run a chunk of
decode steps on device for all slots; (3) read the new tokens back once, apply stop rules,
and free finished slots so the next waiting request takes them at once.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from inference_worker.engine import fast_model, steps
from inference_worker.engine.sampling import SamplingError, SamplingParams, seed_words
from inference_worker.engine.state import MAX_STOP_IDS, init_state, state_shardings

log = logging.getLogger(__name__)

FINISH_REASONS = ("eos", "stop", "length", "cache", "error")


class EngineError(ValueError):
    """A request the engine cannot serve (the message says which and why)."""


@dataclasses.dataclass
class Completion:
    """One sampled completion.

    tokens: the new tokens only. logprobs: each token's log-prob under the distribution it was
    sampled from (temperature, top-k/top-p applied; 0.0 for greedy). raw_logprobs: under the
    raw model (temperature 1, no truncation). finish_reason: 'eos' (a stop token id), 'stop'
    (a stop sequence), 'length' (max_new_tokens), 'cache' (the KV cache is full) or 'error'.
    """

    tokens: list[int]
    logprobs: list[float]
    raw_logprobs: list[float]
    finish_reason: str
    error: str | None = None


@dataclasses.dataclass
class _Slot:
    request: int
    sample: int
    prompt_len: int
    params: SamplingParams
    completion: Completion


def _buckets(limit: int, start: int) -> list[int]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    out.append(limit)
    return out


def _bucket(value: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if value <= b:
            return b
    raise AssertionError(f"{value} exceeds the largest bucket {buckets[-1]}")


class Engine:
    """Batched generation over a model with a KV cache.

    Args:
      model: an nnx Transformer (see rlax_tpu.models) providing prefill/decode/logits.
      model_cfg: its ModelConfig.
      max_batch: decode slots (concurrent sequences).
      max_seq_len: cache length per slot; prompt + completion must fit.
      max_prefill_batch: prompts prefilled together at most.
      decode_chunk: decode steps per device call while requests wait for a slot (a freed slot
        is refilled after at most this many steps).
      max_decode_chunk: decode steps per device call when nothing waits: the chunk grows (in
        doublings of decode_chunk, each its own compiled loop) to cover the longest remaining
        budget, so a batch finishes in fewer host round trips. The loop exits early once every
        slot has stopped, so a long chunk wastes no steps.
      mesh: optional mesh; the cache is split over kv heads on its 'tensor' axis and the slots
        over its 'data' and 'fsdp' axes (max_batch must divide by their product). Params should
        already be placed (e.g. pulled with the inference sharding rules).

    Roles build it with ``Engine.from_config(config.inference, model, model_cfg, mesh)``; the
    sizes have no defaults here (config.inference holds them), min_prefill_len (the shortest
    prefill bucket) is internal.
    """

    def __init__(
        self,
        model,
        model_cfg,
        *,
        max_batch: int,
        max_seq_len: int,
        max_prefill_batch: int,
        decode_chunk: int,
        max_decode_chunk: int,
        min_prefill_len: int = 16,
        mesh: jax.sharding.Mesh | None = None,
    ):
        if max_batch < 1 or max_seq_len < 2 or decode_chunk < 1 or max_prefill_batch < 1 or max_decode_chunk < 1:
            raise EngineError(
                f"max_batch={max_batch}, max_seq_len={max_seq_len}, max_prefill_batch="
                f"{max_prefill_batch}, decode_chunk={decode_chunk} and max_decode_chunk={max_decode_chunk} "
                "must be positive (max_seq_len >= 2)")
        shards = 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        if max_batch % shards:
            raise EngineError(f"max_batch={max_batch} must divide by the mesh's data x fsdp = {shards} "
                              f"({dict(mesh.shape)})")
        self.model_cfg = model_cfg
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.decode_chunk = decode_chunk
        self._chunk_buckets = _buckets(max(decode_chunk, max_decode_chunk), decode_chunk)
        self.mesh = mesh
        self._graphdef, self._params = nnx.split(model)
        self._build_weights = jax.jit(
            functools.partial(fast_model.build_weights, self._graphdef, cfg=model_cfg),
            out_shardings=fast_model.weight_shardings(model_cfg, mesh))
        self._weights = self._build_weights(self._params)
        self._len_buckets = _buckets(max_seq_len, min(min_prefill_len, max_seq_len))
        self._batch_buckets = _buckets(max_prefill_batch, 1)
        self._insert_buckets = _buckets(max_batch, 1)
        state = init_state(fast_model.init_cache(model_cfg, max_batch, max_seq_len), max_batch)
        shardings = state_shardings(state, mesh, model_cfg.num_kv_heads)
        if shardings is not None:
            state = jax.device_put(state, shardings)
        self._state = state
        self._slot_sharding = shardings.tokens if shardings is not None else None
        self._prefill, self._insert, self._decode = steps.compile_steps(model_cfg, shardings)
        self._slots: list[_Slot | None] = [None] * max_batch
        self._keep: tuple = ((), None)  # (host tuple, device array) of the last decode's keep mask
        self.stats = collections.Counter()

    @classmethod
    def from_config(cls, inference, model, model_cfg, mesh: jax.sharding.Mesh | None = None) -> Engine:
        """The engine every role uses, sized by the ``config.inference`` section. A mesh of one
        device is treated as none."""
        return cls(model, model_cfg, max_batch=inference.max_batch, max_seq_len=inference.max_seq_len,
                   max_prefill_batch=inference.max_prefill_batch, decode_chunk=inference.decode_chunk,
                   max_decode_chunk=inference.max_decode_chunk,
                   mesh=mesh if mesh is not None and mesh.size > 1 else None)

    # ----------------------------------------------------------------------------- weights
    @property
    def params(self):
        return self._params

    def update_params(self, params) -> None:
        """Swaps in new weights (same shapes and dtypes: no recompile). Accepts an nnx.State or
        the pure-dict form of one (as pulled from the param server)."""
        if not isinstance(params, nnx.State):
            new = jax.tree.map(lambda x: x, self._params)
            nnx.replace_by_pure_dict(new, params)
            params = new
        old_leaves = jax.tree_util.tree_leaves_with_path(self._params)
        new_leaves = jax.tree_util.tree_leaves(params)
        if len(old_leaves) != len(new_leaves):
            raise EngineError(f"new params have {len(new_leaves)} leaves, the engine has {len(old_leaves)}")
        for (path, old), new in zip(old_leaves, new_leaves, strict=True):
            if old.shape != new.shape or old.dtype != new.dtype:
                raise EngineError(
                    f"param {jax.tree_util.keystr(path)}: new {new.shape} {new.dtype} does not match "
                    f"{old.shape} {old.dtype}")
        self._params = params
        self._weights = self._build_weights(params)
        self.stats["weight_updates"] += 1

    # ------------------------------------------------------------------------- requests
    def check_request(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raises EngineError / SamplingError if the request can never be served."""
        params.validate(self.model_cfg.vocab_size)
        if len(prompt) == 0:
            raise EngineError("empty prompt: at least one token is needed")
        if len(prompt) >= self.max_seq_len:
            raise EngineError(
                f"prompt of {len(prompt)} tokens does not fit the KV cache of max_seq_len="
                f"{self.max_seq_len} (at least one generated token must fit)")
        arr = np.asarray(prompt)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise EngineError("prompt must be a flat list of int token ids")
        if arr.min() < 0 or arr.max() >= self.model_cfg.vocab_size:
            raise EngineError(f"prompt has token ids outside [0, {self.model_cfg.vocab_size})")

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
    ) -> list[list[Completion]]:
        """Generates ``params.n`` completions for each prompt.

        A request that cannot be served (empty prompt, prompt longer than the cache, invalid
        sampling params) gets n completions with finish_reason 'error' and the reason in
        ``.error``; the other requests are served normally.
        """
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise EngineError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        results: list[list[Completion | None]] = []
        queue: collections.deque = collections.deque()
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            try:
                self.check_request(prompt, p)
            except (EngineError, SamplingError) as e:
                log.warning("request %d rejected: %s", i, e)
                n = p.n if isinstance(p.n, int) and p.n > 0 else 1
                results.append([Completion([], [], [], "error", str(e)) for _ in range(n)])
                self.stats["rejected_requests"] += 1
                continue
            results.append([None] * p.n)
            # Groups larger than the slot count are served in parts; each part shares a prefill.
            for start in range(0, p.n, self.max_batch):
                queue.append((i, list(map(int, prompt)), p, start, min(p.n, start + self.max_batch)))
        t0 = time.perf_counter()
        while queue or any(s is not None for s in self._slots):
            self._admit(queue)
            self._decode_chunk(results, waiting=bool(queue))
        self.stats["generate_seconds"] += time.perf_counter() - t0
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------------- internals
    def _admit(self, queue: collections.deque) -> None:
        """Prefills waiting requests into free slots (continuous batching)."""
        while queue:
            free = self._free_slots()
            batch, need = [], 0
            while queue and len(batch) < self._batch_buckets[-1]:
                count = queue[0][4] - queue[0][3]
                if need + count > len(free):
                    break
                batch.append(queue.popleft())
                need += count
            if not batch:
                return
            self._prefill_insert(batch, free)

    def _free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self._slots) if s is None]

    def _prefill_insert(self, batch, free: list[int]) -> None:
        """One prefill of the batch's prompts; each prompt's samples go into free slots and share
        its prefill row."""
        nrows = _bucket(len(batch), self._batch_buckets)
        k = _bucket(sum(b[4] - b[3] for b in batch), self._insert_buckets)
        plen = _bucket(max(len(b[1]) for b in batch), self._len_buckets)
        tokens = np.zeros((nrows, plen), np.int32)
        lengths = np.ones((nrows,), np.int32)
        src = np.zeros((k,), np.int32)
        dst = np.full((k,), self.max_batch, np.int32)  # a slot past the end: dropped by the scatter
        prompt_lens = np.zeros((k,), np.int32)
        budget = np.zeros((k,), np.int32)
        temp = np.ones((k,), np.float32)
        top_k = np.zeros((k,), np.int32)
        top_p = np.ones((k,), np.float32)
        stop_ids = np.full((k, MAX_STOP_IDS), -1, np.int32)
        seeds = np.zeros((k,), np.int64)
        sample_ids = np.zeros((k,), np.uint32)
        slots = iter(free)
        j = 0
        for row, (req, prompt, p, start, stop) in enumerate(batch):
            tokens[row, : len(prompt)] = prompt
            lengths[row] = len(prompt)
            for sample_idx in range(start, stop):
                slot = next(slots)
                src[j], dst[j], prompt_lens[j] = row, slot, len(prompt)
                # Tokens after the first: bounded by max_new_tokens and by the cache capacity.
                budget[j] = min(p.max_new_tokens, self.max_seq_len - len(prompt)) - 1
                temp[j], top_k[j], top_p[j] = p.temperature, p.top_k, p.top_p
                ids = list(p.stop_token_ids)[:MAX_STOP_IDS]
                stop_ids[j, : len(ids)] = ids
                seeds[j], sample_ids[j] = p.seed, sample_idx
                if self.stats["slot_uses"] >= self.max_batch:
                    self.stats["slot_refills"] += 1
                self.stats["slot_uses"] += 1
                self._slots[slot] = _Slot(req, sample_idx, len(prompt), p, Completion([], [], [], ""))
                j += 1
        # The RNG keys are derived on device, in the insert (padding entries: seed 0, never used).
        seed_lo, seed_hi = seed_words(seeds)
        logits, kv = self._prefill(self._weights, tokens, lengths)
        self._state, first, logp, raw = self._insert(
            self._state, kv, logits, src, dst, prompt_lens, budget, seed_lo, seed_hi, sample_ids, temp, top_k,
            top_p, stop_ids)
        self.stats["prefill_calls"] += 1
        self.stats["prefill_tokens"] += int(sum(len(b[1]) for b in batch))
        first, logp, raw = jax.device_get((first, logp, raw))
        for i in range(j):
            self._append(int(dst[i]), first[i: i + 1], logp[i: i + 1], raw[i: i + 1])

    def _chunk_steps(self, waiting: bool) -> int:
        """Steps for the next decode call: decode_chunk while requests wait for a slot, else
        enough (bucketed) for the longest remaining budget."""
        if waiting:
            return self.decode_chunk
        need = max(min(s.params.max_new_tokens, self.max_seq_len - s.prompt_len) - len(s.completion.tokens)
                   for s in self._slots if s is not None)
        return _bucket(min(need, self._chunk_buckets[-1]), self._chunk_buckets)

    def _decode_chunk(self, results, waiting: bool = False) -> None:
        self._finish_done(results)
        if all(s is None for s in self._slots):
            return
        keep = tuple(s is not None for s in self._slots)
        if keep != self._keep[0]:  # a host->device transfer only when the slot set changed
            self._keep = (keep, jax.device_put(np.asarray(keep), self._slot_sharding))
        keep = self._keep[1]
        self._state, toks, logp, raw, valid, steps_run = self._decode(
            self._weights, self._state, keep, num_steps=self._chunk_steps(waiting))
        toks, logp, raw, valid, steps_run = jax.device_get((toks, logp, raw, valid, steps_run))
        self.stats["decode_calls"] += 1
        self.stats["decode_steps"] += int(steps_run)
        # A slot's valid steps are a prefix of the chunk (a slot only ever stops within it).
        counts = valid.sum(axis=0)
        toks, logp, raw = toks.T, logp.T, raw.T
        for slot, s in enumerate(self._slots):
            if s is None:
                continue
            n = counts[slot]
            if n:
                self._append(slot, toks[slot, :n], logp[slot, :n], raw[slot, :n])
            elif not s.completion.finish_reason:
                # The device stopped a slot the host rules did not: a bug, never a silent hang.
                raise RuntimeError(f"slot {slot} stalled without a finish reason: {s}")
        self._finish_done(results)

    def _append(self, slot: int, tokens: np.ndarray, logps: np.ndarray, raws: np.ndarray) -> None:
        """Appends a slot's new tokens up to the first stop rule that fires (vectorized: the
        per-token Python loop was a visible share of a small model's step)."""
        s = self._slots[slot]
        c, p = s.completion, s.params
        if c.finish_reason:
            return
        before = len(c.tokens)
        cut, reason = len(tokens), ""
        to_length = p.max_new_tokens - before
        to_cache = self.max_seq_len - s.prompt_len - before
        if min(to_length, to_cache) <= cut:
            cut, reason = min(to_length, to_cache), "length" if to_length <= to_cache else "cache"
        if p.stop_token_ids:
            hits = np.flatnonzero(np.isin(tokens[:cut], p.stop_token_ids))
            if hits.size:
                cut, reason = int(hits[0]) + 1, "eos"
        if p.stop_sequences:
            longest = max(len(seq) for seq in p.stop_sequences)
            context = len(c.tokens[-(longest - 1):]) if longest > 1 else 0
            seen = (c.tokens[-(longest - 1):] if longest > 1 else []) + tokens[:cut].tolist()
            for i in range(context, len(seen)):  # the earliest match; eos wins at the same token
                if any(i + 1 >= len(q) and tuple(seen[i + 1 - len(q): i + 1]) == tuple(q)
                       for q in p.stop_sequences):
                    n = i + 1 - context
                    if n < cut or reason != "eos":
                        cut, reason = n, "stop"
                    break
        c.tokens.extend(tokens[:cut].tolist())
        c.logprobs.extend(logps[:cut].tolist())
        c.raw_logprobs.extend(raws[:cut].tolist())
        self.stats["tokens_generated"] += cut
        c.finish_reason = reason

    def _finish_done(self, results) -> None:
        for slot, s in enumerate(self._slots):
            if s is not None and s.completion.finish_reason:
                results[s.request][s.sample] = s.completion
                self._slots[slot] = None
