"""Host arrays of one admission: a prefill of new tokens into pages (steps.prefill) and the start
of the requests' samples in decode slots (steps.start)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inference_worker.engine.sampling import SamplingParams, seed_words
from inference_worker.engine.state import MAX_STOP_IDS


class AdmitArrays:
    """The prefill's rows, in one block of ``block`` rows per shard of the slots (a shard computes
    the rows whose pages it holds), and the start's ``k`` new slots, with its page copies in one
    block of ``k`` per shard (kernels.copy_pages). Unused entries are padding: a row of one token
    written into the null page, a copy of the null page onto itself, a slot past the end (dropped)."""

    def __init__(self, shards: int, block: int, t: int, width: int, k: int, num_slots: int):
        nrows = shards * block
        self.block, self.k, self.samples = block, k, 0
        self._rows, self._copies = [0] * shards, [0] * shards
        self.tokens = np.zeros((nrows, t), np.int32)
        self.q_start = np.zeros((nrows,), np.int32)
        self.q_lens = np.ones((nrows,), np.int32)
        self.row_pages = np.zeros((nrows, width), np.int32)
        self.cow_src, self.cow_dst = np.zeros((shards * k,), np.int32), np.zeros((shards * k,), np.int32)
        self.src = np.zeros((k,), np.int32)
        self.dst = np.full((k,), num_slots, np.int32)
        self.context_lens, self.budget = np.zeros((k,), np.int32), np.zeros((k,), np.int32)
        self.temp, self.top_p = np.ones((k,), np.float32), np.ones((k,), np.float32)
        self.top_k = np.zeros((k,), np.int32)
        self.stop_ids = np.full((k, MAX_STOP_IDS), -1, np.int32)
        self.seeds, self.sample_ids = np.zeros((k,), np.int64), np.zeros((k,), np.uint32)

    def add_row(self, shard: int, new_tokens: Sequence[int], start: int, pages: Sequence[int]) -> int:
        """A prefill row of ``new_tokens`` at positions start.. over the owner's ``pages``; its index."""
        row = shard * self.block + self._rows[shard]
        self._rows[shard] += 1
        self.tokens[row, : len(new_tokens)] = new_tokens
        self.q_start[row], self.q_lens[row] = start, len(new_tokens)
        width = self.row_pages.shape[1]
        self.row_pages[row, : min(len(pages), width)] = pages[:width]
        return row

    def add_copy(self, shard: int, src: int, dst: int) -> None:
        c = shard * self.k + self._copies[shard]
        self._copies[shard] += 1
        self.cow_src[c], self.cow_dst[c] = src, dst

    def add_sample(self, row: int, slot: int, context_len: int, budget: int, params: SamplingParams,
                   sample_index: int) -> None:
        """Slot ``slot`` starts sample ``sample_index`` from prefill row ``row`` with ``budget``
        tokens after its first."""
        j = self.samples
        self.samples += 1
        self.src[j], self.dst[j], self.context_lens[j], self.budget[j] = row, slot, context_len, budget
        self.temp[j], self.top_k[j], self.top_p[j] = params.temperature, params.top_k, params.top_p
        ids = list(params.stop_token_ids)[:MAX_STOP_IDS]
        self.stop_ids[j, : len(ids)] = ids
        self.seeds[j], self.sample_ids[j] = params.seed, sample_index

    def prefill_args(self) -> tuple:
        return self.tokens, self.q_start, self.q_lens, self.row_pages

    def start_args(self) -> tuple:
        seed_lo, seed_hi = seed_words(self.seeds)
        return (self.cow_src, self.cow_dst, self.src, self.dst, self.context_lens, self.budget, seed_lo, seed_hi,
                self.sample_ids, self.temp, self.top_k, self.top_p, self.stop_ids)
