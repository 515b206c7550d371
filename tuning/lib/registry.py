"""One tiny registry type shared by every extensible kind (experiments, backbones, datasets,
search spaces), so that a miss always answers the same way: with the valid names."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from tuning.lib.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        # "PREFIX" -> (make an item from the rest of the name, how the family reads in a listing)
        self._families: dict[str, tuple[Callable[[str], T], str]] = {}
        self._made: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            self.add(name, item)
            return item

        return add

    def add(self, name: str, item: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item

    def add_family(self, prefix: str, make: Callable[[str], T], listed_as: str) -> None:
        """Names `PREFIX...` that are not registered one by one (`timm:convnext_atto`): `make`
        builds the item from the rest of the name on first use, or raises UsageError."""
        if prefix in self._families:
            raise ValueError(f"{self.kind} family {prefix!r} is registered twice")
        self._families[prefix] = (make, listed_as)

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        if name in self._made:
            return self._made[name]
        for prefix, (make, _) in self._families.items():
            if name.startswith(prefix) and len(name) > len(prefix):
                self._made[name] = make(name[len(prefix):])
                return self._made[name]
        valid = ", ".join(self.names() + [listed for _, listed in self._families.values()]) or "(none)"
        raise UsageError(f"unknown {self.kind} {name!r}; valid: {valid}")

    def names(self) -> list[str]:
        return sorted(self._items)

    def families(self) -> list[str]:
        return [listed for _, listed in self._families.values()]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
