"""``precision`` (not in the paper): every method against full depth, repeated across quantizers."""

from __future__ import annotations

from typing import Any

from harness.experiments import experiment
from harness.experiments.figures import _figure
from harness.experiments.report import Report
from harness.testbed import TestBed

QUANTIZERS = ("fp32", "int8-dynamic", "int8-torchao", "fake-w8a8", "fake-w6a6", "fake-w4a8", "fake-w4a4")
# Each quantizer needs its own traces; without --limit the sweep samples this many images per split.
DEFAULT_LIMIT = 2000


@experiment("precision", "Every method vs full depth across quantizers: does rescue grow as precision falls?")
def precision(bed: TestBed, seeds: int, options: dict[str, Any]) -> Report:
    from harness.policy import METHODS

    quantizers = list(dict.fromkeys([*QUANTIZERS, bed.config.quant]))
    limit = bed.config.limit or DEFAULT_LIMIT
    methods = [m for m in METHODS.names() if not getattr(METHODS.get(m), "prunes_tokens", False)]
    seed = bed.config.seed
    rows, data = [], {}
    for quant in quantizers:
        other = bed.derived(quant=quant, limit=limit)
        reference = other.baseline_top1()
        data[quant] = {"full_depth_top1": reference, "fp32_top1": other.baseline_top1("fp32"), "methods": {}}
        rows.append([quant, "full depth", f"{reference:.2f}", f"{reference - data[quant]['fp32_top1']:+.2f}",
                     "0.00", "-"])
        for method in methods:
            m = other.score(other.fit(method, seed), seed)
            data[quant]["methods"][method] = {k: m[k] for k in ("top1", "flops_saving")} | {
                "net_rescue": m["quadrants"]["net_rescue"]}
            rows.append([quant, method, f"{m['top1']:.2f}", f"{m['top1'] - reference:+.2f}",
                         f"{m['flops_saving']:.2f}", f"{m['quadrants']['net_rescue']:+d}"])
    report = Report("precision")
    report.table(f"Methods across quantizers ({limit} images per split, seed {seed})",
                 ["quantizer", "method", "top-1 %", "delta (full depth: vs fp32; methods: vs full depth)",
                  "FLOPs saving %", "net rescue (samples)"], rows)
    fig, (ax,) = _figure(1)
    drop = [data[q]["fp32_top1"] - data[q]["full_depth_top1"] for q in quantizers]
    for method in methods:
        ax.plot(drop, [data[q]["methods"][method]["top1"] - data[q]["full_depth_top1"] for q in quantizers],
                "o", label=method)
    for q, x in zip(quantizers, drop):
        ax.annotate(q, (x, 0), fontsize=6, rotation=60)
    ax.axhline(0, color="k", linewidth=1)
    ax.set(xlabel="full-depth top-1 lost to quantization (points)", ylabel="method top-1 - full depth (points)",
           title="rescue vs quantization damage")
    ax.legend(fontsize=8)
    report.figures["precision"] = fig
    report.data = {"limit": limit, "quantizers": data}
    return report
