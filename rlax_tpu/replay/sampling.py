"""Data-side helpers on admitted groups: dynamic sampling and a bounded rollout-reuse buffer."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def _rewards(item: Any) -> np.ndarray:
    group = getattr(item, "group", item)  # an Admitted or a RolloutGroup
    return np.asarray([s.reward for s in group.samples], np.float64)


def is_zero_variance(item: Any, tol: float = 1e-6) -> bool:
    """True when every sample of the group got (almost) the same reward: no learning signal."""
    r = _rewards(item)
    return bool(r.size == 0 or np.ptp(r) <= tol)


def filter_zero_variance(items: Sequence[T], tol: float = 1e-6) -> tuple[list[T], list[T]]:
    """Dynamic sampling (DAPO): splits groups into (kept, dropped zero-variance ones).

    Pass the dropped ones to ``ReplayController.issue_replacements`` to refill the batch.
    """
    kept, dropped = [], []
    for item in items:
        (dropped if is_zero_variance(item, tol) else kept).append(item)
    return kept, dropped


class ReuseBuffer:
    """The ``capacity`` most recently admitted groups, for rollout reuse (off unless capacity>0).

    Best effort and in memory only: it is not part of the checkpointed controller state.
    """

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"reuse buffer capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self._items: collections.deque = collections.deque(maxlen=self.capacity)

    def add(self, item: Any) -> None:
        self._items.append(item)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list:
        return list(self._items)

    def sample(self, n: int, rng: np.random.Generator) -> list:
        """Up to ``n`` distinct groups drawn uniformly from the buffer."""
        n = min(n, len(self._items))
        idx = rng.choice(len(self._items), size=n, replace=False)
        return [self._items[i] for i in idx]
