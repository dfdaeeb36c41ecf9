"""The host side of the paged KV cache: a page allocator with a free list and reference counts.

The device holds one page pool per layer (``k_pages, v_pages: [Hkv, num_pages, page_size, D]``);
a sequence is a list of page indices (its page table). Page 0 is never handed out: it is the
null page that unused page-table entries point at, so writes of padding tokens and of idle
slots land somewhere harmless and reads past a sequence's length are masked anyway.

Pages are shared by reference count: the n samples of a group hold the same full prompt pages
(each takes a reference), and a page goes back to the free list when its last holder drops it.
"""

from __future__ import annotations

from collections.abc import Iterable

NULL_PAGE = 0


class OutOfPages(RuntimeError):
    """Fewer free pages than asked for (the caller waits or preempts; nothing was allocated)."""


class PageAllocator:
    """Free lists plus a reference count per page.

    With ``shards`` > 1 the pool is ``shards`` equal blocks of pages, one per data shard of the
    engine's slots (a device holds only its shard's block, so a slot's pages must come from its
    own). Page ids stay global; the first page of each block is that block's null page (never
    handed out; ``NULL_PAGE`` is block 0's, and every id is its block's null modulo the block).
    """

    def __init__(self, num_pages: int, shards: int = 1):
        if shards < 1 or num_pages % shards:
            raise ValueError(f"num_pages={num_pages} must divide into shards={shards} equal blocks")
        self.num_pages = num_pages
        self.shards = shards
        self.block = num_pages // shards
        if self.block < 2:
            raise ValueError(f"num_pages={num_pages}: at least 2 per shard (each block's first page is a "
                             "reserved null page)")
        self._refs = [0] * num_pages
        # Pop from the end: low page indices are handed out first (deterministic layouts).
        self._free = [list(range((s + 1) * self.block - 1, s * self.block, -1)) for s in range(shards)]

    @property
    def usable(self) -> int:
        """Pages one sequence can ever hold (a shard's block but its null page)."""
        return self.block - 1

    @property
    def free_count(self) -> int:
        return sum(map(len, self._free))

    def free_in(self, shard: int) -> int:
        return len(self._free[shard])

    @property
    def used_count(self) -> int:
        return self.shards * self.usable - self.free_count

    def shard_of(self, page: int) -> int:
        return page // self.block

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def alloc(self, count: int, shard: int = 0) -> list[int]:
        """``count`` fresh pages of ``shard``'s block, each with one reference; OutOfPages (and
        nothing taken) if its free list is shorter."""
        free = self._free[shard]
        if count > len(free):
            raise OutOfPages(f"{count} pages asked, {len(free)} free of {self.usable}")
        pages = [free.pop() for _ in range(count)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def share(self, pages: Iterable[int]) -> None:
        """One more reference to each page (another sequence now reads it)."""
        for p in pages:
            if self._refs[p] <= 0:
                raise ValueError(f"page {p} is not allocated; it cannot be shared")
            self._refs[p] += 1

    def free(self, pages: Iterable[int]) -> None:
        """Drops one reference to each page; a page whose count reaches 0 is free again."""
        for p in pages:
            if p % self.block == NULL_PAGE or self._refs[p] <= 0:
                raise ValueError(f"page {p} is not allocated; it cannot be freed")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free[self.shard_of(p)].append(p)


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold ``tokens`` positions."""
    return -(-tokens // page_size)
