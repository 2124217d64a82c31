"""One generic registry, so methods (and later losses, teachers) plug in by name without the engine
importing them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from distill.errors import RecipeError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object map with a decorator for registration and a helpful error on unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The object registered as `name`; a name from a recipe that nothing registered is a recipe error."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise RecipeError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
