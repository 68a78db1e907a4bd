"""``compare`` (Table 2): every registered method's accuracy/FLOPs curve, read at LRA-EE's FLOPs saving.

Each method is fitted once (first seed) and its knob swept without refitting
(:meth:`~harness.testbed.TestBed.sweep`: exit thresholds, PABEE's patience,
token pruners' keep ratio). Its row in the table is its Pareto curve at the
FLOPs saving of the fitted LRA-EE (interpolated) and the measured point
nearest to it, as the paper compares methods at matched FLOPs.
"""

from __future__ import annotations

from typing import Any

from harness.evaluate import pareto_front, pareto_interpolate
from harness.experiments import experiment
from harness.experiments.figures import _figure
from harness.experiments.report import Report, paper_numbers
from harness.experiments.tables import LRA
from harness.testbed import TestBed

# Our method -> the paper's Table 2 row it corresponds to (methods not here have no paper row)
PAPER_ROWS = {"cls-ee": "cls-ee", "pabee": "pabee", "token-pruner": "adavit (token pruner)", LRA: LRA}


@experiment("compare", "Table 2: every method's accuracy/FLOPs curve over its knob, read at LRA-EE's FLOPs saving")
def compare(bed: TestBed, seeds: int, options: dict[str, Any]) -> Report:
    from harness.policy import METHODS

    seed = bed.config.seed
    reference = bed.baseline_top1()
    fitted = {name: bed.fit(name, seed) for name in METHODS.names()}
    defaults = {name: bed.score(policy, seed) for name, policy in fitted.items()}
    target = defaults[LRA]["flops_saving"]
    paper = paper_numbers("compare")
    rows, data = [], {}
    for name, policy in fitted.items():
        points = bed.sweep(policy, seed)
        top1, nearest = pareto_interpolate(points, target)
        default = defaults[name]
        paper_row = paper.get(PAPER_ROWS.get(name, ""), {})
        data[name] = {"knob": policy.knob, "points": points, "front": pareto_front(points),
                      "default": {k: default[k] for k in ("top1", "flops_saving")}, "top1_at_target": top1,
                      "nearest": nearest, "config": policy.describe()["config"]}
        rows.append([
            name, f"{default['top1']:.2f} / {default['flops_saving']:.2f}",
            "-" if top1 is None else f"{top1:.2f}", "-" if top1 is None else f"{top1 - reference:+.2f}",
            f"{policy.knob}={nearest['value']:g}: {nearest['top1']:.2f} / {nearest['flops_saving']:.2f}",
            f"{paper_row['top1']:.2f} / {paper_row['flops_saving']:.2f}" if paper_row else "-",
        ])
    report = Report("compare")
    report.table(
        f"Methods at LRA-EE's FLOPs saving ({target:.2f}%), {bed.config.quant} full depth {reference:.2f}% "
        f"({len(bed.labels)} test images, seed {seed})",
        ["method", "default config: top-1 % / FLOPs saving %", f"top-1 % at {target:.2f}% saving (Pareto, "
         "interpolated)", "delta vs quant full depth", "nearest sweep point: top-1 % / saving %",
         "paper: top-1 % / FLOPs saving %"], rows,
        note="'-' in the interpolated column: the method's Pareto curve does not reach that saving; a method "
             "whose every Pareto point saves more shows its most accurate one. Paper column: "
             "the paper's Table 2 (INT8 ViT-B/32, ImageNet; its AdaViT row is our token-pruner's counterpart), not "
             "our measurements.")
    report.table("Sweep points (knob value: top-1 % / FLOPs saving %)", ["method", "knob", "points"],
                 [[name, d["knob"], ", ".join(f"{p['value']:g}: {p['top1']:.2f}/{p['flops_saving']:.1f}"
                                              for p in d["points"])] for name, d in data.items()])
    fig, (ax,) = _figure(1)
    for i, (name, d) in enumerate(data.items()):
        front = d["front"]
        ax.plot([p["flops_saving"] for p in front], [p["top1"] for p in front], "-o", markersize=3,
                color=f"C{i}", label=f"{name} ({d['knob']})")
        ax.plot([d["default"]["flops_saving"]], [d["default"]["top1"]], "*", markersize=10, color=f"C{i}")
    ax.axhline(reference, color="k", linestyle="--", linewidth=1, label=f"{bed.config.quant} full depth")
    ax.axvline(target, color="0.5", linestyle=":", linewidth=1, label="LRA-EE's saving")
    ax.set(xlabel="FLOPs saving (%)", ylabel="top-1 (%)", title="Pareto fronts over each method's knob (*: default)")
    ax.legend(fontsize=7)
    report.figures["compare"] = fig
    report.data = {"target_saving": target, "reference_top1": reference, "methods": data}
    return report
