"""The results files that ``run`` writes and ``check`` / ``leaderboard`` read (torch-free)."""

from __future__ import annotations

import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypedDict, Union

from harness.errors import ConfigError

# Version of the metrics.json layout; bump it when a field changes meaning or moves.
SCHEMA_VERSION = 2
# Marks a list of the layout below that needs at least one item.
NON_EMPTY = "non-empty"
# The key, among metrics.json's latency methods, of the negative control: full depth timed against itself.
LATENCY_CONTROL = "full-depth (repeat)"
# Fields that say where things were on one machine, not what was computed.
MACHINE_FIELDS = ("cache_dir",)
# An absolute POSIX path (not part of a word, a relative path or a URL); group 1 is its last part.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])/(?:[^\s/]+/)*([^\s/]+)")


class Stat(TypedDict):
    """One metric over seeds; null (or NaN) where a run did not measure it."""

    mean: float | None
    std: float | None


class Summary(TypedDict):
    top1: Stat  # percent
    flops_saving: Stat  # percent of full depth's FLOPs


class Quadrants(TypedDict):
    """Test-sample counts against full depth under the same quantizer."""

    both_correct: float
    rescued: float
    lost: float
    both_wrong: float
    net_rescue: float  # rescued - lost


class SeedMetrics(TypedDict):
    top1_ci: tuple[float | None, float | None]  # 95% bootstrap interval, percent
    quadrants: Quadrants
    exit_distribution: dict[str, float]  # exit layer -> percent of test samples


class Row(TypedDict):
    """One method, control or full-depth baseline of a run (methods and controls also hold
    ``operating_points``: per budget, chosen on the gate split; see :mod:`harness.protocol`)."""

    kind: str  # "baseline", "control" or "method"
    per_seed: Annotated[list[SeedMetrics], NON_EMPTY]
    summary: Summary


class RunConfig(TypedDict):
    model: str
    data: str
    quant: str


class RunInfo(TypedDict):
    config: RunConfig
    methods: list[str]
    seeds: int
    budgets: list[float]  # FLOPs-saving budgets (percent) of the operating points


class Metrics(TypedDict):
    """The part of ``metrics.json`` that ``check`` and ``leaderboard`` rely on (``run`` writes more)."""

    schema_version: int
    run: RunInfo
    rows: dict[str, Row]


def read_metrics(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(file, content) of the ``metrics.json`` of a run folder, or of the file itself.

    Raises:
        ConfigError: no such file, not JSON, another schema version, or a key of
            :class:`Metrics` missing or of the wrong type (the message names the file and the key).
    """
    path = Path(path)
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no metrics.json at {path} (pass a folder written by `python -m harness run`, "
                          "or its metrics.json)")
    try:
        metrics = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: not a JSON results file ({exc})") from None
    version = metrics.get("schema_version") if isinstance(metrics, dict) else None
    if version != SCHEMA_VERSION:
        raise ConfigError(f"{file}: schema_version {version!r}, this harness reads {SCHEMA_VERSION}")
    problem = _problem(metrics, Metrics, "")
    if problem:
        raise ConfigError(f"{file}: {problem}")
    return file, metrics


def results_json(value: Any) -> str:
    """The text of a results file: strict JSON with no machine paths (:func:`without_machine_paths`).

    NaN and infinities become null (bare ``NaN`` is not JSON); numpy scalars
    and arrays become plain numbers and lists. Indented, ending in a newline.
    """
    return json.dumps(without_machine_paths(_plain(value)), indent=2, allow_nan=False) + "\n"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        value = value.tolist()  # an array -> nested lists, a scalar -> a Python number
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def find_runs(path: str | Path) -> list[Path]:
    """The ``metrics.json`` of every run folder at or below the folder ``path``, sorted by folder.

    A path that is not a folder is returned as it is (:func:`read_metrics` judges it).
    Folders whose name starts with a dot are skipped: hidden, or a run still being
    written (``harness._io.atomic_path`` writes into ``.NAME.tmp-PID``).

    Raises:
        ConfigError: ``path`` is a folder with no ``metrics.json`` in it or below it.
    """
    path = Path(path)
    if not path.is_dir():
        return [path]
    found = []
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        if "metrics.json" in files:
            found.append(Path(folder, "metrics.json"))
    if not found:
        raise ConfigError(f"no run under {path}: no metrics.json in it or its subfolders "
                          "(pass folders written by `python -m harness run`)")
    return sorted(found, key=lambda file: file.parent.relative_to(path).parts)


def without_machine_paths(value: Any) -> Any:
    """A copy of a JSON value without :data:`MACHINE_FIELDS`, absolute paths cut to ``.../LAST-PART``.

    Results are published and compared across machines: where a cache or a
    checkpoint lay on one of them says nothing about the result.

    Example:
        >>> without_machine_paths({"cache_dir": "/tmp/c", "pretrained": "/home/me/w.safetensors"})
        {'pretrained': '.../w.safetensors'}
    """
    if isinstance(value, dict):
        return {key: without_machine_paths(item) for key, item in value.items() if key not in MACHINE_FIELDS}
    if isinstance(value, (list, tuple)):
        return [without_machine_paths(item) for item in value]
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(r".../\1", value)
    return value


def refuse_overwrite(folder: Path) -> None:
    """Raise ConfigError if ``folder`` holds files: committed results are replaced only when asked."""
    if folder.is_file() or (folder.is_dir() and any(folder.iterdir())):
        raise ConfigError(f"{folder} holds results already; pass --overwrite to replace them, or another --out")


def _problem(value: Any, hint: Any, where: str) -> str | None:
    """How ``value``, found at ``where`` (``rows['pabee']``), departs from the type ``hint``; None if it fits."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        if NON_EMPTY in args[1:] and value == []:
            return f"{where} is empty"
        return _problem(value, args[0], where)
    if typing.is_typeddict(hint):
        if not isinstance(value, dict):
            return _mismatch(value, "an object", where)
        for key, sub in typing.get_type_hints(hint, include_extras=True).items():
            if key not in value:
                return f"missing key {key!r}" + (f" in {where}" if where else "")
            problem = _problem(value[key], sub, f"{where}[{key!r}]" if where else key)
            if problem:
                return problem
        return None
    if origin is dict:
        if not isinstance(value, dict):
            return _mismatch(value, "an object", where)
        return next(filter(None, (_problem(item, args[1], f"{where}[{key!r}]") for key, item in value.items())), None)
    if origin in (list, tuple):
        if not isinstance(value, list):
            return _mismatch(value, "a list", where)
        if origin is tuple and len(value) != len(args):
            return f"{where} has {len(value)} items, expected {len(args)}"
        subs = args if origin is tuple else args * len(value)
        return next(filter(None, (_problem(item, sub, f"{where}[{i}]")
                                  for i, (item, sub) in enumerate(zip(value, subs)))), None)
    if origin in (Union, types.UnionType):
        if any(_problem(value, arm, where) is None for arm in args):
            return None
        return _mismatch(value, " or ".join(_KINDS[arm] for arm in args), where)
    if hint is type(None):
        return None if value is None else _mismatch(value, "null", where)
    # JSON has one number type: an integer fits a float field; a boolean fits no number field
    fits = isinstance(value, (int, float) if hint is float else hint) and not isinstance(value, bool)
    return None if fits else _mismatch(value, _KINDS[hint], where)


_KINDS = {float: "a number", int: "an integer", str: "a string", type(None): "null"}


def _mismatch(value: Any, expected: str, where: str) -> str:
    kind = ("null" if value is None else "a boolean" if isinstance(value, bool) else
            "a number" if isinstance(value, (int, float)) else "a string" if isinstance(value, str) else
            "a list" if isinstance(value, list) else "an object")
    return f"{where or 'the file'} is {kind}, expected {expected}"


def row_latency(metrics: dict[str, Any], row_name: str) -> dict[str, Any] | None:
    """The latency entry that results row ``row_name`` shows (``run``'s tables and the leaderboard alike).

    A method's row shows its own entry; full depth under the run's quantizer shows the negative control
    (:data:`LATENCY_CONTROL`, full depth timed against itself); None where the run timed nothing for the row.
    """
    latency = (metrics.get("latency") or {}).get("methods", {})
    quant = metrics["run"]["config"]["quant"]
    return latency.get(LATENCY_CONTROL if row_name == f"full-depth {quant}" else row_name)
