"""Named, swappable parts: a :class:`Registry` maps a name (the value a params.yaml key takes) to the function
that implements it. Each registry lives beside its entries (schedule policies, LR suggesters, optimizers,
models); the config's allowed values are :meth:`Registry.names`, so adding an entry is one decorated function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from onecycle.core.errors import ConfigError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """An ordered name -> entry mapping with a decorator to add entries and one-line errors for unknown names."""

    def __init__(self, key: str):
        self.key = key  # the params key whose values name the entries, e.g. "schedule.policy"
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: add the decorated function under ``name`` (a name registered twice is a programming error)."""
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.key}: {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def get(self, name: str, default=None):  # type: ignore[override]
        """The entry for ``name``, or ``default``."""
        return self._entries.get(name, default)

    def lookup(self, name: str) -> T:
        """The entry for ``name``; an unknown name raises :class:`ConfigError` naming the key and the choices."""
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"{self.key} must be one of {', '.join(self._entries)}; got {name!r}") from None

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
