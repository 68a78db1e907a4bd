"""``precision`` (not in the paper): does rescue grow as precision falls? Every exit method, recalibration
and the best static exit, at one FLOPs budget chosen on gate, repeated across quantizers."""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.experiments import experiment
from harness.experiments.figures import _figure
from harness.experiments.report import Report
from harness.protocol import at_budget
from harness.session import Session

QUANTIZERS = ("fp32", "int8-dynamic", "int8-torchao", "fake-w8a8", "fake-w6a6", "fake-w4a8", "fake-w4a4")
# Each quantizer needs its own traces; without --limit the sweep samples this many images per split.
DEFAULT_LIMIT = 2000
BUDGET = 25.0  # FLOPs saving (%) every method and static exit must reach on gate


@experiment("precision", "Exit methods vs recalibration and static exits across quantizers, chosen on gate")
def precision(session: Session, seeds: int, options: dict[str, Any]) -> Report:
    from harness.policy import METHODS

    quantizers = list(dict.fromkeys([*QUANTIZERS, session.config.quant]))
    limit = session.config.limit or DEFAULT_LIMIT
    methods = tuple(m for m in METHODS.names() if not getattr(METHODS.get(m), "prunes_tokens", False))
    seed = session.config.seed
    rows, data = [], {}
    for quant in quantizers:
        other = session.derived(quant=quant, limit=limit)
        run = at_budget(other, seed, BUDGET, methods)
        run["fp32_top1"] = other.zero_shot_top1("fp32")
        run["driver"] = "real driver" if not other.batch_invariant else "replay"
        data[quant] = run
        full, recal, static = run["full_depth_top1"], run["recalibration"], run["best_static"]
        rows.append([quant, "full depth", f"{full:.2f}", f"{full - run['fp32_top1']:+.2f} vs fp32", "0.00", "-", "-"])
        rows.append([quant, f"recalibration ({recal['control']})", f"{recal['test_top1']:.2f}",
                     f"{recal['test_top1'] - full:+.2f}", "0.00", "-", "-"])
        if static is not None:
            rows.append([quant, f"best static exit ({static['control']}@{static['knob']:g})",
                         f"{static['test_top1']:.2f}", f"{static['test_top1'] - full:+.2f}",
                         f"{static['test_saving']:.2f}", "-", "-"])
        for method, row in run["methods"].items():
            if row is None:
                rows.append([quant, method, "out of reach", "-", "-", "-", "-"])
                continue
            rows.append([quant, method, f"{row['test_top1']:.2f}", f"{row['test_top1'] - full:+.2f}",
                         f"{row['test_saving']:.2f}",
                         f"{row['gain_vs_recalibration']:+.2f} (p {row['p_vs_recalibration']:.2g})",
                         f"{row['net_rescue']:+d}"])
    report = Report("precision")
    report.table(f"Exit methods across quantizers at {BUDGET:g}% FLOPs saving ({limit} images per split, seed "
                 f"{seed}), operating points chosen on gate",
                 ["quantizer", "row", "test top-1 %", "vs full depth", "test FLOPs saving %",
                  "vs recalibration (McNemar p)", "net rescue vs full depth (samples)"], rows,
                 note="Recalibration: the CLS or patch-mean head (better on gate) on the quantized last block. "
                      "Under a batch-dependent quantizer (int8-dynamic) every number is the real driver's.")
    fig, (ax,) = _figure(1)
    drop = np.array([data[q]["fp32_top1"] - data[q]["full_depth_top1"] for q in quantizers])
    recal = np.array([data[q]["recalibration"]["test_top1"] for q in quantizers])
    for i, method in enumerate(methods):
        top1 = [np.nan if data[q]["methods"][method] is None else data[q]["methods"][method]["test_top1"]
                for q in quantizers]
        ax.plot(drop, np.array(top1) - recal, "o", color=f"C{i}", label=method)
    static = [np.nan if data[q]["best_static"] is None else data[q]["best_static"]["test_top1"] for q in quantizers]
    ax.plot(drop, np.array(static) - recal, "s", color="0.4", label="best static exit")
    for q, x in zip(quantizers, drop):
        ax.annotate(q, (x, 0), fontsize=6, rotation=60)
    ax.axhline(0, color="k", linewidth=1)
    ax.set(xlabel="full-depth top-1 lost to quantization (points)",
           ylabel="top-1 minus recalibration (points)", title=f"rescue vs quantization damage, {BUDGET:g}% budget")
    ax.legend(fontsize=8)
    report.figures["precision"] = fig
    report.data = {"limit": limit, "budget": BUDGET, "quantizers": data}
    return report
