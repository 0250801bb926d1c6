"""One registry per kind (datasets, pools, models, attacks, output policies, optimizers), filled by a decorator.

Modelled on timm's ``register_model``: a module defines an entry and decorates it; the registry knows it at import.
Duplicate names are an error, and an unknown name raises :class:`~distributed_me.errors.UnknownNameError` listing the
valid ones, so CLI and spec validation get a useful message for free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from .errors import DmeError, UnknownNameError

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


def _coerce(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def parse_spec_item(text: str, registry: Registry[Any]) -> Any:
    """One spec string of a registry of pydantic parameter models (output policies, detectors) → a validated instance.

    ``"name"``, ``"name:value"`` (the first parameter), ``"name:field=value:other=value"``. An unknown name raises
    :class:`UnknownNameError` listing the valid ones; a bad parameter a :class:`DmeError` naming the field, the value
    and the parameters the entry takes."""
    name, *args = [s.strip() for s in text.strip().split(":")]
    cls = registry.get(name)
    fields = list(cls.model_fields)
    kwargs: dict[str, Any] = {}
    for i, arg in enumerate(args):
        if "=" in arg:
            key, val = arg.split("=", 1)
            kwargs[key.strip()] = _coerce(val.strip())
        elif i < len(fields):
            kwargs[fields[i]] = _coerce(arg)
        else:
            raise DmeError(f"{registry.kind} {name!r} takes {len(fields)} parameter(s) "
                           f"({', '.join(fields) or 'none'}); got {text!r}")
    try:
        return cls(**kwargs)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise DmeError(f"{registry.kind} {name!r}: field {field!r} = {err.get('input')!r}: {err['msg']} "
                       f"(parameters: {', '.join(fields) or 'none'})") from None
