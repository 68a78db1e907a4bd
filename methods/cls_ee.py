"""CLS-EE: a head on the CLS token after each exit layer, exit on max-probability.

BranchyNet / DeeBERT style: a sample leaves at the first exit layer whose
head is at least ``threshold`` sure of its top class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.policy import Decision, ExitPolicy, FitContext, LayerView, register_method
from methods._heads import ExitHead, head_logits, train_head


@dataclass
class ClsEEConfig:
    threshold: float = 0.9  # exit when max softmax probability >= threshold
    exit_layers: tuple[int, ...] | None = None  # default: every block but the last
    epochs: int = 3  # head training (Adam, batch 64, lr 5e-4, as in the paper)
    batch_size: int = 64
    lr: float = 5e-4


@register_method("cls-ee")
class ClsEE(ExitPolicy):
    """CLS-token head per exit layer; exit when its max softmax probability passes a threshold."""

    Config = ClsEEConfig
    needs = frozenset({"cls"})

    def __init__(self, config: ClsEEConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.heads = nn.ModuleDict()
        self.classifier = torch.zeros(0)
        self.logit_scale = 1.0

    def exit_layers(self) -> list[int]:
        return sorted(int(k) for k in self.heads)

    def fit(self, ctx: FitContext) -> None:
        layers = self.config.exit_layers or tuple(range(1, ctx.num_blocks))
        self.classifier, self.logit_scale = ctx.classifier.float(), ctx.logit_scale
        for layer in layers:
            torch.manual_seed(ctx.seed * 1000 + layer)
            head = ExitHead(ctx.width, ctx.embed_dim)
            self.heads[str(layer)] = train_head(
                head, ctx.heads.cls[:, layer], ctx.heads.labels, self.classifier, self.logit_scale,
                seed=ctx.seed, epochs=self.config.epochs, batch_size=self.config.batch_size, lr=self.config.lr,
            )

    def decide(self, layer: int, view: LayerView) -> Decision:
        logits = head_logits(self.heads[str(layer)](view.cls()), self.classifier, self.logit_scale)
        return Decision(exit=logits.softmax(dim=-1).amax(dim=-1) >= self.config.threshold, logits=logits)

    def head_flops(self, layer: int) -> float:
        return self.heads[str(layer)].flops() if str(layer) in self.heads else 0.0

    def state_dict(self) -> dict:
        return {"heads": self.heads.state_dict(), "layers": self.exit_layers(),
                "classifier": self.classifier, "logit_scale": self.logit_scale}

    def load_state_dict(self, state: dict) -> None:
        width = state["heads"][f"{state['layers'][0]}.net.0.weight"].shape[0]
        embed_dim = state["classifier"].shape[1]
        self.heads = nn.ModuleDict({str(layer): ExitHead(width, embed_dim) for layer in state["layers"]})
        self.heads.load_state_dict(state["heads"])
        self.heads.eval()
        self.classifier, self.logit_scale = state["classifier"], state["logit_scale"]
