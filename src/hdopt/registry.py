"""One small generic registry: named entries of one kind (tasks, methods, experiments, model aliases, ...).

Each entry registers explicitly, once; a second entry under the same name is refused, and asking for an
unknown name raises an error that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name.

    Args:
        kind: what an entry is, for messages: ``"method"`` gives "unknown method 'x'; choose one of ...".
        error: the exception class raised for a duplicate or an unknown name.
        listing: the words before the list of known names in the unknown-name message.
        hint: appended to the unknown-name message (e.g. what else the user may pass).
        case_sensitive: ``False`` stores and looks up names lower-cased.
        sort: list the known names sorted (default) or in registration order in the unknown-name message.
        origin: where an entry comes from, named in the duplicate message ("... (by <origin>)").
    """

    def __init__(self, kind: str, *, error: type[Exception] = ValueError, listing: str = "choose one of",
                 hint: str = "", case_sensitive: bool = True, sort: bool = True,
                 origin: Callable[[T], str] | None = None) -> None:  # fmt: skip
        self.kind, self.error, self.listing, self.hint = kind, error, listing, hint
        self.case_sensitive, self.sort, self.origin = case_sensitive, sort, origin
        self._entries: dict[str, T] = {}

    def _key(self, name: str) -> str:
        return name if self.case_sensitive else name.lower()

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name`` and return it; a name already taken raises ``error``."""
        key = self._key(name)
        if key in self._entries:
            by = f" (by {self.origin(self._entries[key])})" if self.origin else ""
            raise self.error(f"{self.kind} {name!r} is already registered{by}")
        self._entries[key] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` if present (tests and interactive use)."""
        self._entries.pop(self._key(name), None)

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name raises ``error`` listing the known ones."""
        key = self._key(name)
        if key not in self._entries:
            known = sorted(self._entries) if self.sort else list(self._entries)
            raise self.error(f"unknown {self.kind} {name!r}; {self.listing} {', '.join(known)}{self.hint}")
        return self._entries[key]

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def values(self) -> list[T]:
        """The entries, in registration order."""
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
