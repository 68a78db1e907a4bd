"""CLS-EE: a head on the CLS token after each exit layer, exit on max-probability.

BranchyNet / DeeBERT style: a sample leaves at the first exit layer whose
head is at least ``threshold`` sure of its top class.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.options import option
from harness.policy import Decision, LayerView, register_method
from methods._heads import THRESHOLD_KNOB_GRID, HeadsConfig, PerLayerHeads


@dataclass
class ClsEEConfig(HeadsConfig):
    threshold: float = option(0.9, min=0, max=1)  # exit when max softmax probability >= threshold


@register_method("cls-ee")
class ClsEE(PerLayerHeads):
    """CLS-token head per exit layer; exit when its max softmax probability passes a threshold."""

    Config = ClsEEConfig
    knob, knob_grid = "threshold", THRESHOLD_KNOB_GRID

    def decide(self, layer: int, view: LayerView) -> Decision:
        logits = self.layer_logits(layer, view)
        return Decision(exit=logits.softmax(dim=-1).amax(dim=-1) >= self.config.threshold, logits=logits)
