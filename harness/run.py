"""``python -m harness run``: every chosen method on one backbone, quantizer and dataset.

For each seed the methods are fitted on the ``heads``/``gate`` traces
(fitted states are cached) and scored on ``test`` by one driver per table
(:meth:`~harness.session.Session.uses_real_driver`): under a batch-invariant
quantizer exit methods replay the traces, which costs no backbone pass;
token pruners, and every method under a batch-dependent quantizer, run the
images through the real driver. Latency comes from the real early-exit
driver, timed against full depth in paired rounds with 95% CIs
(:mod:`harness.latency`).
Every method and control is also scored at each FLOPs budget, its operating
point chosen on ``gate`` (:mod:`harness.protocol`).
Results go to ``results/<run-id>/``: ``config.json``, ``metrics.json``
(schema :data:`SCHEMA_VERSION`), ``predictions.parquet`` and ``tables.md``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness._io import atomic_path, atomic_write_text
from harness.config import HarnessConfig
from harness.controls import CONTROL_FEATURES
from harness.session import Session, run_traces
from harness.drivers import ExitOutcome, TraceView, replay, run_early_exit
from harness.errors import ConfigError
from harness.policy import METHODS, ExitPolicy, create_method
from harness.protocol import (DEFAULT_BUDGETS, OperatingPoint, best_control, control_points, method_points,
                              routing_gain, summarize)
from harness.latency import DEFAULT_IMAGES, DEFAULT_MAX_SECONDS, measure_latency
from harness.provenance import environment
from harness.results import SCHEMA_VERSION, results_json, row_latency
from harness.scoring import FullDepth


def resolve_methods(spec: str) -> list[str]:
    """``all`` or a comma-separated list -> registered method names (unknown names raise)."""
    names = METHODS.names() if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    for name in names:
        METHODS.get(name)
    return names


def parse_overrides(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``["pabee.patience=4", ...]`` -> ``{"pabee": {"patience": 4}}``; values are JSON, else strings.

    Unknown methods or config keys raise :class:`ConfigError` naming the known ones.
    """
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, raw = item.partition("=")
        method, dot, key = target.partition(".")
        if not (sep and dot and key):
            raise ConfigError(f"--set {item!r}: expected METHOD.KEY=VALUE, e.g. pabee.patience=4")
        if method not in methods:
            raise ConfigError(f"--set {item!r}: {method!r} is not among the methods of this run ({', '.join(methods)})")
        known = create_method(method).describe()["config"]
        if key not in known:
            raise ConfigError(f"--set {item!r}: {method} has no option {key!r} (options: {', '.join(known)})")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides.setdefault(method, {})[key] = tuple(value) if isinstance(value, list) else value
        try:
            create_method(method, **{key: overrides[method][key]})
        except ConfigError as exc:
            raise ConfigError(f"--set {method}.{exc}") from None
    return overrides


def check_methods(methods: list[str], overrides: dict[str, dict[str, Any]], num_blocks: int) -> None:
    """Raise ConfigError, before any work, if a method's options do not fit a ``num_blocks``-block backbone."""
    for name in methods:
        try:
            create_method(name, **overrides.get(name, {})).check_blocks(num_blocks)
        except ConfigError as exc:
            source = "--set " if name in overrides else "default option "
            raise ConfigError(f"{source}{name}.{exc} (the backbone has {num_blocks} blocks)") from None


def check_out(out: Path) -> None:
    """Raise ConfigError now, not after the run, if the results folder ``out`` cannot be written."""
    if out.exists():
        raise ConfigError(f"--out {out}: exists already; pass another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker else (exc.strerror or str(exc))
        raise ConfigError(f"--out {out}: cannot write there ({reason}); pass another --out") from None


def layer_accuracy(policy: ExitPolicy, trace, chunk: int = 4096) -> dict[int, float]:
    """Top-1 (%) of the policy's own prediction at each of its exit layers, for every test sample.

    Empty for a token policy: its features after a pruning block are not in the trace.
    """
    if policy.prunes_tokens:
        return {}
    labels = np.asarray(trace.labels)
    accuracy = {}
    with torch.no_grad():
        for layer in policy.exit_layers():
            correct = 0
            for start in range(0, len(labels), chunk):
                size = min(chunk, len(labels) - start)
                policy.start_batch(size)
                logits = policy.decide(layer, TraceView(trace, layer, np.arange(size), start)).logits
                correct += int((logits.argmax(-1).numpy() == labels[start:start + size]).sum())
            accuracy[layer] = float(100 * correct / len(labels)) if len(labels) else float("nan")
    return accuracy


def driver_agreement(session: Session, policies: dict[str, ExitPolicy], images: int) -> dict[str, Any]:
    """How often the real driver and trace replay disagree, on the first ``images`` test images.

    Replay classifies with features traced in full batches; the real driver
    drops exited samples from the batch. For a batch-invariant quantizer the
    two agree exactly (tested), and the tables are replay's; for a
    batch-dependent one (per-tensor activation scales) a sample's features
    depend on who else is still in the batch, the tables are the real
    driver's (:meth:`Session.uses_real_driver`), and this is the share of
    images whose exit layer or prediction replay would get wrong.
    ``full-depth`` isolates the effect of batch composition alone. Images the
    test trace skipped are skipped here too.
    """
    backbone, quantizer = session.quantized()
    x, indices = session.test_images(images)
    trace_indices = np.asarray(session.test.indices)
    rows = np.searchsorted(trace_indices, indices)
    if not np.array_equal(trace_indices[np.minimum(rows, len(trace_indices) - 1)], indices):
        raise RuntimeError("an image read for the agreement pass is not in the test trace")
    size = session.config.batch_size
    result: dict[str, Any] = {"images": len(x), "batch_size": size, "batch_invariant": quantizer.batch_invariant,
                              "tables_from": "replay" if quantizer.batch_invariant else "real driver",
                              "methods": {}}
    for name, policy in {"full-depth": FullDepth(), **policies}.items():
        parts = [run_early_exit(policy, backbone, x[i:i + size], session.classifier) for i in range(0, len(x), size)]
        exit_layer = np.concatenate([p.exit_layer for p in parts])
        predictions = np.concatenate([p.predictions for p in parts])
        reference = replay(policy, session.test, session.num_blocks, session.num_patches)
        result["methods"][name] = {
            "prediction": float(100 * np.mean(predictions != reference.predictions[rows])),
            "exit_layer": float(100 * np.mean(exit_layer != reference.exit_layer[rows])),
        }
    return result


def _latency(session: Session, policies: dict[str, ExitPolicy], images: int, max_seconds: float) -> dict[str, Any]:
    """:func:`~harness.latency.measure_latency` on the first ``images`` test images, measured once per fitted
    policies, settings, code and machine (CPU model and count, torch threads): a warm run reads it back, and
    ``measured_at`` says when it was taken."""
    machine = {key: value for key, value in environment().items()
               if key in ("platform", "cpu", "cpu_count", "torch_threads", "cuda")}

    def measure() -> dict[str, Any]:
        result = measure_latency(session, policies, session.test_images(images)[0], max_seconds=max_seconds)
        return {**result, "measured_at": environment()["timestamp"]}

    return session.stored_pass("latency", policies, measure, {"images": images, "max_seconds": max_seconds,
                                                              "machine": machine}, ("harness.latency", "harness.results"))


def _aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of the scalar metrics."""
    out = {}
    for key in ("top1", "top5", "flops_saving", "flops_saving_paper_formula"):
        values = [m[key] for m in per_seed]
        out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    return out


def run(config: HarnessConfig, methods: list[str], seeds: int, latency: bool = True,
        latency_images: int = DEFAULT_IMAGES, latency_seconds: float = DEFAULT_MAX_SECONDS,
        agreement_images: int = 1024,
        overrides: dict[str, dict[str, Any]] | None = None,
        budgets: tuple[float, ...] = DEFAULT_BUDGETS) -> tuple[dict[str, Any], "pd.DataFrame"]:  # noqa: F821
    """Fit and evaluate ``methods`` and the controls over ``seeds``; return (metrics, per-sample predictions).

    ``overrides`` maps a method to config values that replace its defaults
    (:func:`parse_overrides`).

    Each method and control row holds its default setting's metrics and,
    under ``operating_points``, one point per FLOPs-saving budget in
    ``budgets``, chosen on the ``gate`` split and scored on ``test``
    (:mod:`harness.protocol`); a method's points carry its routing gain over
    the best control at the same budget.

    Token pruners are evaluated under the real driver.

    ``agreement_images`` test images (0: none) also go through the real
    driver to measure its disagreement with replay (:func:`driver_agreement`).

    A method that raises while it is fitted or scored loses its row, not the
    run: the others are evaluated, and ``metrics["failures"]`` says which
    failed and why (one line each; the traceback with ``EXITBENCH_DEBUG=1``).

    Raises:
        ConfigError: before any work, for options that cannot work.
    """
    import pandas as pd
    from tqdm import tqdm

    started = time.time()
    if seeds < 1 or latency_images < 1 or agreement_images < 0:
        raise ConfigError(f"seeds ({seeds}) and latency_images ({latency_images}) must be at least 1, "
                          f"agreement_images ({agreement_images}) at least 0")
    session = Session(config)
    check_methods(methods, overrides or {}, session.num_blocks)
    seed_list = [config.seed + s for s in range(seeds)]
    for seed in seed_list:  # every trace up front: one pass over each part's images for fp32 and the quantizer
        session.seeded(seed).prepare_traces(run_traces(methods))
    c, test, labels = session.config, session.test, session.labels
    rows, frames = {}, []
    # every row's name, the one category dtype of predictions' "method" column (1 byte a sample)
    names = pd.CategoricalDtype(list(dict.fromkeys(["full-depth fp32", f"full-depth {c.quant}", *CONTROL_FEATURES,
                                                    *methods])))
    for name, quant in (("full-depth fp32", "fp32"), (f"full-depth {c.quant}", None)):
        trace = test if quant is None else session.trace(quant, "test")
        full = session.evaluate(FullDepth(), c.seed, session.full_outcome(trace))
        rows[name] = {"per_seed": [full.metrics], "kind": "baseline"}
        frames.append(_frame(name, c.seed, test, full.outcome, full.flops, names))

    fitted: dict[str, ExitPolicy] = {}
    failures: dict[str, str] = {}
    bar = tqdm(total=(len(methods) + 1) * seeds, desc="fit, choose on gate, score", unit="fit",
               disable=not session.progress)
    controls: list[dict[str, list[OperatingPoint | None]]] = []
    recalibration: dict[str, list[dict[str, Any]]] = {}  # each control's row at its default, the last block
    for seed in seed_list:
        bar.set_postfix_str(f"controls seed {seed}")
        controls.append(control_points(session, seed, budgets))
        for name in controls[-1]:
            result = session.evaluate(session.fit_control(name, seed), seed, desc=f"{name} seed {seed} (real driver)")
            recalibration.setdefault(name, []).append(result.metrics)
            frames.append(_frame(name, seed, test, result.outcome, result.flops, names))
        bar.update()
    for name, per_seed in recalibration.items():
        points = [[None if p is None else p.as_dict() for p in seed_controls[name]] for seed_controls in controls]
        control = session.fit_control(name, c.seed)
        rows[name] = {"per_seed": per_seed, "kind": control.kind, "config": control.describe()["config"],
                      "operating_points": {"per_seed": points, "summary": summarize(points, budgets)}}
    for name in methods:
        try:
            per_seed, points, method_frames = _fit_and_score(session, name, seed_list, (overrides or {}).get(name, {}),
                                                             fitted, bar, budgets, controls, names)
        except Exception as exc:  # one broken method must not lose the others' results
            failures[name] = _failure(name, exc)
            fitted.pop(name, None)
            continue
        frames += method_frames
        rows[name] = {"per_seed": per_seed, "kind": fitted[name].kind, "config": fitted[name].describe()["config"],
                      "operating_points": {"per_seed": points, "summary": summarize(points, budgets)}}
    bar.close()

    for row in rows.values():
        row["summary"] = _aggregate(row["per_seed"])
    exit_policies = {name: policy for name, policy in fitted.items() if not policy.prunes_tokens}
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "run": {**session.describe(), "methods": methods, "overrides": overrides or {}, "seeds": seeds,
                "budgets": list(budgets), "controls": list(controls[0]),
                "test_samples": len(labels), "bad_images": _bad_images(session),
                "full_depth_flops": session.full_flops, "wall_time_s": None},
        "failures": failures,
        "environment": environment(),
        "rows": rows,
        "latency": _latency(session, fitted, latency_images, latency_seconds) if latency else None,
        "driver_agreement": session.stored_pass(
            "agreement", exit_policies, lambda: driver_agreement(session, exit_policies, agreement_images),
            {"images": agreement_images}, ("harness.run",)) if agreement_images else None,
    }
    metrics["run"]["wall_time_s"] = round(time.time() - started, 1)
    return metrics, pd.concat(frames, ignore_index=True)


def _fit_and_score(session: Session, name: str, seeds: list[int], config: dict[str, Any],
                   fitted: dict[str, ExitPolicy], bar,
                   budgets: tuple[float, ...], controls: list[dict[str, list[OperatingPoint | None]]],
                   names: "pd.CategoricalDtype",  # noqa: F821
                   ) -> tuple[list[dict[str, Any]], list[list[dict[str, Any] | None]], list["pd.DataFrame"]]:  # noqa: F821
    """``name`` fitted and scored for each seed at its default setting and at each budget.

    Returns (per-seed metrics, per-seed operating points with their routing gains, per-sample frames).
    The first seed's fitted policy goes into ``fitted``.
    """
    per_seed, points, frames = [], [], []
    for seed, seed_controls in zip(seeds, controls):
        bar.set_postfix_str(f"{name} seed {seed}")
        policy = session.fit(name, seed, **config)
        fitted.setdefault(name, policy)
        result = session.evaluate(policy, seed, desc=f"{name} seed {seed} (real driver)")
        result.metrics["layer_accuracy"] = layer_accuracy(policy, session.test)
        per_seed.append(result.metrics)
        frames.append(_frame(name, seed, session.test, result.outcome, result.flops, names))
        points.append([None if point is None else {**point.as_dict(), **routing_gain(point, best_control(seed_controls, i))}
                       for i, point in enumerate(method_points(session, name, seed, budgets, config))])
        bar.update()
    return per_seed, points, frames


def _failure(name: str, exc: Exception) -> str:
    """One line saying why ``name`` failed, printed now (with the traceback under ``EXITBENCH_DEBUG=1``)."""
    import os

    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
    if os.environ.get("EXITBENCH_DEBUG"):
        traceback.print_exception(exc, file=sys.stderr)
    print(f"\nerror: method {name} failed, its row is left out: {reason}", file=sys.stderr)
    return reason


def _bad_images(session: Session) -> dict[str, list[dict]]:
    """The images skipped as unreadable in each split (split -> entries of ``ImageBatches.bad_images``)."""
    out = {}
    for name, split in session.splits.items():
        members = set(split.indices.tolist())
        out[name] = [b for b in session.trace(None, name).bad_images if b["index"] in members]
    return out


def _frame(method: str, seed: int, trace, outcome: ExitOutcome, flops: np.ndarray,
           names: "pd.CategoricalDtype") -> "pd.DataFrame":  # noqa: F821
    """One row per test sample of ``method``'s outcome for ``seed``, in the narrowest types that hold it: a run
    keeps one such frame per row and seed until ``predictions.parquet`` is written."""
    import pandas as pd

    labels = np.asarray(trace.labels)
    return pd.DataFrame({
        "method": pd.Categorical.from_codes(np.full(len(labels), names.categories.get_loc(method)), dtype=names),
        "seed": np.full(len(labels), seed, np.int64), "sample": np.asarray(trace.indices),
        "label": labels.astype(np.int32), "exit_layer": outcome.exit_layer.astype(np.int16),
        "prediction": outcome.predictions.astype(np.int32), "correct": outcome.predictions == labels,
        "flops": flops,
    })


TABLE_HEADERS = ["method", "top-1 % (95% CI)", "delta vs quant full depth", "FLOPs saving %",
                 "FLOPs saving % (paper formula)", "latency saving % (b=1 / batch)", "exits (layer: %)"]


def table_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """One row per baseline and method, in a fixed column order (:data:`TABLE_HEADERS`)."""
    quant = metrics["run"]["config"]["quant"]
    reference = metrics["rows"][f"full-depth {quant}"]["summary"]["top1"]["mean"]
    out = []
    for name, row in metrics["rows"].items():
        s, first = row["summary"], row["per_seed"][0]
        pm = lambda k: f"{s[k]['mean']:.2f}" + (f" ± {s[k]['std']:.2f}" if len(row["per_seed"]) > 1 else "")  # noqa: E731
        lat = row_latency(metrics, name)
        label = f"{name} (last block: recalibration)" if row["kind"] == "control" else name
        out.append([
            label,
            f"{pm('top1')} [{first['top1_ci'][0]:.2f}, {first['top1_ci'][1]:.2f}]",
            f"{s['top1']['mean'] - reference:+.2f}",
            pm("flops_saving"),
            pm("flops_saving_paper_formula"),
            f"{_latency_cell(lat, 'batch1')} / {_latency_cell(lat, 'throughput')}" if lat else "-",
            ", ".join(f"{layer}: {share:.1f}" for layer, share in first["exit_distribution"].items()),
        ])
    return out


def _latency_cell(latency: dict[str, Any], mode: str) -> str:
    """``saving ± CI half-width`` of one batch size (no ± without a CI: a single round)."""
    ci = latency.get(f"{mode}_saving_ci")
    saving = latency[f"{mode}_saving"]
    return f"{saving:.1f}" + (f" ± {(ci[1] - ci[0]) / 2:.1f}" if ci else "")


OPERATING_POINT_HEADERS = ["budget %", "row", "kind", "knob chosen on gate (per seed)", "test top-1 %",
                           "test FLOPs saving %", "gate top-1 / saving %", "routing gain vs best control (p per seed)"]


def _pm(stat: dict[str, Any], seeds: int) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.2f}" + (f" ± {stat['std']:.2f}" if seeds > 1 else "")


def operating_point_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """One row per (budget, control or method): the operating points chosen on ``gate``, scored on ``test``."""
    out = []
    for i, budget in enumerate(metrics["run"]["budgets"]):
        for name, row in metrics["rows"].items():
            if "operating_points" not in row:
                continue
            s = row["operating_points"]["summary"][i]
            seeds = [p[i] for p in row["operating_points"]["per_seed"]]
            if not s["reached"]:
                out.append([f"{budget:g}", name, row["kind"], "out of reach on gate", "-", "-", "-", "-"])
                continue
            knob = "/".join("fit to budget" if p is None or p["knob"] is None else f"{p['knob']:g}"
                            for p in seeds if p is not None)
            gain = "-"
            if s["routing_gain"]["mean"] is not None:
                controls = sorted({f"{p['control']}@{p['control_knob']:g}" for p in seeds if p and p.get("control")})
                gain = (f"{_pm(s['routing_gain'], s['reached'])} vs {', '.join(controls)} (p "
                        + "/".join(f"{p['routing_p']:.2g}" for p in seeds if p and p.get("routing_p") is not None)
                        + ")")
            out.append([
                f"{budget:g}", name, row["kind"],
                knob + (f" ({s['reached']} of {s['seeds']} seeds reach it)" if s["reached"] < s["seeds"] else ""),
                _pm(s["test_top1"], s["reached"]), _pm(s["test_saving"], s["reached"]),
                f"{s['gate_top1']['mean']:.2f} / {s['gate_saving']['mean']:.2f}", gain,
            ])
    return out


def format_tables(metrics: dict[str, Any], fmt: str = "github") -> str:
    from tabulate import tabulate

    run_info = metrics["run"]
    title = (f"{run_info['backbone']['model']} / {run_info['config']['quant']} / {run_info['dataset']['name']}: "
             f"{run_info['test_samples']} test images, {run_info['seeds']} seed(s)")
    data = run_info["dataset"]
    if "protocol" in data:  # recorded since the --train-root protocol
        title += f"\nsplits: {data['protocol']}; prompts: {data['templates']['name']} ({data['templates']['count']})"
    table = tabulate(table_rows(metrics), headers=TABLE_HEADERS, tablefmt=fmt, disable_numparse=True)
    text = (f"{title}\n\nOperating points: for each FLOPs-saving budget, the knob with the best gate-split "
            "top-1 among those saving at least the budget on gate (controls: the exit block); scored on test. "
            "Routing gain: test top-1 minus the control with the best gate top-1 at that budget.\n\n"
            + tabulate(operating_point_rows(metrics), headers=OPERATING_POINT_HEADERS, tablefmt=fmt,
                       disable_numparse=True)
            + f"\n\nDefault settings (knobs at their defaults, not chosen):\n\n{table}\n")
    for name, reason in (metrics.get("failures") or {}).items():
        text += f"\n{name}: FAILED, no row ({reason})\n"
    agreement = metrics.get("driver_agreement")
    if agreement:
        kind = "batch-invariant" if agreement["batch_invariant"] else "batch-dependent"
        tables_from = ("the tables above replay the traces" if agreement["batch_invariant"]
                       else "the tables above are the real driver's")
        rows = [[name, f"{d['prediction']:.2f}", f"{d['exit_layer']:.2f}"] for name, d in agreement["methods"].items()]
        text += (f"\nReal driver vs trace replay on the first {agreement['images']} test images "
                 f"(batch {agreement['batch_size']}, {kind} quantizer: {tables_from}), first seed:\n\n"
                 + tabulate(rows, headers=["method", "predictions differ %", "exit layers differ %"],
                            tablefmt=fmt, disable_numparse=True) + "\n")
    return text


def write_results(out: Path, metrics: dict[str, Any], predictions: "pd.DataFrame") -> None:  # noqa: F821
    """Write the run folder atomically: all files appear together or none does."""
    if out.exists():
        raise ConfigError(f"results folder {out} exists already; pass another --out")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        atomic_write_text(tmp / "config.json", results_json(metrics["run"]["config"]))
        atomic_write_text(tmp / "metrics.json", results_json(metrics))
        predictions.to_parquet(tmp / "predictions.parquet", index=False)
        atomic_write_text(tmp / "tables.md", format_tables(metrics))
