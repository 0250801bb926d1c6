"""One registry per kind (datasets, pools, models, attacks, output policies, optimizers), filled by a decorator.

Modelled on timm's ``register_model``: a module defines an entry and decorates it; the registry knows it at import.
Duplicate names are an error, and an unknown name raises :class:`~distributed_me.errors.UnknownNameError` listing the
valid ones, so CLI and spec validation get a useful message for free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → entry mapping for one kind of component."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` (defaults to the entry's ``__name__``)."""

        def deco(entry: T) -> T:
            key = name or entry.__name__
            if key in self._entries:
                raise ValueError(f"duplicate {self.kind} name {key!r}: already registered by {self._entries[key]!r}")
            self._entries[key] = entry
            return entry

        return deco

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._entries) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
