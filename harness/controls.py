"""Controls: what a method must beat before its gain is credited to routing.

Two policies, each with a head on one feature (``cls``: the CLS token;
``ssa``: the patch-token mean), trained with the methods' own recipe
(:func:`harness.heads.train_heads`) on the quantized ``heads`` split:

- a **static exit** classifies every sample after block ``L`` with the head
  there (no routing: the same depth for every sample). Its knob is ``L``;
  the protocol picks ``L`` on the ``gate`` split at each FLOPs budget like
  any method's knob.
- **recalibration** is the static exit after the last block: every sample
  runs the whole tower and is classified by a head trained on the quantized
  last block instead of the zero-shot head.

They are ordinary :class:`~harness.policy.ExitPolicy` objects, scored by the
same code as the methods, but kept out of the method registry: results mark
their rows ``kind: "control"``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass

import torch
from torch import nn

from harness.drivers import on_device
from harness.heads import Classifier, ExitHead, load_heads, train_heads
from harness.options import BLOCKS, option
from harness.policy import Decision, ExitPolicy, FitContext, LayerView

# control name -> head feature
CONTROL_FEATURES = {"static-cls": "cls", "static-ssa": "patch_mean"}


@dataclass
class StaticExitConfig:
    feature: str = option("cls", choices=("cls", "patch_mean"))  # head input
    block: int | None = option(None, min=1, max=BLOCKS)  # exit after this block (None: the last, recalibration)
    epochs: int = option(3, min=1)  # the methods' head recipe: Adam, batch 64, lr 5e-4
    batch_size: int = option(64, min=1)
    lr: float = option(5e-4, above=0)


class StaticExit(ExitPolicy):
    """Every sample exits after block ``block`` through a head trained there (a control, not a method).

    One head per block is trained in one fit (cached like the methods' heads),
    so moving the knob to another block needs no refit.
    """

    Config = StaticExitConfig
    knob = "block"
    kind = "control"

    def __init__(self, config: StaticExitConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.needs = frozenset({self.config.feature})
        self.name = next(name for name, feature in CONTROL_FEATURES.items() if feature == self.config.feature)
        self.heads = nn.ModuleDict()
        self.classifier: Classifier | None = None  # the model's, copied at fit time

    @property
    def knob_grid(self) -> tuple[int, ...]:
        """Every block that has a head (known once fitted)."""
        return tuple(sorted(int(k) for k in self.heads))

    @property
    def num_blocks(self) -> int:
        return max(self.knob_grid)

    def exit_layers(self) -> list[int]:
        return [self.config.block or self.num_blocks]

    def fit(self, ctx: FitContext) -> None:
        c = self.config
        layers = list(range(1, ctx.num_blocks + 1))
        self.classifier = ctx.classifier.copy_to("cpu")  # fits on the CPU

        def train() -> dict:
            with torch.random.fork_rng():
                torch.manual_seed(ctx.seed)
                heads = {layer: ExitHead(ctx.width, ctx.embed_dim) for layer in layers}
            features = getattr(ctx.heads, c.feature)
            train_heads(heads, {layer: features[:, layer] for layer in layers}, ctx.heads.labels,
                        self.classifier, seed=ctx.seed, epochs=c.epochs,
                        batch_size=c.batch_size, lr=c.lr)
            return nn.ModuleDict({str(layer): head for layer, head in heads.items()}).state_dict()

        recipe = json.dumps(["static-exit-heads", c.feature, c.epochs, c.batch_size, c.lr, layers])
        self.heads = load_heads(ctx.cached(recipe, train), layers, ctx.embed_dim)

    def decide(self, layer: int, view: LayerView) -> Decision:
        feature = view.cls() if self.config.feature == "cls" else view.patch_mean()
        classifier = on_device(self.classifier, feature.device)
        head = on_device(self.heads[str(layer)], feature.device)
        logits = classifier(head(feature))
        return Decision(exit=torch.ones(len(view), dtype=torch.bool), logits=logits)

    def with_knob(self, value: float) -> "StaticExit":
        """This control exiting after block ``value`` instead (heads shared, no refit)."""
        if int(value) not in self.knob_grid:
            raise ValueError(f"{self.name}: no head after block {value} (blocks {self.knob_grid})")
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, block=int(value))
        return other

    def head_flops(self, layer: int) -> float:
        return self.heads[str(layer)].flops() if layer in self.exit_layers() else 0.0

    def state_dict(self) -> dict:
        return {"heads": self.heads.state_dict(), "layers": list(self.knob_grid),
                "classifier": self.classifier.state()}

    def load_state_dict(self, state: dict) -> None:
        self.classifier = Classifier.from_state(state["classifier"])
        self.heads = load_heads(state["heads"], state["layers"], embed_dim=self.classifier.embed_dim)


def create_control(name: str, **config) -> StaticExit:
    """``static-cls`` or ``static-ssa`` with ``config`` overrides."""
    if name not in CONTROL_FEATURES:
        raise KeyError(f"unknown control {name!r}; controls: {', '.join(CONTROL_FEATURES)}")
    return StaticExit(feature=CONTROL_FEATURES[name], **config)
