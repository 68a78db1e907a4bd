"""``compare`` (Table 2): every registered method at LRA-EE's FLOPs saving, each operating point chosen on gate.

The matched saving is the one LRA-EE's default fit reaches on the ``gate``
split (first seed). Every method and control then picks its operating point
at that budget by the protocol's rule (:mod:`harness.protocol`: best gate
top-1 among the knob values that save at least as much on gate), and is
scored on ``test``, with its routing gain over the best control. Each
method's knob is also swept on ``test`` and drawn as a curve, labelled as
such: the curves are for looking, nothing is read off them.
"""

from __future__ import annotations

from typing import Any

from harness.evaluate import pareto_front
from harness.experiments import experiment
from harness.experiments.figures import _figure
from harness.experiments.report import Report, paper_numbers
from harness.experiments.tables import LRA
from harness.protocol import best_control, control_points, method_points, routing_gain
from harness.session import Session

# Our method -> the paper's Table 2 row it corresponds to (methods not here have no paper row)
PAPER_ROWS = {"cls-ee": "cls-ee", "pabee": "pabee", "token-pruner": "adavit (token pruner)", LRA: LRA}


@experiment("compare", "Table 2: every method at LRA-EE's gate-split FLOPs saving, operating points chosen on gate")
def compare(session: Session, seeds: int, options: dict[str, Any]) -> Report:
    from harness.policy import METHODS

    seed = session.config.seed
    reference = session.zero_shot_top1()
    target = session.gate_point(session.fit(LRA, seed), seed)["flops_saving"]
    controls = control_points(session, seed, (target,))
    control = best_control(controls, 0)
    paper = paper_numbers("compare")
    rows, data = [], {}
    for name in METHODS.names():
        (point,) = method_points(session, name, seed, (target,), {})
        policy = session.fit(name, seed)
        curve = session.sweep(policy, seed)
        paper_row = paper.get(PAPER_ROWS.get(name, ""), {})
        chosen = None if point is None else {**point.as_dict(), **routing_gain(point, control)}
        data[name] = {"knob": policy.knob, "chosen": chosen, "test_curve": curve, "test_front": pareto_front(curve),
                      "config": policy.describe()["config"]}
        rows.append([name, *_cells(chosen, reference),
                     f"{paper_row['top1']:.2f} / {paper_row['flops_saving']:.2f}" if paper_row else "-"])
    for name, points in controls.items():
        chosen = None if points[0] is None else points[0].as_dict()
        data[name] = {"knob": "block", "chosen": chosen, "kind": "control"}
        rows.append([f"{name} (control)", *_cells(chosen, reference), "-"])
    report = Report("compare")
    report.table(
        f"Every method at LRA-EE's gate-split FLOPs saving ({target:.2f}%), operating points chosen on gate, "
        f"scored on test; {session.config.quant} full depth {reference:.2f}% ({len(session.labels)} test images, seed {seed})",
        ["row", "knob chosen on gate", "gate top-1 % / saving %", "test top-1 %", "test FLOPs saving %",
         "delta vs quant full depth", "routing gain vs best control (p)", "paper: top-1 % / FLOPs saving %"], rows,
        note="'out of reach': no knob value saves that much on gate. Routing gain: test top-1 minus the control "
             "(static exit or recalibration) with the best gate top-1 at the same budget. Paper column: the "
             "paper's Table 2 (INT8 ViT-B/32, ImageNet; its AdaViT row is our token-pruner's counterpart), not "
             "our measurements.")
    report.table("Test curves over each knob (knob value: top-1 % / FLOPs saving %), drawn for looking; "
                 "nothing above is chosen from them", ["method", "knob", "test points"],
                 [[name, d["knob"], ", ".join(f"{p['value']:g}: {p['top1']:.2f}/{p['flops_saving']:.1f}"
                                              for p in d["test_curve"])]
                  for name, d in data.items() if "test_curve" in d])
    fig, (ax,) = _figure(1)
    for i, (name, d) in enumerate((n, d) for n, d in data.items() if "test_curve" in d):
        front = d["test_front"]
        ax.plot([p["flops_saving"] for p in front], [p["top1"] for p in front], "-", linewidth=1,
                color=f"C{i}", alpha=0.6, label=f"{name}: test curve ({d['knob']})")
        if d["chosen"]:
            ax.plot([d["chosen"]["test_saving"]], [d["chosen"]["test_top1"]], "*", markersize=10, color=f"C{i}")
    ax.axhline(reference, color="k", linestyle="--", linewidth=1, label=f"{session.config.quant} full depth")
    ax.axvline(target, color="0.5", linestyle=":", linewidth=1, label="budget: LRA-EE's gate saving")
    ax.set(xlabel="FLOPs saving (%)", ylabel="top-1 (%)",
           title="Test curves over each knob (*: the point chosen on gate)")
    ax.legend(fontsize=7)
    report.figures["compare"] = fig
    report.data = {"target_saving": target, "target_source": "lra-ee's default fit, gate split",
                   "reference_top1": reference, "rows": data}
    return report


def _cells(chosen: dict[str, Any] | None, reference: float) -> list[str]:
    """Table cells of one chosen operating point (or of a budget out of reach)."""
    if chosen is None:
        return ["out of reach", "-", "-", "-", "-", "-"]
    knob = "fit to budget" if chosen["knob"] is None else f"{chosen['knob']:g}"
    gain = ("-" if chosen.get("routing_gain") is None
            else f"{chosen['routing_gain']:+.2f} vs {chosen['control']}@{chosen['control_knob']:g} "
                 f"(p {chosen['routing_p']:.2g})")
    return [knob, f"{chosen['gate_top1']:.2f} / {chosen['gate_saving']:.2f}", f"{chosen['test_top1']:.2f}",
            f"{chosen['test_saving']:.2f}", f"{chosen['test_top1'] - reference:+.2f}", gain]
