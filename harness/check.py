"""``python -m harness check``: regression check of a run against committed baseline results.

The current results are read from a run folder, or re-made by running the
baseline's own config, methods and seeds (latency is not compared, so it is
not measured). Every row of the baseline (full-depth baselines, controls and
methods) is compared on mean top-1 and mean FLOPs saving, and so is each
operating point (a row at a budget, chosen on the gate split) on its test
top-1 and saving.

Runs are bit-reproducible on one machine but not across CPUs: another CPU
rounds the 3-bit activations differently, a few test samples flip and the
fitted gates move. So each row's tolerance comes from measured noise:

    tolerance = max(floor, NOISE_Z x noise)
    noise     = sqrt(seeds^2 + bootstrap^2)

``seeds`` is the baseline row's std over its N seeds times sqrt(2/N), the
standard error of a difference of two N-seed means; ``bootstrap`` is the
standard error of the mean per-sample difference from a paired bootstrap over
test samples (baseline's and current ``predictions.parquet``); ``floor``
(``--tolerance`` / ``--flops-tolerance``, 0.5 points) is the smallest change
that matters. A row fails when its top-1 drops, or its FLOPs saving moves
either way, by more than its tolerance, or when it is missing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import HarnessConfig
from harness.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

# Config fields that name where things are on one machine, not what is computed.
_LOCAL_FIELDS = ("cache_dir", "threads", "workers")
# Standard errors a row may move: one-sided, 2 would fail about 1 unchanged row in 40 if
# another CPU changed a row as much as a fresh set of seeds does. Measured (AMD EPYC baseline,
# Intel Xeon re-run): method rows moved at most 0.5 standard errors; quantized full depth moved
# 0.13 points from 43 flipped samples, 1.9 bootstrap standard errors, which the floor absorbs.
NOISE_Z = 2.0
BOOTSTRAP_RESAMPLES = 1000  # enough for a standard error within about 2%
BOOTSTRAP_SEED = 0
_PREDICTION_COLUMNS = ("method", "seed", "sample", "correct", "flops")
_METRICS = ("top1", "flops_saving")


@dataclass(frozen=True)
class Tolerance:
    """How far one metric of a row may move, in percentage points, and what set it."""

    points: float
    source: str  # "floor", or the larger noise term: "seeds" or "bootstrap"


@dataclass
class RowCheck:
    """One row of the comparison; ``None`` values are missing in that file."""

    name: str
    baseline_top1: float
    current_top1: float | None
    baseline_flops: float
    current_flops: float | None
    verdict: str
    top1_tolerance: Tolerance | None = None
    flops_tolerance: Tolerance | None = None
    paired: bool = False  # whether the bootstrap term was measured (both runs' predictions of this row)

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


def _mean(row: dict[str, Any], key: str) -> float:
    return float(row["summary"][key]["mean"])


def compare(baseline: dict[str, Any], current: dict[str, Any], tolerance: float = 0.5,
            flops_tolerance: float = 0.5, baseline_predictions: pd.DataFrame | None = None,
            current_predictions: pd.DataFrame | None = None) -> list[RowCheck]:
    """Row-by-row verdicts of ``current`` against ``baseline`` (see the module docstring for the rule).

    Args:
        tolerance, flops_tolerance: floors of the top-1 and FLOPs-saving tolerances, percentage points.
        baseline_predictions, current_predictions: the runs' per-sample predictions; without
            both, tolerances come from the seed spread (and the floors) only.

    Raises:
        ConfigError: the runs differ in config, seeds or test size.
    """
    mismatched = config_differences(baseline, current)
    if mismatched:
        raise ConfigError("baseline and current runs differ in " + ", ".join(mismatched) + ": nothing to compare")
    full_flops = baseline["run"].get("full_depth_flops")
    checks = []
    for name, row in baseline["rows"].items():
        base_top1, base_flops = _mean(row, "top1"), _mean(row, "flops_saving")
        other = current["rows"].get(name)
        if other is None:
            checks.append(RowCheck(name, base_top1, None, base_flops, None, "missing"))
            continue
        bootstrap = None
        if baseline_predictions is not None and current_predictions is not None and full_flops:
            bootstrap = paired_bootstrap_se(baseline_predictions, current_predictions, name, full_flops)
        seeds = _seeds_se(row)
        top1_tol, flops_tol = (_tolerance(floor, seeds[key], None if bootstrap is None else bootstrap[key])
                               for key, floor in (("top1", tolerance), ("flops_saving", flops_tolerance)))
        top1, flops = _mean(other, "top1"), _mean(other, "flops_saving")
        problems = []
        if top1 < base_top1 - top1_tol.points:
            problems.append("top-1 drop")
        if abs(flops - base_flops) > flops_tol.points:
            problems.append("FLOPs change")
        checks.append(RowCheck(name, base_top1, top1, base_flops, flops, ", ".join(problems) or "ok",
                               top1_tol, flops_tol, bootstrap is not None))
        checks += _operating_point_checks(name, row, other, tolerance, flops_tolerance)
    return checks


def _operating_point_checks(name: str, row: dict[str, Any], other: dict[str, Any], tolerance: float,
                            flops_tolerance: float) -> list[RowCheck]:
    """One check per budget that ``row`` reached: the test top-1 and saving of its operating point.

    The tolerance comes from the seed spread and the floors (per-budget predictions are not stored,
    so there is no paired bootstrap); a budget the current run no longer reaches is missing.
    """
    current = {p["budget"]: p for p in (other.get("operating_points") or {}).get("summary", [])}
    checks = []
    for point in (row.get("operating_points") or {}).get("summary", []):
        if not point["reached"]:
            continue
        label = f"{name} @ {point['budget']:g}%"
        base_top1, base_flops = point["test_top1"]["mean"], point["test_saving"]["mean"]
        mine = current.get(point["budget"])
        if mine is None or not mine["reached"]:
            checks.append(RowCheck(label, base_top1, None, base_flops, None, "missing"))
            continue
        scale = math.sqrt(2 / point["reached"])
        top1_tol = _tolerance(tolerance, (point["test_top1"]["std"] or 0.0) * scale, None)
        flops_tol = _tolerance(flops_tolerance, (point["test_saving"]["std"] or 0.0) * scale, None)
        top1, flops = mine["test_top1"]["mean"], mine["test_saving"]["mean"]
        problems = (["top-1 drop"] if top1 < base_top1 - top1_tol.points else []) + \
                   (["FLOPs change"] if abs(flops - base_flops) > flops_tol.points else [])
        checks.append(RowCheck(label, base_top1, top1, base_flops, flops, ", ".join(problems) or "ok",
                               top1_tol, flops_tol))
    return checks


def _seeds_se(row: dict[str, Any]) -> dict[str, float]:
    """Standard error of a difference of two N-seed means of this row, from its std over seeds."""
    n = len(row["per_seed"])
    return {key: (row["summary"][key]["std"] or 0.0) * math.sqrt(2 / n) for key in _METRICS}


def _tolerance(floor: float, seeds: float, bootstrap: float | None) -> Tolerance:
    noise = NOISE_Z * math.hypot(seeds, bootstrap or 0.0)
    if noise <= floor:
        return Tolerance(floor, "floor")
    return Tolerance(noise, "seeds" if seeds >= (bootstrap or 0.0) else "bootstrap")


def paired_bootstrap_se(baseline: pd.DataFrame, current: pd.DataFrame, name: str,
                        full_depth_flops: float) -> dict[str, float] | None:
    """Bootstrap standard errors of the current-minus-baseline mean top-1 and FLOPs saving of row ``name``.

    Paired: each test sample's current-minus-baseline difference (mean over
    seeds) is resampled as one unit, so what the two runs share cancels and
    only samples that changed add noise. Seeded: the same inputs give the
    same numbers.

    Returns:
        {"top1": points, "flops_saving": points}, or None when either frame lacks the row.
    """
    import numpy as np
    from scipy.stats import bootstrap

    base, cur = _per_sample(baseline, name, full_depth_flops), _per_sample(current, name, full_depth_flops)
    if base is None or cur is None:
        return None
    base, cur = base.align(cur, join="inner", axis=0)
    if base.empty:
        return None
    out = {}
    for key in _METRICS:
        difference = (cur[key] - base[key]).to_numpy()
        if not difference.any():  # every resample gives 0 (and scipy warns on a degenerate distribution)
            out[key] = 0.0
            continue
        result = bootstrap((difference,), np.mean, vectorized=True, n_resamples=BOOTSTRAP_RESAMPLES, batch=250,
                           method="percentile", rng=np.random.default_rng(BOOTSTRAP_SEED))
        out[key] = float(result.standard_error)
    return out


def _per_sample(predictions: pd.DataFrame, name: str, full_depth_flops: float) -> pd.DataFrame | None:
    """Per test sample, mean over seeds: top-1 (100 if correct) and FLOPs saving, in percent; None: no such row."""
    import pandas as pd

    rows = predictions[predictions["method"] == name]
    if rows.empty:
        return None
    values = pd.DataFrame({"sample": rows["sample"], "top1": rows["correct"].astype(float) * 100.0,
                           "flops_saving": 100.0 * (1.0 - rows["flops"] / full_depth_flops)})
    return values.groupby("sample").mean()


def read_predictions(metrics_file: str | Path) -> pd.DataFrame | None:
    """The ``predictions.parquet`` beside a run's ``metrics.json``; None when there is none.

    Raises:
        ConfigError: the file lacks a column that the paired bootstrap needs.
    """
    import pandas as pd

    file = Path(metrics_file).parent / "predictions.parquet"
    if not file.is_file():
        return None
    predictions = pd.read_parquet(file)
    missing = [c for c in _PREDICTION_COLUMNS if c not in predictions.columns]
    if missing:
        raise ConfigError(f"{file}: no column {', '.join(missing)} (written by another harness version?)")
    return predictions


def config_differences(baseline: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Names of the settings (config fields, seeds, test size) in which two runs differ.

    A field that one file lacks (written before the option existed) counts as its default.
    """
    a, b = baseline["run"], current["run"]
    defaults = {f.name: f.default for f in dataclasses.fields(HarnessConfig)}
    fields = sorted(set(a["config"]) | set(b["config"]))
    diffs = [f for f in fields if f not in _LOCAL_FIELDS
             and a["config"].get(f, defaults.get(f)) != b["config"].get(f, defaults.get(f))]
    diffs += [k for k in ("seeds", "test_samples", "budgets") if a.get(k) != b.get(k)]
    return diffs + (["method overrides"] if _overrides(a) != _overrides(b) else [])


def _overrides(run_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """--set values of a run, as JSON gives them back (tuples as lists)."""
    return json.loads(json.dumps(run_info.get("overrides") or {}))


def rerun(baseline: dict[str, Any], cache_dir: str | None = None) -> tuple[dict[str, Any], pd.DataFrame]:
    """Run the baseline's config, methods and seeds again (no latency, no driver-agreement pass).

    Returns:
        (metrics, per-sample predictions), as :func:`harness.run.run` gives them.
    """
    from harness.run import run

    fields = {f.name for f in dataclasses.fields(HarnessConfig)}
    saved = {k: v for k, v in baseline["run"]["config"].items() if k in fields and k not in _LOCAL_FIELDS}
    config = HarnessConfig(**saved, cache_dir=cache_dir)
    return run(config, baseline["run"]["methods"], baseline["run"]["seeds"], latency=False,
               agreement_images=0, overrides=_overrides(baseline["run"]), budgets=tuple(baseline["run"]["budgets"]))


def format_checks(checks: list[RowCheck]) -> str:
    """The comparison table: per row and metric, baseline, current, delta and the tolerance used (and its source)."""
    from tabulate import tabulate

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def delta(current: float | None, base: float) -> str:
        return "-" if current is None else f"{current - base:+.2f}"

    def allowed(tol: Tolerance | None, sign: str) -> str:
        return "-" if tol is None else f"{sign}{tol.points:.2f} ({tol.source})"

    rows = [[c.name, cell(c.baseline_top1), cell(c.current_top1), delta(c.current_top1, c.baseline_top1),
             allowed(c.top1_tolerance, "-"), cell(c.baseline_flops), cell(c.current_flops),
             delta(c.current_flops, c.baseline_flops), allowed(c.flops_tolerance, "±"), c.verdict]
            for c in checks]
    headers = ["method", "baseline top-1", "current top-1", "delta", "allowed", "baseline FLOPs saving",
               "current FLOPs saving", "delta", "allowed", "verdict"]
    return tabulate(rows, headers=headers, disable_numparse=True)


def report(checks: list[RowCheck], baseline: dict[str, Any], current: dict[str, Any]) -> tuple[str, bool]:
    """(text, passed): the table, both runs' CPUs, where the tolerances came from, and the verdict."""
    base_cpu, cur_cpu = _cpu(baseline), _cpu(current)
    other_cpu = base_cpu != cur_cpu
    lines = [format_checks(checks), "",
             f"CPU: baseline {base_cpu}, current {cur_cpu}" + (" (different CPUs)" if other_cpu else ""),
             f"allowed = max(floor, {NOISE_Z:g} x noise), noise = sqrt(seeds^2 + bootstrap^2); floor: --tolerance / "
             "--flops-tolerance;",
             "seeds: baseline std over its N seeds x sqrt(2/N); bootstrap: standard error of the mean per-sample "
             f"difference, test samples resampled in pairs ({BOOTSTRAP_RESAMPLES} resamples)"]
    unpaired = [c.name for c in checks if c.current_top1 is not None and not c.paired and "@" not in c.name]
    if unpaired:
        lines.append("no paired predictions (predictions.parquet missing, or the row absent from it) for "
                     + ", ".join(unpaired) + ": their tolerance comes from the seed spread and floor only")
    if any("@" in c.name for c in checks):
        lines.append("ROW @ B%: the row's operating point at budget B, chosen on gate; its tolerance comes from "
                     "the seed spread and floor (per-budget predictions are not stored)")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        lines.append(f"FAILED: {', '.join(failed)}")
        return "\n".join(lines), False
    exact = all((c.current_top1, c.current_flops) == (c.baseline_top1, c.baseline_flops) for c in checks)
    if exact:
        lines.append("passed: identical to the baseline" + (f" (on another CPU than {base_cpu})" if other_cpu else ""))
    else:
        lines.append("passed: within tolerance of the baseline")
    return "\n".join(lines), True


def _cpu(metrics: dict[str, Any]) -> str:
    return (metrics.get("environment") or {}).get("cpu") or "unknown"
