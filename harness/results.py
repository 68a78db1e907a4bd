"""The results files that ``run`` writes and ``check`` / ``leaderboard`` read (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

# Version of the metrics.json layout; bump it when a field changes meaning or moves.
SCHEMA_VERSION = 1


def read_metrics(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(file, content) of the ``metrics.json`` of a run folder, or of the file itself, schema-checked."""
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
    return file, metrics
