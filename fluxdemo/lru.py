"""The one least-recently-used map of the package (prompt embeddings, results, LoRA analyses, Hub entries)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Hashable, Iterator
from itertools import islice


class LRU:
    """A map that keeps its `maxsize` most recently used entries."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, object] = OrderedDict()

    def get(self, key: Hashable):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: Hashable, value: object, spare: Collection[Hashable] = ()) -> list:
        """Store `value`, then evict the least recently used entries over maxsize, never those in `spare`; returns
        the evicted values, for an owner that must release them (the LoRA adapters)."""
        self._items[key] = value
        self._items.move_to_end(key)
        over = len(self._items) - self.maxsize
        victims = list(islice((k for k in self._items if k not in spare), max(over, 0)))
        return [self._items.pop(k) for k in victims]

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[Hashable]:  # least recently used first
        return iter(self._items)

    def keys(self) -> list[Hashable]:
        """The keys, least recently used first (a copy: safe to pop while walking it)."""
        return list(self._items)

    def items(self) -> list[tuple[Hashable, object]]:
        """The entries, least recently used first (a copy)."""
        return list(self._items.items())

    def pop(self, key: Hashable, default=None):
        return self._items.pop(key, default)
