"""``validate``: the instrument's own controls. Does the harness find a rescue where one exists by
construction, and none where none can exist?

A method **rescues** when it beats both references that need no early
exit, each with McNemar p < 0.01 on the paired test samples: the zero-shot
full-depth model (a net rescue in the paper's sense) and recalibration (so
the gain is not what a head on the last block gets anyway).

- **Positive control** ``noise-bK-sS`` (:mod:`harness.quantizers._damage`):
  the fp32 tower with pseudo-random noise of S x the per-token RMS added to
  the residual stream after every block from K on. What the tower knew
  before block K is partly destroyed from there on, so no head trained on
  the last block can get it back, while a method that exits before block K
  still has it. Passes when at least one method that can exit before block
  K rescues in every seed.
- **Negative control** ``fp32``: nothing is damaged. Passes when no method
  rescues in any seed.

Every method and control is at the budget's operating point chosen on
``gate`` (:mod:`harness.protocol`); recalibration is the CLS or patch-mean
head on the last block, whichever does better on ``gate``. The command
exits non-zero when either control fails.

The sweep beside it (one seed, a capped sample of each split) moves the
damage: onset block x size, for noise and for function-preserving
LayerNorm outliers on per-token int8 (``outliers-bK-c4-xS-fake-w8a8``),
with LRA-EE, PABEE, CLS-EE, the best static exit and recalibration.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.experiments import experiment
from harness.experiments.figures import _figure
from harness.experiments.report import Report
from harness.protocol import at_budget
from harness.session import Session

METHODS = ("lra-ee", "pabee", "cls-ee")
BUDGET = 25.0  # FLOPs saving (%) every method and static exit must reach on gate
ALPHA = 0.01  # significance level of both controls
NOISE_SIZE = 1.0
NOISE_SIZES = (0.5, 1.0, 2.0)
OUTLIER_BASE = "fake-w8a8"
OUTLIER_CHANNELS = 4
OUTLIER_SCALES = (200, 300, 500)
SWEEP_LIMIT = 2000  # images per split in the sweep (each scenario needs its own traces)


def default_onset(num_blocks: int) -> int:
    """The positive control's damage onset: two blocks before the end (block 10 of 12)."""
    return max(2, num_blocks - 2)


def sweep_onsets(num_blocks: int) -> tuple[int, ...]:
    """Early, middle and late onsets (blocks 5, 7 and 10 of 12)."""
    return tuple(sorted({num_blocks // 3 + 1, num_blocks // 2 + 1, default_onset(num_blocks)}))


def _rescues(row: dict[str, Any] | None) -> bool:
    """Beats the zero-shot full-depth model and recalibration, each with McNemar p < :data:`ALPHA`."""
    return (row is not None and row["net_rescue"] > 0 and row["p_vs_full_depth"] < ALPHA
            and row["gain_vs_recalibration"] > 0 and row["p_vs_recalibration"] < ALPHA)


@experiment("validate", "The instrument's controls: a rescue found where noise destroys information, none in fp32")
def validate(session: Session, seeds: int, options: dict[str, Any]) -> Report:
    onset = default_onset(session.num_blocks)
    quants = {"positive": f"noise-b{onset}-s{NOISE_SIZE:g}", "negative": "fp32"}
    seed_list = [session.config.seed + s for s in range(seeds)]
    controls = {role: [at_budget(session.derived(quant=quant), seed, BUDGET, METHODS) for seed in seed_list]
                for role, quant in quants.items()}
    passing = [m for m in METHODS if all(_rescues(run["methods"][m]) and run["methods"][m]["earliest_exit"] < onset
                                         for run in controls["positive"])]
    false_alarms = sorted({m for run in controls["negative"] for m in METHODS if _rescues(run["methods"][m])})
    report = Report("validate")
    if not passing:
        report.failures.append(f"positive control ({quants['positive']}): no method that exits before block {onset} "
                               f"beats full depth and recalibration with p < {ALPHA} in every seed")
    if false_alarms:
        report.failures.append(f"negative control (fp32): {', '.join(false_alarms)} beat full depth and "
                               f"recalibration with p < {ALPHA} where nothing is damaged")
    rows = []
    for role, runs in controls.items():
        rows += _control_rows(f"{role}: {quants[role]}", runs)
    verdict = {"positive": f"passed ({', '.join(passing)})" if passing else "FAILED",
               "negative": "FAILED" if false_alarms else "passed"}
    report.table(
        f"Controls of the instrument at {BUDGET:g}% FLOPs saving ({len(session.labels)} test images, seeds "
        f"{', '.join(map(str, seed_list))}): positive control {verdict['positive']}, negative control "
        f"{verdict['negative']}",
        ["scenario", "row", "test top-1 %", "test FLOPs saving %", "net rescue vs full depth, samples (max p)",
         "vs recalibration (max p)", "vs best static exit (max p)"], rows,
        note=f"{quants['positive']}: synthetic damage, noise of {NOISE_SIZE:g} x the per-token RMS added to the "
             f"residual stream after every block from block {onset} (fp32 otherwise). Mean over seeds; p: the "
             f"largest McNemar p over seeds. A method rescues when it beats both full depth and recalibration "
             f"with p < {ALPHA}; the positive control passes when a method that can exit before block {onset} "
             f"rescues in every seed, the negative control when none rescues in any seed. Every operating "
             f"point is chosen on gate.")
    sweep = None if options.get("no_sweep") else _sweep(session, report)
    report.data = {"budget": BUDGET, "alpha": ALPHA, "onset": onset, "scenarios": quants, "seeds": seed_list,
                   "controls": controls, "passing_methods": passing, "false_alarms": false_alarms,
                   "failures": report.failures, "sweep": sweep}
    return report


def _control_rows(label: str, runs: list[dict[str, Any]]) -> list[list[str]]:
    def mean(values: list[float]) -> str:
        return f"{np.mean(values):.2f}"

    rows = [[label, "full depth (zero-shot)", mean([r["full_depth_top1"] for r in runs]), "0.00", "-", "-", "-"],
            [label, f"recalibration ({', '.join(r['recalibration']['control'] for r in runs)}, last block)",
             mean([r["recalibration"]["test_top1"] for r in runs]), "0.00", "-", "-", "-"]]
    statics = [r["best_static"] for r in runs]
    if all(statics):
        blocks = ", ".join(f"{s['control']}@{s['knob']:g}" for s in statics)
        rows.append([label, f"best static exit ({blocks})", mean([s["test_top1"] for s in statics]),
                     mean([s["test_saving"] for s in statics]), "-", "-", "-"])
    for name in runs[0]["methods"]:
        points = [r["methods"][name] for r in runs]
        if not all(points):
            rows.append([label, name, "out of reach", "-", "-", "-", "-"])
            continue
        static = ("-" if "gain_vs_static" not in points[0] else
                  f"{np.mean([p['gain_vs_static'] for p in points]):+.2f} "
                  f"({max(p['p_vs_static'] for p in points):.2g})")
        rows.append([label, name, mean([p["test_top1"] for p in points]), mean([p["test_saving"] for p in points]),
                     f"{np.mean([p['net_rescue'] for p in points]):+.0f} "
                     f"({max(p['p_vs_full_depth'] for p in points):.2g})",
                     f"{np.mean([p['gain_vs_recalibration'] for p in points]):+.2f} "
                     f"({max(p['p_vs_recalibration'] for p in points):.2g})", static])
    return rows


def _sweep(session: Session, report: Report) -> dict[str, Any]:
    """Damage onset x size for noise and outliers, one seed, :data:`SWEEP_LIMIT` images per split."""
    seed, limit = session.config.seed, min(session.config.limit or SWEEP_LIMIT, SWEEP_LIMIT)
    onsets = sweep_onsets(session.num_blocks)
    families = {
        "noise": [(f"noise-b{o}-s{s:g}", o, f"{s:g} x RMS") for o in onsets for s in NOISE_SIZES],
        "outliers": [(f"outliers-b{o}-c{OUTLIER_CHANNELS}-x{s}-{OUTLIER_BASE}", o, f"x{s}")
                     for o in onsets for s in OUTLIER_SCALES],
    }
    data: dict[str, list[dict[str, Any]]] = {}
    rows = []
    for family, scenarios in families.items():
        data[family] = []
        for quant, onset, size in scenarios:
            run = at_budget(session.derived(quant=quant, limit=limit), seed, BUDGET, METHODS)
            data[family].append({"quant": quant, "onset": onset, "size": size, **run})
            static = run["best_static"]
            rows.append([family, onset, size, f"{run['full_depth_top1']:.2f}",
                         f"{run['recalibration']['test_top1']:.2f}",
                         "-" if static is None else f"{static['test_top1']:.2f} ({static['control']}@{static['knob']:g})",
                         *(_cell(run["methods"][m]) for m in METHODS)])
    report.table(f"Damage sweep at {BUDGET:g}% FLOPs saving ({limit} images per split, seed {seed}): test top-1 %",
                 ["damage", "onset block", "size", "full depth", "recalibration", "best static exit",
                  *(f"{m} (vs recalibration, p)" for m in METHODS)], rows,
                 note=f"Synthetic damage. noise: pseudo-random noise on the residual stream after every block "
                      f"from the onset, fp32 tower. outliers: {OUTLIER_CHANNELS} LayerNorm channels scaled by the "
                      f"size from the onset block on, function-preserving in fp32, then {OUTLIER_BASE} "
                      f"(per-token int8). Every operating point is chosen on gate.")
    fig, axes = _figure(2)
    for ax, (family, runs) in zip(axes, data.items()):
        labels = [f"b{r['onset']} {r['size']}" for r in runs]
        x = np.arange(len(runs))
        recal = np.array([r["recalibration"]["test_top1"] for r in runs])
        for i, m in enumerate(METHODS):
            y = [np.nan if r["methods"][m] is None else r["methods"][m]["test_top1"] for r in runs]
            ax.plot(x, np.array(y) - recal, "o-", color=f"C{i}", label=m)
        static = [np.nan if r["best_static"] is None else r["best_static"]["test_top1"] for r in runs]
        ax.plot(x, np.array(static) - recal, "s--", color="0.4", label="best static exit")
        ax.plot(x, np.array([r["full_depth_top1"] for r in runs]) - recal, "x:", color="k", label="full depth")
        ax.axhline(0, color="k", linewidth=1)
        ax.set_xticks(x, labels, rotation=60, fontsize=7)
        ax.set(ylabel="test top-1 minus recalibration (points)", title=f"{family} (synthetic), {BUDGET:g}% budget")
    axes[0].legend(fontsize=7)
    report.figures["validate-sweep"] = fig
    return {"limit": limit, "seed": seed, "families": data}


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "out of reach"
    return f"{row['test_top1']:.2f} ({row['gain_vs_recalibration']:+.2f}, {row['p_vs_recalibration']:.2g})"
