"""Tiny name -> factory registries, one per extension point."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A dict of named factories; an unknown name is an error that lists the valid names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "<none>"
            raise ValueError(f"unknown {self.kind} '{name}'; valid: {valid}") from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        factory: Any = self.get(name)
        try:
            return factory(*args, **kwargs)
        except TypeError as err:
            raise ValueError(f"{self.kind} '{name}': {err}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
