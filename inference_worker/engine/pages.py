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
    """Free list plus a reference count per page; page ``NULL_PAGE`` is reserved."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: at least 2 (page 0 is the reserved null page)")
        self.num_pages = num_pages
        self._refs = [0] * num_pages
        # Pop from the end: low page indices are handed out first (deterministic layouts).
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))

    @property
    def usable(self) -> int:
        """Pages that can ever be allocated (all but the null page)."""
        return self.num_pages - 1

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used_count(self) -> int:
        return self.usable - len(self._free)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def alloc(self, count: int) -> list[int]:
        """``count`` fresh pages, each with one reference; OutOfPages (and nothing taken) if the
        free list is shorter."""
        if count > len(self._free):
            raise OutOfPages(f"{count} pages asked, {len(self._free)} free of {self.usable}")
        pages = [self._free.pop() for _ in range(count)]
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
            if p == NULL_PAGE or self._refs[p] <= 0:
                raise ValueError(f"page {p} is not allocated; it cannot be freed")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold ``tokens`` positions."""
    return -(-tokens // page_size)
