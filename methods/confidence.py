"""Confidence heuristics: exit when a head's confidence score passes one global threshold.

Training-free exit rules on per-layer heads: ``maxprob`` (top softmax
probability), ``margin`` (top-1 minus top-2 probability) and ``entropy``
(1 - H(p) / log C, so that higher means surer for all three scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.options import option
from harness.policy import Decision, LayerView, register_method
from methods._heads import THRESHOLD_KNOB_GRID, HeadsConfig, PerLayerHeads

SCORES = ("maxprob", "margin", "entropy")


def confidence_score(logits: torch.Tensor, score: str) -> torch.Tensor:
    """Per-sample confidence in [0, 1] (higher = surer) from logits [B, C]."""
    probs = logits.softmax(dim=-1)
    if score == "maxprob":
        return probs.amax(dim=-1)
    if score == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if score == "entropy":
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
        return 1 - entropy / math.log(probs.shape[-1])
    raise ValueError(f"score must be one of {', '.join(SCORES)}, not {score!r}")


@dataclass
class ConfidenceConfig(HeadsConfig):
    # margin by default: maxprob with one threshold is what cls-ee already does
    score: str = option("margin", choices=SCORES)  # maxprob | margin | entropy
    threshold: float = option(0.8, min=0, max=1)  # exit when score >= threshold (every score is in [0, 1])


@register_method("confidence")
class Confidence(PerLayerHeads):
    """Per-layer heads; exit when max-prob, top-2 margin or 1-normalised entropy passes one threshold."""

    Config = ConfidenceConfig
    knob, knob_grid = "threshold", THRESHOLD_KNOB_GRID

    def decide(self, layer: int, view: LayerView) -> Decision:
        logits = self.layer_logits(layer, view)
        return Decision(exit=confidence_score(logits, self.config.score) >= self.config.threshold, logits=logits)
