"""Accuracy measurements on traces (the evaluator grows here)."""

from __future__ import annotations

import numpy as np

from harness.context import Context
from harness.trace import Trace


def top1(trace: Trace) -> float:
    """Full-depth zero-shot top-1 (%) of a trace."""
    if len(trace) == 0:
        raise ValueError("empty trace: no images were traced")
    return float(100 * np.mean(np.asarray(trace.logits).argmax(axis=1) == np.asarray(trace.labels)))


def zero_shot_top1(ctx: Context, quant: str, split: str = "test") -> float:
    """Full-depth zero-shot top-1 (%) of ``split`` under ``quant`` (traced and cached)."""
    return top1(ctx.trace(quant, split))
