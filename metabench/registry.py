"""Name -> entry registries that remember which plugin registered each name."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Generic, Iterator, TypeVar

from .errors import MetabenchError, PluginError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered thing: its name, the object, and the plugin that registered it."""

    name: str
    obj: T
    plugin: str
    extra: Any = None


class Registry(Generic[T]):
    """Registered names of one kind (``learner``, ``backbone``, ``task``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def add(self, entry: Entry[T]) -> None:
        """Add an entry; a name already taken raises PluginError naming both plugins."""
        if entry.name in self._entries:
            first = self._entries[entry.name].plugin
            raise PluginError(
                f"{self.kind} {entry.name!r} from plugin {entry.plugin!r} is already registered by plugin {first!r}"
            )
        self._entries[entry.name] = entry

    def get(self, name: str) -> Entry[T]:
        """The entry called ``name``; an unknown name raises MetabenchError with suggestions.

        A name ``family:variant`` not registered itself resolves to a family entry ``family:*``.
        """
        if name in self._entries:
            return self._entries[name]
        family, sep, variant = name.partition(":")
        if sep and variant and f"{family}:*" in self._entries:
            return self._entries[f"{family}:*"]
        raise MetabenchError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        names = sorted(self._entries)
        if not names:
            return f"unknown {self.kind} {name!r}: no {self.kind}s are registered (check `metabench plugins`)"
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (registered: {', '.join(names)})"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
