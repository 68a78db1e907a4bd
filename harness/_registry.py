"""A generic, typed plugin registry: decorator registration plus entry points.

One :class:`Registry` exists per plugin kind (methods, quantizers, datasets).
Built-in plugins register with a decorator when their module is imported;
plugins from other installed packages are found through an entry-point group
and imported lazily, the first time a registry is queried.
"""

from __future__ import annotations

import difflib
import functools
import fnmatch
import importlib
import re
import types
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Callable, Generic, Iterator, TypeVar

from harness.errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, KeyError):
    """Raised for a name no registry entry has; the message suggests close matches."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want plain text
        return str(self.args[0])


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    """"Unknown X 'y'. Did you mean ...? Available: ..." (the closest names first)."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"Unknown {kind} {name!r}.{hint} Available: {', '.join(known)}"


# Entry points of the harness's own distribution (the built-in plugins) load first.
HARNESS_DISTRIBUTION = "exitbench"


def _distribution(ep) -> str | None:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None)


def _load_order(ep) -> tuple[bool, str, str]:
    """Built-ins first, then the others by package and name (not by ``sys.path`` order)."""
    dist = _distribution(ep) or ""
    return dist != HARNESS_DISTRIBUTION, dist, ep.name


def _qualified_name(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


@dataclass
class Registry(Generic[T]):
    """Maps names to plugin factories of one kind.

    Args:
        kind: what the plugins are, used in messages ("method", "quantizer").
        entry_point_group: optional entry-point group scanned for outside plugins.
        builtin_modules: modules imported before the first lookup, so that their
            decorators have run (keeps ``--help`` fast: nothing heavy at import).
    """

    kind: str
    entry_point_group: str | None = None
    builtin_modules: tuple[str, ...] = ()
    _entries: dict[str, T] = field(default_factory=dict)
    _descriptions: dict[str, str] = field(default_factory=dict)
    _patterns: dict[str, tuple[str, Callable]] = field(default_factory=dict)
    _loaded: bool = False
    load_errors: dict[str, str] = field(default_factory=dict)

    def register(self, name: str, description: str = "") -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; a duplicate is an error."""

        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice "
                                 f"(already by {_qualified_name(self._entries[name])})")
            self._entries[name] = obj
            doc = description or (getattr(obj, "__doc__", None) or "").strip()
            self._descriptions[name] = doc.splitlines()[0] if doc else ""
            return obj

        return decorator

    def register_pattern(
        self, display: str, regex: str, description: str = ""
    ) -> Callable[[Callable], Callable]:
        """Register a family of names, e.g. ``fake-wNaM`` for ``fake-w4a8``.

        ``get`` on a matching name returns the factory with the regex's named
        groups bound as keyword arguments (as strings).
        """

        def decorator(factory: Callable) -> Callable:
            if display in self._patterns or display in self._entries:
                raise ValueError(f"{self.kind} {display!r} is registered twice")
            self._patterns[display] = (regex, factory)
            doc = description or (factory.__doc__ or "").strip()
            self._descriptions[display] = doc.splitlines()[0] if doc else ""
            return factory

        return decorator

    def _load(self) -> None:
        """Import the built-in modules, then every entry point of the group, built-in ones first.

        A plugin may not take a name that is already registered: built-ins
        load first, so they always win. A plugin that fails to import (any
        exception, ``sys.exit`` included), or that clashes, is refused as a
        whole: whatever it registered before failing is rolled back, and the
        reason is kept in :attr:`load_errors` for ``list`` and ``run`` to show.
        """
        if self._loaded:
            return
        self._loaded = True
        for module in self.builtin_modules:
            importlib.import_module(module)
        if not self.entry_point_group:
            return
        for ep in sorted(entry_points(group=self.entry_point_group), key=_load_order):
            saved = (dict(self._entries), dict(self._descriptions), dict(self._patterns))
            try:
                obj = ep.load()
                # An entry point may name a module whose decorators register its
                # plugins (so names live in one place), or one plugin object.
                if not isinstance(obj, types.ModuleType):
                    self.register(ep.name)(obj)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # SystemExit too: a broken plugin must not stop the others
                self._entries, self._descriptions, self._patterns = saved
                origin = _distribution(ep)
                self.load_errors[ep.name] = (f"{type(exc).__name__}: {exc}"
                                             + (f" (from package {origin})" if origin else ""))

    def get(self, name: str) -> T:
        """Return the entry registered as ``name``.

        Raises:
            UnknownNameError: with the closest names and the full list.
        """
        self._load()
        if name in self._entries:
            return self._entries[name]
        for display, (regex, factory) in self._patterns.items():
            match = re.fullmatch(regex, name)
            if match:
                return functools.partial(factory, **match.groupdict())  # type: ignore[return-value]
        if name in self.load_errors:
            raise UnknownNameError(
                f"{self.kind} {name!r} failed to load: {self.load_errors[name]}"
            )
        raise UnknownNameError(self._unknown_message(name))

    def _unknown_message(self, name: str) -> str:
        return unknown_name_message(self.kind, name, self.names())

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style ``pattern``, sorted."""
        self._load()
        names = list(self._entries) + list(self._patterns)
        return sorted(n for n in names if fnmatch.fnmatch(n, pattern))

    def describe(self) -> list[tuple[str, str]]:
        """``(name, one-line description)`` for every entry, sorted by name."""
        return [(n, self._descriptions.get(n, "")) for n in self.names()]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries or any(re.fullmatch(r, name) for r, _ in self._patterns.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

