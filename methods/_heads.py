"""Per-layer exit heads shared by the method plugins (the heads themselves: :mod:`harness.heads`).

:class:`PerLayerHeads` is the base of the methods that put one such head
after each exit layer (cls-ee, pabee, confidence); they differ in how the
heads are weighted in training and in the exit rule.

The heads are fitted on the CPU and follow the features they are handed to
their device (:func:`harness.drivers.on_device`).
"""

from __future__ import annotations

import abc
import dataclasses
import json
from dataclasses import dataclass
import torch
from torch import nn

from harness.drivers import on_device
from harness.heads import Classifier, ExitHead, load_heads, train_heads
from harness.options import option
from harness.policy import THRESHOLD_GRID, ExitPolicy, FitContext, LayerView

# Threshold heads sweep the paper's grid and three high thresholds, for the low-saving end of the curve
THRESHOLD_KNOB_GRID = (*THRESHOLD_GRID, 0.95, 0.98, 0.99)


@dataclass
class HeadsConfig:
    feature: str = option("cls", choices=("cls", "patch_mean"))  # head input: "cls" (CLS token) or "patch_mean" (SSA)
    exit_layers: tuple[int, ...] | None = option(None, blocks=True)  # default: every block but the last
    epochs: int = option(3, min=1)  # head training: Adam, batch 64, lr 5e-4 (the paper's recipe)
    batch_size: int = option(64, min=1)
    lr: float = option(5e-4, above=0)


class PerLayerHeads(ExitPolicy, abc.ABC):
    """One :class:`ExitHead` per exit layer on ``config.feature``; subclasses give the exit rule."""

    Config = HeadsConfig

    def __init__(self, config: HeadsConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.needs = frozenset({self.config.feature})
        self.heads = nn.ModuleDict()
        self.classifier: Classifier | None = None  # the model's, copied at fit time

    def loss_weights(self, layers: list[int]) -> dict[int, float]:
        """Per-head weights of the joint training loss (uniform by default)."""
        return {layer: 1.0 for layer in layers}

    def exit_layers(self) -> list[int]:
        return sorted(int(k) for k in self.heads)

    def fit(self, ctx: FitContext) -> None:
        layers = list(self.config.exit_layers or range(1, ctx.num_blocks))
        self.classifier = ctx.classifier.copy_to("cpu")
        weights = self.loss_weights(layers)
        recipe = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(HeadsConfig)}

        def train() -> dict:
            with torch.random.fork_rng():
                torch.manual_seed(ctx.seed)
                heads = {layer: ExitHead(ctx.width, ctx.embed_dim) for layer in layers}
            features = getattr(ctx.heads, self.config.feature)
            train_heads(heads, {layer: features[:, layer] for layer in layers}, ctx.heads.labels,
                        self.classifier, seed=ctx.seed, weights=weights,
                        epochs=self.config.epochs, batch_size=self.config.batch_size, lr=self.config.lr)
            return nn.ModuleDict({str(layer): head for layer, head in heads.items()}).state_dict()

        # methods with the same head recipe (cls-ee, confidence, threshold sweeps) train the heads once;
        # the cache key also covers this file's code, which defines train()
        name = json.dumps(["per-layer-heads", recipe, layers, sorted(weights.items())], default=str)
        self.heads = load_heads(ctx.cached(name, train), layers, ctx.embed_dim)

    def layer_logits(self, layer: int, view: LayerView) -> torch.Tensor:
        """The layer's head applied to the view's feature, on the feature's device."""
        feature = view.cls() if self.config.feature == "cls" else view.patch_mean()
        classifier = on_device(self.classifier, feature.device)
        head = on_device(self.heads[str(layer)], feature.device)
        return classifier(head(feature))

    def head_flops(self, layer: int) -> float:
        return self.heads[str(layer)].flops() if str(layer) in self.heads else 0.0

    def state_dict(self) -> dict:
        return {"heads": self.heads.state_dict(), "layers": self.exit_layers(),
                "classifier": self.classifier.state()}

    def load_state_dict(self, state: dict) -> None:
        self.classifier = Classifier.from_state(state["classifier"])
        self.heads = load_heads(state["heads"], state["layers"], embed_dim=self.classifier.embed_dim)
