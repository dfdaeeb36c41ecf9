"""The generation engine: continuous batching over decode slots on a paged KV cache.

The API is a loop: ``submit`` requests, call ``step`` (one admission + decode iteration) until
nothing is left, ``take_finished``. ``retain`` keeps a finished sequence's pages so ``extend``
can continue it with new tokens (the next turn of an episode prefills only what is new);
``generate`` is that loop for a batch of prompts.

Host side, per step: (1) while slots are free, pages suffice and requests wait, prefill a batch of
them into pages (bucketed in batch and length, so shapes repeat) and start each request's n
samples in free slots; the samples share the prompt's full pages, the partly filled last page is
copied per sample; (2) give every running sequence the pages the next chunk writes (preempting
the newest sequence, which is requeued, when the pool runs short); (3) run a chunk of decode steps
on device, read the new tokens back once, apply stop rules and free finished sequences.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from inference_worker.engine import fast_model, steps
from inference_worker.engine.pages import PageAllocator, pages_for
from inference_worker.engine.sampling import SamplingError, SamplingParams, seed_words
from inference_worker.engine.sequences import (
    FINISH_REASONS,
    Completion,
    EngineError,
    Request,
    Seq,
    append_tokens,
    bucket,
    buckets,
    check_fits,
    check_same_params,
    check_tokens,
)
from inference_worker.engine.state import MAX_STOP_IDS, init_state, state_shardings

log = logging.getLogger(__name__)

__all__ = ["FINISH_REASONS", "Completion", "Engine", "EngineError"]



class Engine:
    """Batched generation over a model with a paged KV cache.

    Args:
      model: an nnx Transformer (see rlax_tpu.models).
      model_cfg: its ModelConfig.
      max_batch: decode slots (concurrent sequences).
      max_seq_len: longest sequence (context + completion).
      max_prefill_batch: requests prefilled together at most.
      decode_chunk: decode steps per device call while requests wait for a slot (a freed slot
        is refilled after at most this many steps).
      max_decode_chunk: decode steps per device call when nothing waits: the chunk grows (in
        doublings of decode_chunk, each its own compiled loop) to cover the longest remaining
        budget. The loop exits early once every slot has stopped, so a long chunk wastes no steps.
      page_size: positions per KV page.
      num_pages: pages in the pool, the null page included; 0 sizes it for every slot at
        max_seq_len (max_batch * ceil(max_seq_len / page_size) + 1).
      mesh: optional mesh; the page pools are split over kv heads on its 'tensor' axis and the
        slots over its 'data' and 'fsdp' axes (max_batch must divide by their product). Params
        should already be placed (e.g. pulled with the inference sharding rules).

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
        page_size: int,
        num_pages: int,
        mesh: jax.sharding.Mesh | None = None,
    ):
        if (max_batch < 1 or max_seq_len < 2 or decode_chunk < 1 or max_prefill_batch < 1 or max_decode_chunk < 1
                or page_size < 1 or num_pages < 0):
            raise EngineError(
                f"max_batch={max_batch}, max_seq_len={max_seq_len}, max_prefill_batch="
                f"{max_prefill_batch}, decode_chunk={decode_chunk}, max_decode_chunk={max_decode_chunk} and "
                f"page_size={page_size} must be positive (max_seq_len >= 2), num_pages={num_pages} >= 0")
        shards = 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        if max_batch % shards:
            raise EngineError(f"max_batch={max_batch} must divide by the mesh's data x fsdp = {shards} "
                              f"({dict(mesh.shape)})")
        self.model_cfg = model_cfg
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.decode_chunk = decode_chunk
        self.max_prefill_batch = max_prefill_batch
        self.page_size = page_size
        self.pages_per_seq = pages_for(max_seq_len, page_size)
        num_pages = num_pages or max_batch * self.pages_per_seq + 1
        if num_pages < 2:
            raise EngineError(f"num_pages={num_pages}: at least 2 (page 0 is the reserved null page)")
        self.allocator = PageAllocator(num_pages)
        self._chunk_buckets = buckets(max(decode_chunk, max_decode_chunk), decode_chunk)
        # Page-table widths (pages read per sequence) repeat in doublings: attention reads only
        # about the pages the longest live sequence uses, at a few compiled shapes.
        self._width_buckets = buckets(self.pages_per_seq, min(self.pages_per_seq, pages_for(64, page_size)))
        self._len_buckets = buckets(max_seq_len, min(min_prefill_len, max_seq_len))
        self._batch_buckets = buckets(max_prefill_batch, 1)
        self._insert_buckets = buckets(max_batch, 1)
        self.mesh = mesh
        self._graphdef, self._params = nnx.split(model)
        self._build_weights = jax.jit(
            functools.partial(fast_model.build_weights, self._graphdef, cfg=model_cfg),
            out_shardings=fast_model.weight_shardings(model_cfg, mesh))
        self._weights = self._build_weights(self._params)
        state = init_state(fast_model.init_cache(model_cfg, num_pages, page_size), max_batch)
        shardings = state_shardings(state, mesh, model_cfg.num_kv_heads)
        if shardings is not None:
            state = jax.device_put(state, shardings)
        self._state = state
        self._slot_sharding = shardings.tokens if shardings is not None else None
        self._prefill_fn, self._start, self._decode = steps.compile_steps(model_cfg, shardings, mesh)
        self._slots: list[Seq | None] = [None] * max_batch
        self._table = np.zeros((max_batch, self.pages_per_seq), np.int32)  # slots' page tables (host)
        self._order: list[int] = []  # running slots, oldest admission first (preemption takes the last)
        self._queue: collections.deque[tuple[Request, list[int]]] = collections.deque()
        self._requests: dict[int, Request] = {}
        self._retained: dict[tuple[int, int], Seq] = {}
        self._finished: dict[int, list[Completion]] = {}
        self._next_id = 0
        self._keep: tuple = ((), None)  # (host tuple, device array) of the last decode's keep mask
        self.stats = collections.Counter()

    @classmethod
    def from_config(cls, inference, model, model_cfg, mesh: jax.sharding.Mesh | None = None) -> Engine:
        """The engine every role uses, sized by the ``config.inference`` section. A mesh of one
        device is treated as none."""
        return cls(model, model_cfg, max_batch=inference.max_batch, max_seq_len=inference.max_seq_len,
                   max_prefill_batch=inference.max_prefill_batch, decode_chunk=inference.decode_chunk,
                   max_decode_chunk=inference.max_decode_chunk, page_size=inference.page_size,
                   num_pages=inference.num_pages, mesh=mesh if mesh is not None and mesh.size > 1 else None)

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
        check_same_params(self._params, params)
        self._params = params
        self._weights = self._build_weights(params)
        self.stats["weight_updates"] += 1

    # ------------------------------------------------------------------------- requests
    def check_request(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raises EngineError / SamplingError if the request can never be served."""
        params.validate(self.model_cfg.vocab_size)
        if len(prompt) == 0:
            raise EngineError("empty prompt: at least one token is needed")
        check_tokens(prompt, "prompt", self.model_cfg.vocab_size)
        check_fits(len(prompt), params, self.max_seq_len, self.page_size, self.allocator)

    def submit(self, prompt: Sequence[int], params: SamplingParams, *,
               retain: bool = False) -> int:
        """Queues ``params.n`` completions of ``prompt``; returns the request id. With ``retain``
        the finished sequences keep their pages for ``extend`` (see ``retain``). Raises
        EngineError / SamplingError for a request that can never be served."""
        self.check_request(prompt, params)
        return self._enqueue(list(map(int, prompt)), params, None, retain)

    def extend(self, request_id: int, tokens: Sequence[int], params: SamplingParams, *,
               sample: int = 0, retain: bool = False) -> int:
        """Continues a retained, finished sequence (sample ``sample`` of request ``request_id``):
        ``tokens`` are appended to it and prefilled against its pages (only they and the last
        sampled token, whose K/V no step wrote, are computed), then generation goes on as a new
        request with its own ``params``. The retained sequence is consumed; returns the new id."""
        seq = self._retained.get((request_id, sample))
        if seq is None:
            raise EngineError(f"sequence {sample} of request {request_id} is not retained (retain() it "
                              "before it finishes; extend() and release() consume it)")
        params.validate(self.model_cfg.vocab_size)
        check_tokens(tokens, "tokens", self.model_cfg.vocab_size)
        context = seq.tokens() + list(map(int, tokens))
        check_fits(len(context), params, self.max_seq_len, self.page_size, self.allocator)
        del self._retained[(request_id, sample)]
        return self._enqueue(context, params, seq, retain)

    def retain(self, request_id: int) -> None:
        """Keeps the pages of the request's sequences when they finish, for ``extend``; until
        ``release`` they count against the page pool."""
        if request_id not in self._requests:
            raise EngineError(f"request {request_id} is not running (retain before it finishes)")
        self._requests[request_id].retain = True

    def release(self, request_id: int, sample: int | None = None) -> None:
        """Frees the pages of the request's retained sequences (and retains no more of them);
        with ``sample``, of that sequence only (the group's other episodes go on)."""
        if request_id in self._requests and sample is None:
            self._requests[request_id].retain = False
        for key in [k for k in self._retained if k[0] == request_id and sample in (None, k[1])]:
            self.allocator.free(self._retained.pop(key).pages)

    def step(self) -> bool:
        """One iteration: admit waiting requests into free slots, then one decode chunk.
        Returns whether work remains (waiting or running sequences)."""
        t0 = time.perf_counter()
        self._admit_waiting()
        self._decode_chunk()
        self.stats["step_seconds"] += time.perf_counter() - t0
        return self.busy

    @property
    def busy(self) -> bool:
        return bool(self._queue) or any(s is not None for s in self._slots)

    def take_finished(self) -> list[tuple[int, list[Completion]]]:
        """(request id, its n completions) for every request finished since the last call."""
        out, self._finished = list(self._finished.items()), {}
        return out

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
    ) -> list[list[Completion]]:
        """Generates ``params.n`` completions for each prompt (a loop of submit / step /
        take_finished).

        A request that cannot be served (empty prompt, prompt longer than the cache, invalid
        sampling params) gets n completions with finish_reason 'error' and the reason in
        ``.error``; the other requests are served normally.
        """
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise EngineError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        results: list[list[Completion] | int] = []
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            try:
                results.append(self.submit(prompt, p))
            except (EngineError, SamplingError) as e:
                log.warning("request %d rejected: %s", i, e)
                n = p.n if isinstance(p.n, int) and p.n > 0 else 1
                results.append([Completion([], [], [], "error", str(e)) for _ in range(n)])
                self.stats["rejected_requests"] += 1
        t0 = time.perf_counter()
        ids = {r for r in results if isinstance(r, int)}
        while any(r not in self._finished for r in ids) and self.busy:
            self.step()
        self.stats["generate_seconds"] += time.perf_counter() - t0
        done = {r: self._finished.pop(r) for r in ids}
        return [done[r] if isinstance(r, int) else r for r in results]

    @property
    def pages_in_use(self) -> int:
        """KV pages held by running and retained sequences."""
        return self.allocator.used_count

    # ------------------------------------------------------------------------- internals
    def _enqueue(self, context: list[int], params: SamplingParams, base: Seq | None, retain: bool) -> int:
        rid, self._next_id = self._next_id, self._next_id + 1
        req = Request(rid, context, params, base, retain, [None] * params.n)
        self._requests[rid] = req
        # Groups larger than the slot count are served in parts; each part shares a prefill.
        for start in range(0, params.n, self.max_batch):
            self._queue.append((req, list(range(start, min(params.n, start + self.max_batch)))))
        return rid

    def _new_pages(self, req: Request, k: int) -> int:
        """Pages a part of k samples needs at admission: the context's pages not yet in its base,
        plus one copy of the partly filled last page per extra sample."""
        have = len(req.base.pages) if req.base is not None else 0
        length = len(req.context)
        return max(0, pages_for(length, self.page_size) - have) + (k - 1) * bool(length % self.page_size)

    def _admit_waiting(self) -> None:
        """Prefills waiting requests into free slots while pages suffice (continuous batching);
        a request that does not fit waits, in order."""
        while self._queue:
            free = [i for i, s in enumerate(self._slots) if s is None]
            batch, slots_left, pages_left = [], len(free), self.allocator.free_count
            while self._queue and len(batch) < self.max_prefill_batch:
                req, samples = self._queue[0]
                if any(r is req for r, _ in batch):
                    break  # one part of a request per prefill (a part consumes its base's pages)
                k = len(samples)
                if k > slots_left or self._new_pages(req, k) > pages_left:
                    if batch or len(free) < self.max_batch:
                        if not batch:
                            self.stats["slot_waits" if k > slots_left else "page_waits"] += 1
                        break  # wait for running sequences to free slots and pages
                    # Nothing runs: serve as many samples of the group as the pages allow.
                    k = max((j for j in range(1, k + 1) if self._new_pages(req, j) <= pages_left), default=0)
                    if k == 0:
                        self._fail_head(req, samples)
                        continue
                    self._queue[0] = (req, samples[k:])
                else:
                    self._queue.popleft()
                batch.append((req, samples[:k]))
                slots_left -= k
                pages_left -= self._new_pages(req, k)
            if not batch:
                return
            self._prefill(batch, free)

    def _fail_head(self, req: Request, samples: list[int]) -> None:
        """The queue's head cannot start even alone on an idle engine: the pool is held by
        retained sequences. Its samples finish with an error rather than waiting forever."""
        self._queue.popleft()
        msg = (f"out of KV pages: {self._new_pages(req, 1)} needed, {self.allocator.free_count} free; "
               f"{len(self._retained)} retained sequences hold {self.allocator.used_count} pages (release them)")
        log.warning("request %d: %s", req.id, msg)
        if req.base is not None:
            self.allocator.free(req.base.pages)
            req.base = None
        for i in samples:
            req.results[i] = Completion([], [], [], "error", msg)
        self._maybe_done(req)

    def _prefill(self, batch: list[tuple[Request, list[int]]], free: list[int]) -> None:
        """One prefill of the batch's new tokens into pages; each request's samples start in free
        slots, sharing its full pages (copy-on-write of the partly filled last one)."""
        ps = self.page_size
        nrows = bucket(len(batch), self._batch_buckets)
        k = bucket(sum(len(s) for _, s in batch), self._insert_buckets)
        starts = [r.base.cached if r.base is not None else 0 for r, _ in batch]
        t = bucket(max(len(r.context) - q for (r, _), q in zip(batch, starts, strict=True)), self._len_buckets)
        width = bucket(max(pages_for(len(r.context), ps) for r, _ in batch), self._width_buckets)
        tokens = np.zeros((nrows, t), np.int32)
        q_start = np.zeros((nrows,), np.int32)
        q_lens = np.ones((nrows,), np.int32)
        row_pages = np.zeros((nrows, width), np.int32)
        cow_src, cow_dst = np.zeros((k,), np.int32), np.zeros((k,), np.int32)
        src = np.zeros((k,), np.int32)
        dst = np.full((k,), self.max_batch, np.int32)  # a slot past the end: dropped by the scatter
        context_lens, budget = np.zeros((k,), np.int32), np.zeros((k,), np.int32)
        temp, top_k, top_p = np.ones((k,), np.float32), np.zeros((k,), np.int32), np.ones((k,), np.float32)
        stop_ids = np.full((k, MAX_STOP_IDS), -1, np.int32)
        seeds, sample_ids = np.zeros((k,), np.int64), np.zeros((k,), np.uint32)
        slots = iter(free)
        j = c = 0
        for row, ((req, samples), start) in enumerate(zip(batch, starts, strict=True)):
            length, p = len(req.context), req.params
            new = req.context[start:]
            tokens[row, : len(new)] = new
            q_start[row], q_lens[row] = start, len(new)
            owner = (req.base.pages if req.base is not None else []) + self.allocator.alloc(
                self._new_pages(req, 1))
            req.base = None  # its pages now belong to the owner; later parts prefill afresh
            row_pages[row, : min(len(owner), width)] = owner[:width]
            full = owner[: length // ps]
            for n, sample_idx in enumerate(samples):
                if n == 0:
                    pages = owner
                else:
                    self.allocator.share(full)
                    pages = list(full)
                    if length % ps:
                        (copy,) = self.allocator.alloc(1)
                        cow_src[c], cow_dst[c] = owner[length // ps], copy
                        pages.append(copy)
                        c += 1
                slot = next(slots)
                src[j], dst[j], context_lens[j] = row, slot, length
                # Tokens after the first: bounded by max_new_tokens and by max_seq_len.
                budget[j] = min(p.max_new_tokens, self.max_seq_len - length) - 1
                temp[j], top_k[j], top_p[j] = p.temperature, p.top_k, p.top_p
                ids = list(p.stop_token_ids)[:MAX_STOP_IDS]
                stop_ids[j, : len(ids)] = ids
                seeds[j], sample_ids[j] = p.seed, sample_idx
                if self.stats["slot_uses"] >= self.max_batch:
                    self.stats["slot_refills"] += 1
                self.stats["slot_uses"] += 1
                self._slots[slot] = Seq(req.id, sample_idx, req.context, p, pages, Completion([], [], [], ""), slot)
                self._set_table(slot, pages)
                self._order.append(slot)
                j += 1
        seed_lo, seed_hi = seed_words(seeds)
        self._state, logits = self._prefill_fn(self._weights, self._state, tokens, q_start, q_lens, row_pages)
        self._state, first, logp, raw = self._start(
            self._state, logits, cow_src, cow_dst, src, dst, context_lens, budget, seed_lo, seed_hi, sample_ids,
            temp, top_k, top_p, stop_ids)
        self.stats["prefill_calls"] += 1
        self.stats["prefill_tokens"] += int(q_lens[: len(batch)].sum())
        first, logp, raw = jax.device_get((first, logp, raw))
        for i in range(j):
            self._append(int(dst[i]), first[i: i + 1], logp[i: i + 1], raw[i: i + 1])
        self.stats["peak_pages"] = max(self.stats["peak_pages"], self.allocator.used_count)

    def _set_table(self, slot: int, pages: list[int]) -> None:
        self._table[slot] = 0
        self._table[slot, : len(pages)] = pages

    def _steps_left(self, s: Seq) -> int:
        return min(s.params.max_new_tokens, self.max_seq_len - s.context_len) - len(s.completion.tokens)

    def _chunk_steps(self, waiting: bool) -> int:
        """Steps for the next decode call: decode_chunk while requests wait for a slot, else
        enough (bucketed) for the longest remaining budget."""
        if waiting:
            return self.decode_chunk
        need = max(self._steps_left(s) for s in self._slots if s is not None)
        return bucket(min(max(need, 1), self._chunk_buckets[-1]), self._chunk_buckets)

    def _grow(self, num_steps: int) -> None:
        """Gives each running sequence the pages the next chunk writes; when the pool is short,
        preempts the newest sequence (its pages freed, its sample requeued first: it restarts
        with the same key, so it reproduces its tokens) until the rest fit."""
        while True:
            need = {}
            for s in self._slots:
                if s is not None:
                    want = pages_for(s.cached + min(num_steps, self._steps_left(s)), self.page_size) - len(s.pages)
                    if want > 0:
                        need[s.slot] = want
            if sum(need.values()) <= self.allocator.free_count:
                break
            if len(self._order) == 1:  # alone and still short: retained sequences hold the pool
                s = self._slots[self._order[0]]
                s.completion.finish_reason = "error"
                s.completion.error = (f"out of KV pages: {len(self._retained)} retained sequences hold "
                                      f"{self.allocator.used_count - len(s.pages)} pages (release them)")
                self._finish_done()
                return
            self._preempt(self._order[-1])
        for slot, want in need.items():
            s = self._slots[slot]
            s.pages.extend(self.allocator.alloc(want))
            self._set_table(slot, s.pages)
        self.stats["peak_pages"] = max(self.stats["peak_pages"], self.allocator.used_count)

    def _preempt(self, slot: int) -> None:
        s = self._slots[slot]
        log.info("out of KV pages: preempting sample %d of request %d", s.sample, s.request)
        self.allocator.free(s.pages)
        self._release_slot(slot)
        self._queue.appendleft((self._requests[s.request], [s.sample]))
        self.stats["preemptions"] += 1

    def _release_slot(self, slot: int) -> None:
        self._slots[slot] = None
        self._table[slot] = 0
        self._order.remove(slot)

    def _decode_chunk(self) -> None:
        self._finish_done()
        if all(s is None for s in self._slots):
            return
        num_steps = self._chunk_steps(waiting=bool(self._queue))
        self._grow(num_steps)
        if all(s is None for s in self._slots):
            return
        keep = tuple(s is not None for s in self._slots)
        if keep != self._keep[0]:  # a host->device transfer only when the slot set changed
            self._keep = (keep, jax.device_put(np.asarray(keep), self._slot_sharding))
        width = bucket(max(len(s.pages) for s in self._slots if s is not None), self._width_buckets)
        table = jax.device_put(self._table[:, :width], self._slot_sharding)
        self._state, toks, logp, raw, valid, steps_run = self._decode(
            self._weights, self._state, self._keep[1], table, num_steps=num_steps)
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
        self._finish_done()

    def _append(self, slot: int, tokens: np.ndarray, logps: np.ndarray, raws: np.ndarray) -> None:
        self.stats["tokens_generated"] += append_tokens(self._slots[slot], tokens, logps, raws, self.max_seq_len)

    def _finish_done(self) -> None:
        for slot, s in enumerate(self._slots):
            if s is None or not s.completion.finish_reason:
                continue
            req = self._requests[s.request]
            req.results[s.sample] = s.completion
            if req.retain and s.completion.finish_reason != "error":
                self._retained[(s.request, s.sample)] = s
                s.slot = None
            else:
                self.allocator.free(s.pages)
            self._release_slot(slot)
            self._maybe_done(req)

    def _maybe_done(self, req: Request) -> None:
        if all(c is not None for c in req.results):
            self._finished[req.id] = req.results  # type: ignore[assignment]
            del self._requests[req.id]
