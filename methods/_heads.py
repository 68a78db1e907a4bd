"""Exit heads shared by the method plugins: features -> CLIP-space class scores.

A head maps a layer's feature (CLS token or patch-token mean) into the
image-embedding space and scores it by cosine similarity with the zero-shot
text classifier, times CLIP's temperature, so its logits are comparable with
the full-depth model's. Sizes scale with the backbone: width -> width ->
embed_dim (768 -> 768 -> 512 on ViT-B/32).

:class:`PerLayerHeads` is the base of the methods that put one such head
after each exit layer (cls-ee, pabee, confidence); they differ in how the
heads are weighted in training and in the exit rule.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.options import option
from harness.policy import THRESHOLD_GRID, ExitPolicy, FitContext, LayerView

# Threshold heads sweep the paper's grid and three high thresholds, for the low-saving end of the curve
THRESHOLD_KNOB_GRID = (*THRESHOLD_GRID, 0.95, 0.98, 0.99)


class ExitHead(nn.Module):
    """LayerNorm -> Linear(width, width) -> GELU -> Linear(width, embed_dim)."""

    def __init__(self, width: int, embed_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or width
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Image-space embedding (not normalised)."""
        return self.net(features)

    def flops(self) -> float:
        """Multiply-adds x 2 of the two Linear layers for one sample."""
        return float(sum(2 * m.in_features * m.out_features for m in self.net if isinstance(m, nn.Linear)))


def head_logits(embedding: torch.Tensor, classifier: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Cosine similarity with the class embeddings, times CLIP's temperature."""
    return logit_scale * F.normalize(embedding, dim=-1) @ classifier.T


def train_heads(
    heads: dict[int, ExitHead],
    features: dict[int, np.ndarray],
    labels: np.ndarray,
    classifier: torch.Tensor,
    logit_scale: float,
    seed: int,
    weights: dict[int, float] | None = None,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 5e-4,
    extra_loss: Callable[[int, torch.Tensor, np.ndarray], torch.Tensor] | None = None,
) -> None:
    """Train heads jointly with a weighted sum of their cross-entropies (Adam, seeded order).

    Args:
        heads: layer -> head; features: layer -> [N, width] inputs.
        weights: layer -> loss weight (default 1 each); normalised to sum to 1.
        extra_loss: optional ``f(layer, embedding, batch_indices)`` added to a
            head's loss (LRA-EE's distillation toward the fp32 embedding).
    """
    gen = torch.Generator().manual_seed(seed)
    x = {layer: torch.from_numpy(np.array(f, dtype=np.float32)) for layer, f in features.items()}  # copies
    y = torch.from_numpy(np.array(labels, dtype=np.int64))
    w = weights or {layer: 1.0 for layer in heads}
    total = sum(w.values())
    params = [p for head in heads.values() for p in head.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    for head in heads.values():
        head.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            loss = torch.zeros(())
            for layer, head in heads.items():
                embedding = head(x[layer][idx])
                term = F.cross_entropy(head_logits(embedding, classifier, logit_scale), y[idx])
                if extra_loss is not None:
                    term = term + extra_loss(layer, embedding, idx.numpy())
                loss = loss + w[layer] / total * term
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for head in heads.values():
        head.eval().requires_grad_(False)


def load_heads(state: dict, layers: list[int], embed_dim: int) -> nn.ModuleDict:
    """Rebuild frozen per-layer :class:`ExitHead` modules (keys: layer numbers) from a state dict."""
    width = state[f"{layers[0]}.net.0.weight"].shape[0]
    heads = nn.ModuleDict({str(layer): ExitHead(width, embed_dim) for layer in layers})
    heads.load_state_dict(state)
    return heads.eval().requires_grad_(False)


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
        self.classifier = torch.zeros(0)
        self.logit_scale = 1.0

    def loss_weights(self, layers: list[int]) -> dict[int, float]:
        """Per-head weights of the joint training loss (uniform by default)."""
        return {layer: 1.0 for layer in layers}

    def exit_layers(self) -> list[int]:
        return sorted(int(k) for k in self.heads)

    def fit(self, ctx: FitContext) -> None:
        layers = list(self.config.exit_layers or range(1, ctx.num_blocks))
        self.classifier, self.logit_scale = ctx.classifier.float(), ctx.logit_scale
        weights = self.loss_weights(layers)
        recipe = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(HeadsConfig)}

        def train() -> dict:
            with torch.random.fork_rng():
                torch.manual_seed(ctx.seed)
                heads = {layer: ExitHead(ctx.width, ctx.embed_dim) for layer in layers}
            features = getattr(ctx.heads, self.config.feature)
            train_heads(heads, {layer: features[:, layer] for layer in layers}, ctx.heads.labels,
                        self.classifier, self.logit_scale, seed=ctx.seed, weights=weights,
                        epochs=self.config.epochs, batch_size=self.config.batch_size, lr=self.config.lr)
            return nn.ModuleDict({str(layer): head for layer, head in heads.items()}).state_dict()

        # methods with the same head recipe (cls-ee, confidence, threshold sweeps) train the heads once;
        # the cache key also covers this file's code, which defines train()
        name = json.dumps(["per-layer-heads", recipe, layers, sorted(weights.items())], default=str)
        self.heads = load_heads(ctx.cached(name, train), layers, ctx.embed_dim)

    def layer_logits(self, layer: int, view: LayerView) -> torch.Tensor:
        """The layer's head applied to the view's feature."""
        feature = view.cls() if self.config.feature == "cls" else view.patch_mean()
        return head_logits(self.heads[str(layer)](feature), self.classifier, self.logit_scale)

    def head_flops(self, layer: int) -> float:
        return self.heads[str(layer)].flops() if str(layer) in self.heads else 0.0

    def state_dict(self) -> dict:
        return {"heads": self.heads.state_dict(), "layers": self.exit_layers(),
                "classifier": self.classifier, "logit_scale": self.logit_scale}

    def load_state_dict(self, state: dict) -> None:
        self.heads = load_heads(state["heads"], state["layers"], embed_dim=state["classifier"].shape[1])
        self.classifier, self.logit_scale = state["classifier"], state["logit_scale"]
