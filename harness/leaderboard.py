"""``python -m harness leaderboard``: one static HTML page from any number of run folders.

The page is built only from results files (``metrics.json`` written by
``python -m harness run``): a sortable, filterable table with one row per
backbone, dataset, quantizer, method (or control) and config at its default
setting, and one per operating point chosen on the gate split at each
FLOPs budget (also written as CSV beside the page), a top-1 vs FLOPs saving
Pareto plot, each row's exit distribution, and every run's config and
environment. CSS, SVG and script are inline, so the page opens from disk
with no network. Every string from a results file is HTML-escaped, and the
page records no machine paths (:func:`harness.results.without_machine_paths`).
The template is package data (``harness/templates``), so installed copies
render the page too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from markupsafe import Markup

from harness._io import atomic_write_text
from harness.errors import ConfigError
from harness.evaluate import pareto_front
from harness.results import find_runs, read_metrics, row_latency, without_machine_paths

TEMPLATE = resources.files("harness") / "templates" / "leaderboard.html.j2"
# Okabe-Ito, without its yellow (too light on white): distinct for colour-blind readers.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read the ``metrics.json`` of every run folder at or below each path (or each metrics file given).

    Args:
        paths: folders holding folders written by ``python -m harness run`` at any
            depth (``results/``), such run folders, or their ``metrics.json`` files.

    Returns:
        One dict per run, in the order of ``paths`` and, below each folder, in sorted
        order: ``path`` (the metrics file from the given folder's name down, e.g.
        ``results/RUN/metrics.json``), ``label`` (its folder, shown the same way),
        ``anchor`` (an HTML id unique on the page) and ``metrics`` (without machine paths).

    Raises:
        ConfigError: a folder with no run below it; a metrics file that is missing, not
            JSON, of another schema version or lacking a key the page reads.
    """
    results = []
    for given in paths:
        for file in find_runs(given):
            _, metrics = read_metrics(file)
            shown = _shown_path(file, Path(given))
            label = shown.rpartition("/")[0] or shown
            results.append({"path": shown, "label": label, "anchor": f"run-{len(results)}-{_slug(label)}",
                            "metrics": without_machine_paths(metrics)})
    return results


def _shown_path(file: Path, given: Path) -> str:
    """``file`` from the given folder's name down: ``results/RUN/metrics.json``, not this machine's folders."""
    root = os.path.abspath(given if given.is_dir() else file.parent)
    return Path(os.path.relpath(os.path.abspath(file), os.path.dirname(root))).as_posix()


def leaderboard_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (backbone, dataset, quantizer, method, config) over ``results``, in the order given.

    The config is the run's (as :func:`load_results` gives it: without machine
    fields such as the cache folder), its seed count and the method's own. A row found again in a later results file (a rerun) is
    shown once, with the later file's numbers. Percentages are in percent;
    values a run did not record (latency skipped, non-finite numbers) are None.
    ``net_rescue_pct`` is (rescued - lost) over the test samples, against
    full depth under the same quantizer; the CI is the first seed's. Runs of
    other weights (another ``weights_sha256``) are other rows.
    """
    rows: dict[tuple[str, ...], dict[str, Any]] = {}
    for result in results:
        metrics = result["metrics"]
        run = metrics["run"]
        config = run["config"]
        quant = config["quant"]
        backbone = str((run.get("backbone") or {}).get("model") or config["model"])
        dataset = str((run.get("dataset") or {}).get("name") or config["data"])
        reference = metrics["rows"].get(f"full-depth {quant}")
        reference_top1 = _number(reference["summary"]["top1"]["mean"]) if reference else None
        for name, row in metrics["rows"].items():
            first, top1 = row["per_seed"][0], row["summary"]["top1"]
            lat = row_latency(metrics, name) or {}
            quadrants = first["quadrants"]
            samples = sum(quadrants[k] for k in ("both_correct", "rescued", "lost", "both_wrong"))
            exits = sorted((int(layer), float(share)) for layer, share in first["exit_distribution"].items())
            total_share = sum(share for _, share in exits)
            mean = _number(top1["mean"])
            low, high = first["top1_ci"]
            # checkpoint paths are cut to their file name (no machine paths): the digest tells weights apart
            weights = (run.get("backbone") or {}).get("weights_sha256")
            key = (backbone, dataset, str(quant), name,
                   json.dumps([config, weights, run.get("seeds"), row.get("config")], sort_keys=True, default=str))
            kind = row.get("kind", "method")
            rows[key] = {
                "anchor": result["anchor"], "run": result["label"],
                "backbone": backbone, "dataset": dataset, "quantizer": str(quant), "method": name,
                "kind": kind, "method_config": row.get("config"), "point": DEFAULT_POINT[kind], "budget": None,
                "knobs": None, "routing_gain": None,
                "seeds": len(row["per_seed"]), "test_samples": run.get("test_samples"),
                "top1_mean": mean, "top1_std": _number(top1["std"]),
                "top1_ci": (_number(low), _number(high)),
                "delta": mean - reference_top1 if mean is not None and reference_top1 is not None else None,
                "flops_saving": _number(row["summary"]["flops_saving"]["mean"]),
                "latency_throughput_saving": _number(lat.get("throughput_saving")),
                "latency_batch1_saving": _number(lat.get("batch1_saving")),
                "net_rescue": quadrants["net_rescue"],
                "net_rescue_pct": 100 * quadrants["net_rescue"] / samples if samples else None,
                "exits": exits,
                "mean_exit": sum(layer * share for layer, share in exits) / total_share if total_share else None,
                "num_blocks": (run.get("backbone") or {}).get("blocks"),
            }
            for point in (row.get("operating_points") or {}).get("summary", []):
                if point["reached"]:
                    rows[(*key, str(point["budget"]))] = _budget_row(rows[key], point, reference_top1)
    return list(rows.values())


# What a row's "operating point" column says for a row measured at its default setting, by kind
DEFAULT_POINT = {"baseline": "full depth", "control": "last block (recalibration)", "method": "default knob"}


def _budget_row(row: dict[str, Any], point: dict[str, Any], reference_top1: float | None) -> dict[str, Any]:
    """``row``'s method at one budget: its operating point chosen on gate, scored on test (seed means)."""
    mean = _number(point["test_top1"]["mean"])
    knobs = ["fit to budget" if k is None else f"{k:g}" for k in point["knobs"]]
    return {
        **row, "point": f"≥ {point['budget']:g}% saving on gate", "budget": point["budget"],
        "knobs": "/".join(knobs), "seeds": point["reached"],
        "top1_mean": mean, "top1_std": _number(point["test_top1"]["std"]), "top1_ci": (None, None),
        "delta": mean - reference_top1 if mean is not None and reference_top1 is not None else None,
        "flops_saving": _number(point["test_saving"]["mean"]),
        "routing_gain": _number((point.get("routing_gain") or {}).get("mean")),
        "latency_throughput_saving": None, "latency_batch1_saving": None,
        "net_rescue": None, "net_rescue_pct": None, "exits": [], "mean_exit": None,
    }


CSV_COLUMNS = ("backbone", "dataset", "quantizer", "method", "kind", "point", "budget", "knobs", "seeds",
               "test_samples", "top1_mean", "top1_std", "delta", "flops_saving", "routing_gain",
               "latency_throughput_saving", "latency_batch1_saving", "net_rescue_pct", "mean_exit", "run")
CSV_NAME = "leaderboard.csv"


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """The table's rows as CSV text (:data:`CSV_COLUMNS`; empty cells for values a run did not record)."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow(["" if r[c] is None else r[c] for c in CSV_COLUMNS])
    return text.getvalue()


def pareto_svg(rows: list[dict[str, Any]]) -> Markup:
    """Top-1 (y) against FLOPs saving (x) as inline SVG: one point per row, one colour per
    backbone / dataset / quantizer, and that group's Pareto front as a dashed line.

    Baselines are squares, methods circles; hovering a point names its row. Every
    element carries its row's backbone, dataset and quantizer, so the page's
    filters hide it with the table rows.
    """
    points = [r for r in rows if r["flops_saving"] is not None and r["top1_mean"] is not None]
    if not points:
        return Markup('<svg class="pareto" width="400" height="40" role="img"><text x="0" y="24">'
                      "no row has both top-1 and FLOPs saving</text></svg>")
    groups = list(dict.fromkeys(_group(r) for r in points))
    colour = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    frame = _Frame(left=60, top=16, width=650, height=340,
                   xs=_ticks(min(0.0, *(r["flops_saving"] for r in points)), max(r["flops_saving"] for r in points)),
                   ys=_ticks(min(r["top1_mean"] for r in points), max(r["top1_mean"] for r in points)))
    width, legend_top = frame.left + frame.width + 190, frame.top + frame.height + 56
    height = legend_top + 18 * len(groups) + 8
    parts = [Markup('<svg class="pareto" width="{0}" height="{1}" viewBox="0 0 {0} {1}" role="img" '
                    'aria-label="top-1 against FLOPs saving">').format(width, height), frame.axes()]
    for group in groups:
        front = pareto_front([r for r in points if _group(r) == group], accuracy="top1_mean")
        if len(front) > 1:
            coords = " ".join(f"{frame.px(r['flops_saving']):.1f},{frame.py(r['top1_mean']):.1f}" for r in front)
            parts.append(Markup('<polyline class="front" {} points="{}" stroke="{}"/>')
                         .format(_filter_attributes(front[0]), coords, colour[group]))
    for r in points:
        x, y, fill = frame.px(r["flops_saving"]), frame.py(r["top1_mean"]), colour[_group(r)]
        shape = (Markup('<rect x="{:.1f}" y="{:.1f}" width="8" height="8" fill="{}"/>').format(x - 4, y - 4, fill)
                 if r["kind"] == "baseline" else
                 Markup('<circle cx="{:.1f}" cy="{:.1f}" r="4.5" fill="{}"/>').format(x, y, fill))
        hover = (f"{r['method']} ({' / '.join(_group(r))}, {r['run']}): "
                 f"top-1 {r['top1_mean']:.2f}%, FLOPs saving {r['flops_saving']:.1f}%")
        parts.append(Markup('<g class="pt" {}>{}<title>{}</title></g>').format(_filter_attributes(r), shape, hover))
    taken: list[tuple[float, float, float, float]] = []
    for cluster in _clusters(points, frame):
        names = list(dict.fromkeys(r["method"] for r in cluster))
        text = ", ".join(names[:2]) + (f" +{len(names) - 2}" if len(names) > 2 else "")
        box = _place_label(text, frame.px(cluster[0]["flops_saving"]), frame.py(cluster[0]["top1_mean"]),
                           taken, (frame.left, width))
        if box:  # a label with no free spot near its point is left out; hovering the point still names it
            taken.append(box)
            parts.append(Markup('<text class="label" {} x="{:.1f}" y="{:.1f}" fill="{}">{}</text>')
                         .format(_filter_attributes(cluster[0]), box[0], box[3] - 2, colour[_group(cluster[0])], text))
    for i, group in enumerate(groups):
        first = next(r for r in points if _group(r) == group)
        parts.append(Markup('<g class="legend" {}><rect x="{}" y="{}" width="10" height="10" fill="{}"/>'
                            '<text x="{}" y="{}">{}</text></g>')
                     .format(_filter_attributes(first), frame.left, legend_top + 18 * i - 9, colour[group],
                             frame.left + 16, legend_top + 18 * i, " / ".join(group)))
    parts.append(Markup('<text class="tick" x="{}" y="{}">&#9632; full depth &#160; &#9679; exit method &#160; '
                        "- - - Pareto front of a colour</text>").format(frame.left, legend_top + 18 * len(groups)))
    parts.append(Markup("</svg>"))
    return Markup("").join(parts)


@dataclasses.dataclass(frozen=True)
class _Frame:
    """The plot area in pixels, and the tick values its edges sit on."""

    left: float
    top: float
    width: float
    height: float
    xs: list[float]
    ys: list[float]

    def px(self, x: float) -> float:
        return self.left + (x - self.xs[0]) / (self.xs[-1] - self.xs[0]) * self.width

    def py(self, y: float) -> float:
        return self.top + self.height - (y - self.ys[0]) / (self.ys[-1] - self.ys[0]) * self.height

    def axes(self) -> Markup:
        """Grid lines, tick labels, the frame and the axis titles."""
        bottom, right = self.top + self.height, self.left + self.width
        parts = [Markup('<line class="grid" x1="{0:.1f}" x2="{0:.1f}" y1="{1}" y2="{2}"/>'
                        '<text class="tick" x="{0:.1f}" y="{3}" text-anchor="middle">{4}</text>')
                 .format(self.px(x), self.top, bottom, bottom + 16, _tick_label(x)) for x in self.xs]
        parts += [Markup('<line class="grid" x1="{0}" x2="{1}" y1="{2:.1f}" y2="{2:.1f}"/>'
                         '<text class="tick" x="{3}" y="{4:.1f}" text-anchor="end">{5}</text>')
                  .format(self.left, right, self.py(y), self.left - 6, self.py(y) + 4, _tick_label(y)) for y in self.ys]
        parts.append(Markup('<rect class="frame" x="{}" y="{}" width="{}" height="{}"/>'
                            '<text class="axis" x="{}" y="{}" text-anchor="middle">FLOPs saving (%)</text>'
                            '<text class="axis" transform="translate(16 {}) rotate(-90)" text-anchor="middle">'
                            "top-1 (%)</text>")
                     .format(self.left, self.top, self.width, self.height, self.left + self.width / 2, bottom + 36,
                             self.top + self.height / 2))
        return Markup("").join(parts)


def exit_bar_svg(exits: list[tuple[int, float]], num_blocks: int | None) -> Markup:
    """A 120-pixel stacked bar of the share of samples leaving at each layer (full depth grey)."""
    deepest = num_blocks or max((layer for layer, _ in exits), default=1)
    parts = [Markup('<svg class="exits" width="120" height="12" role="img" aria-label="{}">')
             .format(", ".join(f"layer {layer}: {share:.1f}%" for layer, share in exits))]
    x = 0.0
    for layer, share in exits:
        # early exits green, late ones blue; samples that ran every block grey
        fill = "#9aa3ad" if layer >= deepest else f"hsl({140 + 80 * layer / deepest:.0f}, 60%, 45%)"
        parts.append(Markup('<rect x="{:.2f}" y="0" width="{:.2f}" height="12" fill="{}">'
                            "<title>layer {}: {:.1f}%</title></rect>")
                     .format(x, 1.2 * share, fill, layer, share))
        x += 1.2 * share
    parts.append(Markup("</svg>"))
    return Markup("").join(parts)


def render(results: list[dict[str, Any]]) -> str:
    """The leaderboard page of ``results`` (from :func:`load_results`) as HTML text."""
    return _render(results, leaderboard_rows(results))


def write(results: list[dict[str, Any]], out: Path) -> tuple[Path, int]:
    """Render ``results`` (from :func:`load_results`) to ``out`` atomically.

    Args:
        results: the runs to show.
        out: the HTML file to write, or an existing folder to write ``index.html`` into.

    Returns:
        The page written and the number of table rows. The rows also go to
        :data:`CSV_NAME` beside the page, which links to it.

    Raises:
        ConfigError: ``out`` cannot be written (a file in its path, no permission).

    Example:
        >>> write(load_results(["results"]), Path("leaderboard"))
        (PosixPath('leaderboard/index.html'), 6)
    """
    out = Path(out) / "index.html" if Path(out).is_dir() else Path(out)
    rows = leaderboard_rows(results)
    page = _render(results, rows)
    try:
        atomic_write_text(out, page)
        atomic_write_text(out.parent / CSV_NAME, rows_csv(rows))
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out, len(rows)


def _render(results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.globals["exit_bar"] = exit_bar_svg
    filters = {key: sorted({r[key] for r in rows}) for key in ("backbone", "dataset", "quantizer")}
    return env.from_string(TEMPLATE.read_text(encoding="utf-8")).render(
        rows=rows, runs=[_run_card(r) for r in results], filters=filters, pareto=pareto_svg(rows), csv_name=CSV_NAME)


def _run_card(result: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of one results file: identity, size, time, and its configs as JSON text."""
    metrics = result["metrics"]
    run, environment = metrics["run"], metrics.get("environment") or {}
    method_configs = {name: row["config"] for name, row in metrics["rows"].items() if row.get("config") is not None}
    return {
        "anchor": result["anchor"], "label": result["label"], "path": result["path"],
        "backbone": (run.get("backbone") or {}).get("model") or run["config"]["model"],
        "dataset": (run.get("dataset") or {}).get("name") or run["config"]["data"],
        "quantizer": run["config"]["quant"], "seeds": run.get("seeds"), "test_samples": run.get("test_samples"),
        "wall_time_s": run.get("wall_time_s"), "timestamp": environment.get("timestamp"),
        "git_revision": environment.get("git_revision"),
        "config_json": json.dumps(run["config"], indent=2, default=str),
        "method_configs_json": json.dumps(method_configs, indent=2, default=str) if method_configs else None,
        "environment_json": json.dumps(environment, indent=2, default=str),
    }


def _number(value: Any) -> float | None:
    """A finite float, or None for a value the run did not record (null, NaN)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")


def _group(row: dict[str, Any]) -> tuple[str, str, str]:
    return row["backbone"], row["dataset"], row["quantizer"]


def _filter_attributes(row: dict[str, Any]) -> Markup:
    return Markup('data-backbone="{}" data-dataset="{}" data-quantizer="{}"').format(*_group(row))


def _clusters(points: list[dict[str, Any]], frame: _Frame) -> list[list[dict[str, Any]]]:
    """Points of one backbone / dataset / quantizer lying within 4 pixels of each other share a label."""
    clusters: list[list[dict[str, Any]]] = []
    for r in points:
        for cluster in clusters:
            c = cluster[0]
            if (_group(c) == _group(r) and abs(frame.px(c["flops_saving"]) - frame.px(r["flops_saving"])) < 4
                    and abs(frame.py(c["top1_mean"]) - frame.py(r["top1_mean"])) < 4):
                cluster.append(r)
                break
        else:
            clusters.append([r])
    return clusters


def _place_label(text: str, x: float, y: float, taken: list[tuple[float, float, float, float]],
                 bounds: tuple[float, float]) -> tuple[float, float, float, float] | None:
    """A free box (x0, y0, x1, y1) for ``text`` right of the point at (x, y), else left of it, else None."""
    width = 6.2 * len(text)  # 11 px sans-serif, roughly
    for dy in (0, 12, -12, 24, -24):
        for x0 in (x + 7, x - 7 - width):
            box = (x0, y + dy - 8, x0 + width, y + dy + 5)
            if bounds[0] <= box[0] and box[2] <= bounds[1] and not any(
                    box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3] for t in taken):
                return box
    return None


def _ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering [low, high]."""
    if high - low < 1e-9:
        low, high = low - 1, high + 1
    raw = (high - low) / (count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    start, stop = math.floor(low / step), math.ceil(high / step)
    return [i * step for i in range(start, stop + 1)]


def _tick_label(value: float) -> str:
    return f"{value:.10g}" if abs(value) >= 1e-9 else "0"
