"""``python -m harness check``: regression check of a run against committed baseline metrics.

The current results are read from a run folder, or re-made by running the
baseline's own config, methods and seeds (latency is not compared, so it is
not measured). Every row of the baseline (full-depth baselines and methods)
is compared on mean top-1 and mean FLOPs saving; a row fails when its top-1
drops by more than the tolerance or its FLOPs saving moves by more than the
FLOPs tolerance (both in percentage points), or when it is missing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import HarnessConfig
from harness.errors import ConfigError

# Config fields that name where things are on one machine, not what is computed.
_LOCAL_FIELDS = ("cache_dir", "threads")


@dataclass
class RowCheck:
    """One row of the comparison; ``None`` values are missing in that file."""

    name: str
    baseline_top1: float
    current_top1: float | None
    baseline_flops: float
    current_flops: float | None
    verdict: str

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


def _mean(row: dict[str, Any], key: str) -> float:
    return float(row["summary"][key]["mean"])


def compare(baseline: dict[str, Any], current: dict[str, Any], tolerance: float = 0.5,
            flops_tolerance: float = 0.5) -> list[RowCheck]:
    """Row-by-row verdicts of ``current`` against ``baseline`` (tolerances in percentage points)."""
    mismatched = config_differences(baseline, current)
    if mismatched:
        raise ConfigError("baseline and current runs differ in " + ", ".join(mismatched) + ": nothing to compare")
    checks = []
    for name, row in baseline["rows"].items():
        base_top1, base_flops = _mean(row, "top1"), _mean(row, "flops_saving")
        other = current["rows"].get(name)
        if other is None:
            checks.append(RowCheck(name, base_top1, None, base_flops, None, "missing"))
            continue
        top1, flops = _mean(other, "top1"), _mean(other, "flops_saving")
        problems = []
        if top1 < base_top1 - tolerance:
            problems.append("top-1 drop")
        if abs(flops - base_flops) > flops_tolerance:
            problems.append("FLOPs change")
        checks.append(RowCheck(name, base_top1, top1, base_flops, flops, ", ".join(problems) or "ok"))
    return checks


def config_differences(baseline: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Names of the settings (config fields, seeds, test size) in which two runs differ."""
    a, b = baseline["run"], current["run"]
    fields = sorted(set(a["config"]) | set(b["config"]))
    diffs = [f for f in fields if f not in _LOCAL_FIELDS and a["config"].get(f) != b["config"].get(f)]
    diffs += [k for k in ("seeds", "test_samples") if a.get(k) != b.get(k)]
    return diffs + (["method overrides"] if _overrides(a) != _overrides(b) else [])


def _overrides(run_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """--set values of a run, as JSON gives them back (tuples as lists)."""
    return json.loads(json.dumps(run_info.get("overrides") or {}))


def rerun(baseline: dict[str, Any], cache_dir: str | None = None) -> dict[str, Any]:
    """Run the baseline's config, methods and seeds again (no latency, no driver-agreement pass)."""
    from harness.run import run

    fields = {f.name for f in dataclasses.fields(HarnessConfig)}
    saved = {k: v for k, v in baseline["run"]["config"].items() if k in fields and k not in _LOCAL_FIELDS}
    config = HarnessConfig(**saved, cache_dir=cache_dir)
    metrics, _ = run(config, baseline["run"]["methods"], baseline["run"]["seeds"], latency=False,
                     agreement_images=0, overrides=_overrides(baseline["run"]))
    return metrics


def format_checks(checks: list[RowCheck]) -> str:
    from tabulate import tabulate

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def delta(current: float | None, base: float) -> str:
        return "-" if current is None else f"{current - base:+.2f}"

    rows = [[c.name, cell(c.baseline_top1), cell(c.current_top1), delta(c.current_top1, c.baseline_top1),
             cell(c.baseline_flops), cell(c.current_flops), delta(c.current_flops, c.baseline_flops), c.verdict]
            for c in checks]
    headers = ["method", "baseline top-1", "current top-1", "delta", "baseline FLOPs saving",
               "current FLOPs saving", "delta", "verdict"]
    return tabulate(rows, headers=headers, disable_numparse=True)
