"""Which nodes report which model: the index dispatch draws from, kept up to date by difference."""

from __future__ import annotations

import random
from typing import Generic, TypeVar

Key = tuple[str, str]  # site, node
View = TypeVar("View")  # a node as the view keeps it (view.NodeView)


class Offering(Generic[View]):
    """model -> the nodes whose last report names it. Each node's models as last indexed are kept, so a
    report costs O(the models it adds or drops), never O(the models of the whole fleet)."""

    def __init__(self) -> None:
        self._holders: dict[str, Holders[View]] = {}
        self._indexed: dict[Key, frozenset[str]] = {}

    def update(self, key: Key, view: View, models: frozenset[str]) -> None:
        """The node `key` now reports `models` (none: it offers nothing, or is forgotten)."""
        before = self._indexed.get(key, frozenset())
        for model in before - models:
            holders = self._holders[model]
            holders.drop(key)
            if not holders.views:
                del self._holders[model]  # no node reports it now: a node renaming models keeps no trail
        for model in models - before:
            holders = self._holders.get(model) or self._holders.setdefault(model, Holders[View]())
            holders.put(key, view)
        if models:
            self._indexed[key] = models
        else:
            self._indexed.pop(key, None)

    def get(self, model: str) -> Holders[View] | None:
        return self._holders.get(model)

    def models(self) -> list[str]:
        return sorted(self._holders)


class Holders(Generic[View]):
    """The nodes reporting one model, drawn at random in O(count) (a key list kept beside the views,
    removal by swapping in the last key): a fleet of thousands is never copied per job."""

    __slots__ = ("_at", "_keys", "views")

    def __init__(self) -> None:
        self.views: dict[Key, View] = {}
        self._keys: list[Key] = []
        self._at: dict[Key, int] = {}

    def put(self, key: Key, view: View) -> None:
        if key not in self._at:
            self._at[key] = len(self._keys)
            self._keys.append(key)
        self.views[key] = view

    def drop(self, key: Key) -> None:
        index = self._at.pop(key, None)
        if index is None:
            return
        last = self._keys.pop()
        if last != key:
            self._keys[index] = last
            self._at[last] = index
        del self.views[key]

    def draw(self, count: int) -> list[View]:
        """`count` nodes at random: distinct in a small fleet, with replacement in a large one."""
        keys = self._keys
        if len(keys) <= count:
            return [self.views[k] for k in keys]
        if len(keys) < 64:
            return [self.views[k] for k in random.sample(keys, count)]
        return [self.views[keys[random.randrange(len(keys))]] for _ in range(count)]
