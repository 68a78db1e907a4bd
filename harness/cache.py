"""The one get-or-build disk cache behind traces, fits, fitted policies and zero-shot classifiers.

Every entry is a folder ``<cache_dir>/<kind>/<key>/``. ``key`` hashes the
entry's key fields, which must name everything that produced it (inputs,
code, package versions; :func:`code_fields` and :func:`fit_fields` help).
The folder holds the entry's files and ``meta.json``: the key fields, the
builder's own metadata and the size and blake2b digest of every file.

An entry is built in a temporary folder and renamed into place only when
complete, so a reader never sees a partial one; two processes building the
same entry race harmlessly (the first rename wins). Every load checks every
file against ``meta.json``: a missing, truncated or corrupt entry is removed
and rebuilt, with a one-line note on stderr.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
from collections import OrderedDict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
import torch

from harness._io import atomic_path, file_digest
from harness.errors import ConfigError

T = TypeVar("T")

META = "meta.json"
STATE = "state.pt"  # the one file of a :func:`cached_state` entry

# Harness modules whose code feeds every fit: FitContext and its traces, FLOPs and options, the fit driver.
FIT_MODULES = ("harness.policy", "harness.fitting", "harness.flops", "harness.trace",
               "harness.options", "harness.heads", "harness.fidelity")


class DamagedEntry(Exception):
    """A cache entry whose files do not match its ``meta.json`` (the message says how)."""


@dataclass(frozen=True)
class Entry:
    """A verified cache entry: its folder and its ``meta.json`` (``key``, ``files`` and the builder's fields)."""

    path: Path
    meta: dict[str, Any]


def read_entry(path: Path) -> dict[str, Any]:
    """The ``meta.json`` of the entry at ``path``, once every file matches its recorded size and digest.

    Raises:
        DamagedEntry: meta.json is missing or unreadable, or a file is missing, resized or altered.
    """
    try:
        meta = json.loads((path / META).read_text())
        files = {name: (int(info["bytes"]), str(info["blake2b"])) for name, info in meta["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DamagedEntry(f"unreadable {META}: {exc!r}") from exc
    for name, (size, digest) in files.items():
        file = path / name
        if not file.is_file():
            raise DamagedEntry(f"{name} is missing")
        if file.stat().st_size != size:
            raise DamagedEntry(f"{name} has {file.stat().st_size} bytes, not {size}")
        if file_digest(file, "blake2b") != digest:
            raise DamagedEntry(f"digest mismatch in {name}")
    return meta


def get_or_build(cache_dir: Path, kind: str, fields: dict[str, Any], build: Callable[[Path], dict[str, Any]]) -> Entry:
    """The entry of ``fields`` under ``cache_dir/kind``, built by ``build(folder)`` when missing or damaged.

    Args:
        fields: the key fields (JSON-able; others are written with ``str``).
        build: writes the entry's files into the empty ``folder`` and returns
            extra JSON-able fields for ``meta.json``.

    Raises:
        ConfigError: the cache folder cannot be written.
    """
    root = _writable(cache_dir, kind)
    path = _entry_path(root, fields)
    if path.exists():
        try:
            return Entry(path, read_entry(path))
        except DamagedEntry as exc:
            print(f"note: cache entry {path} is corrupt ({exc}); rebuilding", file=sys.stderr)
            _remove(path)
    _remove_stale_tmp(root)
    try:
        with atomic_path(path) as tmp:
            tmp.mkdir()
            meta = {"key": fields, **build(tmp)}
            meta["files"] = {file.name: {"bytes": file.stat().st_size, "blake2b": file_digest(file, "blake2b")}
                             for file in sorted(tmp.iterdir())}
            (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
    except OSError:
        if path.is_dir():  # another process finished the same entry first
            return Entry(path, read_entry(path))
        raise
    return Entry(path, json.loads((path / META).read_text()))  # as a later load will read it


def get_or_build_together(cache_dir: Path, kind: str, fields: Sequence[dict[str, Any]],
                          build: Callable[[dict[int, Path]], list[dict[str, Any]]]) -> list[Entry]:
    """The entries of ``fields``, the missing ones built by one ``build(folders)`` call that writes them all.

    For work that yields several entries from one pass (traces of the same images under several
    quantizers, which then decode each image once). ``build`` gets an empty folder for each missing entry,
    keyed by its position in ``fields`` (in that order; a key given twice, by its first), and returns their
    ``meta.json`` fields in the same order. Each entry is still
    built and renamed into place atomically (:func:`get_or_build`, nested), so a failure leaves none of
    them half-written; entries another process completes meanwhile are taken as they are.
    """
    first = first_positions(fields)  # a key given twice is built once
    entries = {i: find_entry(cache_dir, kind, fields[i]) for i in sorted(set(first))}
    while missing := [i for i, entry in entries.items() if entry is None]:
        metas: list[dict[str, Any]] = []

        def nested(depth: int, folders: dict[int, Path]) -> None:
            def build_here(folder: Path) -> dict[str, Any]:
                if depth + 1 < len(missing):
                    nested(depth + 1, {**folders, missing[depth]: folder})
                else:
                    metas.extend(build({**folders, missing[depth]: folder}))
                if not metas:  # a deeper entry was finished by another process meanwhile, so nothing was built
                    raise _StartOver
                return metas[depth]

            entries[missing[depth]] = get_or_build(cache_dir, kind, fields[missing[depth]], build_here)

        with contextlib.suppress(_StartOver):  # the loop builds what is still missing
            nested(0, {})
    return [entries[i] for i in first]


def first_positions(fields: Sequence[dict[str, Any]]) -> list[int]:
    """For each key in ``fields``, the position of its first occurrence (keys equal as cache keys are one)."""
    names = [_entry_path(Path(), f) for f in fields]
    first = {name: i for i, name in reversed(list(enumerate(names)))}
    return [first[name] for name in names]


class _StartOver(Exception):
    """Raised through the nested builds of :func:`get_or_build_together` when one of its entries appeared."""


def find_entry(cache_dir: Path, kind: str, fields: dict[str, Any]) -> Entry | None:
    """The verified entry of ``fields`` if one is in the cache, else None (a damaged one counts as none)."""
    path = _entry_path(Path(cache_dir) / kind, fields)
    try:
        return Entry(path, read_entry(path)) if path.exists() else None
    except DamagedEntry:
        return None


def remove_entry(cache_dir: Path, kind: str, fields: dict[str, Any]) -> None:
    """Delete the entry of ``fields`` (nothing when there is none)."""
    _remove(_entry_path(Path(cache_dir) / kind, fields))


def _entry_path(root: Path, fields: dict[str, Any]) -> Path:
    return root / hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cached_state(cache_dir: Path, kind: str, fields: dict[str, Any], build: Callable[[], T], owner: str) -> T:
    """``build()`` (tensors and plain values), kept with ``torch.save`` in a :func:`get_or_build` entry.

    ``owner`` names what built the state in errors (e.g. ``method 'cls-ee'``).

    Raises:
        TypeError: the state holds something ``torch.load(weights_only=True)``
            cannot read back (named with its key), before anything is written.
    """
    return cached_states(cache_dir, kind, [fields], lambda missing: [build()], owner)[0]


def cached_states(cache_dir: Path, kind: str, fields: Sequence[dict[str, Any]],
                  build: Callable[[list[int]], list[T]], owner: str) -> list[T]:
    """:func:`cached_state` of several entries, the missing ones built by one ``build(missing)`` call: it gets
    their positions in ``fields`` and returns their states in that order (:func:`get_or_build_together`)."""
    built: dict[int, T] = {}

    def save(folders: dict[int, Path]) -> list[dict[str, Any]]:
        states = build(list(folders))
        if len(states) != len(folders):
            raise ValueError(f"{owner}: {len(states)} states built for {len(folders)} cache entries")
        for state in states:
            check_state(state, owner)
        for (i, folder), state in zip(folders.items(), states):
            torch.save(state, folder / STATE)
            built[i] = state
        return [{} for _ in folders]

    entries = get_or_build_together(cache_dir, kind, fields, save)
    by_path = {entries[i].path: state for i, state in built.items()}  # a key given twice: its first one's
    # a verified entry that torch cannot read is a bug to see, not a reason to rebuild on every run
    return [by_path[entry.path] if entry.path in by_path else torch.load(entry.path / STATE, weights_only=True)
            for entry in entries]


# Leaves torch.load(weights_only=True) reads back; containers are checked item by item.
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.Size)


def check_state(value: Any, owner: str, key: str = "") -> None:
    """Raise TypeError naming ``owner`` and the key of the first part of ``value`` not a tensor or plain value."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN:
        return
    if type(value) in (dict, OrderedDict):
        for name, item in value.items():
            check_state(name, owner, f"{key}.{name}" if key else str(name))
            check_state(item, owner, f"{key}.{name}" if key else str(name))
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            check_state(item, owner, f"{key}[{index}]")
        return
    kind = type(value)
    raise TypeError(f"{owner}: state entry {key or '(the whole state)'!r} is a {kind.__module__}.{kind.__qualname__}; "
                    f"a state may hold only tensors and plain values (int, float, bool, str, None, and lists, "
                    f"tuples and dicts of them), which torch.load(weights_only=True) can read back")


def code_fields(modules: Iterable[str]) -> dict[str, Any]:
    """Key fields for the code of ``modules`` (names of imported modules).

    A digest of each module's source and, for a module in a package other
    than the harness, of the other ``.py`` files of its folder (helpers it may
    call; the harness's own modules that feed a fit are named, so an edit to,
    say, the CLI refits nothing); the installed
    distribution of each top-level package, plus torch and numpy, whose
    numerics every fit depends on. Standard-library and torch modules are
    left out: their versions stand for them.
    """
    files: set[Path] = set()
    packages = {"torch", "numpy"}
    for name in modules:
        top = name.partition(".")[0]
        module = sys.modules.get(name)
        if top in sys.stdlib_module_names or top == "torch" or getattr(module, "__file__", None) is None:
            continue
        file = Path(module.__file__).resolve()
        files.add(file)
        if module.__package__ and top != "harness":
            files.update(file.parent.glob("*.py"))
        packages.add(top)
    dists = _packages_distributions()
    return {"sources": source_digest(files),
            "versions": {top: sorted(f"{d}=={metadata.version(d)}" for d in set(dists.get(top, ())))
                         for top in sorted(packages)}}


def trace_fields(trace: Any) -> tuple[dict[str, Any], str]:
    """What identifies the rows of a :class:`~harness.trace.Trace`: its cache key and a digest of its indices."""
    return trace.meta["key"], hashlib.sha256(np.asarray(trace.indices).tobytes()).hexdigest()


def fit_fields(traces: Sequence[Any], seed: int, modules: Iterable[str]) -> dict[str, Any]:
    """Key fields of a fit on ``traces`` (:class:`~harness.trace.Trace`) with ``seed`` by the code of ``modules``.

    The harness's :data:`FIT_MODULES` are added to ``modules``.
    """
    return {"data": [trace_fields(t) for t in traces],
            "seed": seed,
            "code": code_fields([*modules, *FIT_MODULES])}


def source_digest(files: Iterable[Path]) -> str:
    """One digest of the files' contents, labelled ``folder/name``: the checkout's location is not part of it."""
    listing = sorted((f"{file.parent.name}/{file.name}", file_digest(file)) for file in set(files))
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    """Top-level package -> installed distributions (slow to build; installs do not change during a run)."""
    return metadata.packages_distributions()


def _writable(cache_dir: Path, kind: str) -> Path:
    """``cache_dir/kind``, created; ConfigError when it cannot be written."""
    root = Path(cache_dir) / kind
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError("permission denied")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cache folder {cache_dir} is not writable ({reason}); "
                          f"pick another with --cache-dir DIR or EXITBENCH_CACHE") from exc
    return root


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_stale_tmp(root: Path) -> None:
    """Delete temporary entries left by processes that died mid-build (``atomic_path`` names them ``.NAME.tmp-PID``)."""
    for tmp in root.glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _remove(tmp)
