"""Experiments that end in tables: ``main`` (Table 1), ``ablation`` (Table 3), ``rescue`` (Table 4)."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from harness import evaluate
from harness.errors import ConfigError
from harness.experiments import experiment
from harness.experiments.report import Report, paper_numbers
from harness.scoring import Evaluation
from harness.session import Session

LRA = "lra-ee"
# --factor names that are not LRA-EE config keys, and their level spellings
FACTOR_ALIASES = {"head": ("feature", {"ssa": "patch_mean", "cls": "cls"})}
# Table 3 of the paper: (label, LRA-EE switches); None is the quantized full-depth model itself
PAPER_ABLATION: list[tuple[str, dict[str, str] | None]] = [
    ("(i) int8 baseline, cls, full depth", None),
    ("(ii) ssa-last, hard", {"feature": "patch_mean", "supervision": "hard", "routing": "last"}),
    ("(iii) ssa-last, distilled", {"feature": "patch_mean", "supervision": "distilled", "routing": "last"}),
    ("(iv) lra-ee, hard", {"feature": "patch_mean", "supervision": "hard", "routing": "adaptive"}),
    ("(v) lra-ee, distilled", {"feature": "patch_mean", "supervision": "distilled", "routing": "adaptive"}),
]


def pm(values: list[float]) -> str:
    """mean +- std over seeds (std only with more than one seed)."""
    return f"{np.mean(values):.2f}" + (f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else "")


def over_seeds(session: Session, seeds: int, method: str, **config: Any) -> list[Evaluation]:
    """Evaluate ``method`` with ``config`` once per seed (the tables report means over seeds, no bootstrap CIs)."""
    base = session.config.seed
    return [session.evaluate(session.fit(method, base + s, **config), base + s, intervals=False) for s in range(seeds)]


def _paper(table: str, label: str, key: str) -> str:
    value = paper_numbers(table).get(label, {}).get(key)
    return "-" if value is None else f"{value:.2f}"


@experiment("main", "Table 1: fp32 and quantized full depth, LRA-EE with a global threshold and with LCT")
def main(session: Session, seeds: int, options: dict[str, Any]) -> Report:
    report = Report("main")
    quant = session.config.quant
    reference = session.zero_shot_top1()
    rows = [["fp32 full depth", f"{session.zero_shot_top1('fp32'):.2f}", "0.00", "-", "-", "-"],
            [f"{quant} full depth", f"{reference:.2f}", "0.00", "+0.00", _paper("main", "int8 full depth", "top1"),
             _paper("main", "int8 full depth", "flops_saving")]]
    measured = {}

    def lra_row(label: str, paper_label: str, session_: Session, **switches: str) -> None:
        runs = [e.metrics for e in over_seeds(session_, seeds, LRA, **switches)]
        top1, saving = [m["top1"] for m in runs], [m["flops_saving"] for m in runs]
        measured[label] = {"top1": top1, "flops_saving": saving}
        rows.append([label, pm(top1), pm(saving), f"{np.mean(top1) - reference:+.2f}",
                     _paper("main", paper_label, "top1"), _paper("main", paper_label, "flops_saving")])

    lra_row("LRA-EE initial (global threshold)", "lra-ee initial (global threshold)", session, thresholds="global")
    lra_row("LRA-EE optimized (LCT)", "lra-ee optimized (lct)", session, thresholds="lct")
    smooth = session.derived(quant=f"smoothquant-{quant}")
    smooth_full = smooth.zero_shot_top1()
    rows.append([f"smoothquant-{quant} full depth", f"{smooth_full:.2f}", "0.00", f"{smooth_full - reference:+.2f}",
                 "-", "-"])
    lra_row("LRA-EE + SmoothQuant", "lra-ee + smoothquant", smooth)
    measured["LRA-EE + SmoothQuant"]["full_depth_top1"] = smooth_full
    report.table(f"Main results ({len(session.labels)} test images, {seeds} seed(s))",
                 ["configuration", "top-1 %", "FLOPs saving %", "delta vs quant", "paper top-1 %",
                  "paper FLOPs saving %"], rows,
                 note=f"Paper columns: the paper's INT8 ViT-B/32 ImageNet numbers, not ours. SmoothQuant rows: "
                      f"per-channel smoothing (alpha 0.5, calibrated on "
                      f"{smooth.quantized()[1].config()['calibration']['images']} gate images of the first "
                      f"seed) folded into the weights, then {quant}; deltas are against "
                      f"{quant} full depth.")
    report.data = {"reference_top1": reference, "measured": measured}
    return report


def parse_factors(items: list[str]) -> dict[str, list[str]]:
    """``["head=cls,ssa", "routing=last,adaptive"]`` -> LRA-EE config key -> levels (validated)."""
    from harness.policy import create_method

    known = create_method(LRA).describe()["config"]
    factors: dict[str, list[str]] = {}
    for item in items:
        name, sep, levels = item.partition("=")
        key, spelling = FACTOR_ALIASES.get(name, (name, {}))
        if not sep or key not in known:
            raise ConfigError(f"--factor {item!r}: expected NAME=LEVEL,LEVEL with NAME an lra-ee option "
                              f"({', '.join(['head', *known])})")
        factors[key] = [spelling.get(level, level) for level in levels.split(",") if level]
    return factors


def design(factors: dict[str, list[str]]) -> list[dict[str, str]]:
    """Full factorial design: every combination of the factors' levels."""
    keys = list(factors)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(factors[k] for k in keys))]


def effects(cells: list[dict[str, str]], correct: np.ndarray, factors: dict[str, list[str]],
            seed: int = 0) -> list[list[str]]:
    """Main effects and two-factor interactions (top-1 points) of a two-level design, with bootstrap CIs.

    ``correct`` is [cells, N]: per test sample, the correctness of each cell
    (averaged over seeds). An effect is a contrast over cells, so its CI comes
    from resampling the test samples, paired across cells.
    """
    two_level = [k for k in factors if len(factors[k]) == 2]
    sign = {k: np.array([1.0 if c[k] == factors[k][1] else -1.0 for c in cells]) for k in two_level}
    rows = []
    terms = [(k,) for k in two_level] + list(itertools.combinations(two_level, 2))
    for term in terms:
        weights = np.prod([sign[k] for k in term], axis=0) / (len(cells) / 2)
        per_sample = 100 * (weights @ correct)
        low, high = evaluate.bootstrap_ci(per_sample, seed=seed)
        label = (f"{term[0]}: {factors[term[0]][1]} vs {factors[term[0]][0]}" if len(term) == 1
                 else " x ".join(term))
        rows.append([label, f"{per_sample.mean():+.2f}", f"[{low:+.2f}, {high:+.2f}]"])
    return rows


@experiment("ablation", "Table 3: factorial ablation of LRA-EE switches (default: the paper's five configurations)")
def ablation(session: Session, seeds: int, options: dict[str, Any]) -> Report:
    report = Report("ablation")
    reference = session.zero_shot_top1()
    factors = parse_factors(options.get("factor") or [])
    cells: list[tuple[str, dict[str, str] | None]] = (
        [(", ".join(f"{k}={v}" for k, v in cell.items()), cell) for cell in design(factors)] if factors
        else PAPER_ABLATION)
    rows, correct, measured = [], [], {}
    for label, switches in cells:
        if switches is None:
            top1, saving = [reference], [0.0]
            correct.append(session.baseline_correct.astype(float))
        else:
            runs = over_seeds(session, seeds, LRA, **switches)
            top1, saving = [e.metrics["top1"] for e in runs], [e.metrics["flops_saving"] for e in runs]
            correct.append(np.mean([e.correct for e in runs], axis=0))
        measured[label] = {"switches": switches, "top1": top1, "flops_saving": saving}
        rows.append([label, pm(saving), pm(top1), f"{np.mean(top1) - reference:+.2f}",
                     _paper("ablation", label, "flops_saving"), _paper("ablation", label, "top1")])
    report.table(f"Ablation ({len(session.labels)} test images, {seeds} seed(s))",
                 ["configuration", "FLOPs saving %", "top-1 %", "delta vs quant", "paper FLOPs saving %",
                  "paper top-1 %"], rows,
                 note="Paper columns: the paper's INT8 ViT-B/32 ImageNet numbers (Table 3), only for its five "
                      "configurations.")
    if factors:
        report.table("Main effects and interactions (top-1 points, 95% bootstrap CI over test samples)",
                     ["effect", "estimate", "95% CI"],
                     effects([c for _, c in cells], np.asarray(correct), factors, seed=session.config.seed))
    else:
        contrasts = {"architecture (ii)-(i)": (1, 0), "distillation (iii)-(ii)": (2, 1),
                     "early exit, hard (iv)-(ii)": (3, 1), "early exit, distilled (v)-(iii)": (4, 2),
                     "early exit alone (iv)-(i)": (3, 0)}
        c = np.asarray(correct)
        contrast_rows = []
        for name, (a, b) in contrasts.items():
            diff = 100 * (c[a] - c[b])
            low, high = evaluate.bootstrap_ci(diff, seed=session.config.seed)
            contrast_rows.append([name, f"{diff.mean():+.2f}", f"[{low:+.2f}, {high:+.2f}]"])
        report.table("Pairwise contrasts (top-1 points, 95% bootstrap CI over test samples)",
                     ["contrast", "estimate", "95% CI"], contrast_rows,
                     note="Paper: +0.46, +0.47, +1.24, +1.51 and +1.70 points.")
    report.data = {"factors": factors, "cells": measured}
    return report


@experiment("rescue", "Table 4: four quadrants vs quantized full depth, net rescue, McNemar, per exit layer")
def rescue(session: Session, seeds: int, options: dict[str, Any]) -> Report:
    report = Report("rescue")
    seed = session.config.seed
    result = session.evaluate(session.fit(LRA, seed), seed)
    metrics, exit_layer = result.metrics, result.outcome.exit_layer
    q = metrics["quadrants"]
    n = len(session.labels)
    paper = paper_numbers("rescue")
    rows = []
    for key, label in [("both_correct", "both correct"), ("rescued", "rescued (exit right, full depth wrong)"),
                       ("lost", "lost (exit wrong, full depth right)"), ("both_wrong", "both wrong")]:
        rows.append([label, q[key], f"{100 * q[key] / n:.2f}", paper.get(key, "-"),
                     f"{100 * paper[key] / paper['samples']:.1f}" if key in paper else "-"])
    rows.append(["net rescue", q["net_rescue"], f"{100 * q['net_rescue'] / n:+.2f}", paper.get("net_rescue", "-"),
                 f"{100 * paper['net_rescue'] / paper['samples']:+.2f}"])
    report.table(f"Four quadrants, LRA-EE vs {session.config.quant} full depth (seed {seed}, {n} test images)",
                 ["outcome", "samples", "%", "paper samples", "paper %"], rows,
                 note=f"McNemar exact p = {q['mcnemar_p']:.3g}. Paper columns: the paper's Table 4 (ImageNet).")
    layer_rows = []
    for layer in sorted(set(exit_layer.tolist())):
        rows_at = exit_layer == layer
        lq = evaluate.quadrants(result.correct[rows_at], session.baseline_correct[rows_at])
        layer_rows.append([layer, int(rows_at.sum()), f"{100 * result.correct[rows_at].mean():.2f}",
                           lq.both_correct, lq.rescued, lq.lost, lq.both_wrong, f"{lq.net_rescue:+d}"])
    report.table("Per exit layer (12 = full depth: same prediction as the baseline unless a last-layer head decides)",
                 ["exit layer", "samples", "top-1 %", "both correct", "rescued", "lost", "both wrong", "net"],
                 layer_rows)
    report.data = {"quadrants": q, "top1": metrics["top1"]}
    return report
