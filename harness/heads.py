"""Exit heads: a layer's feature -> class scores, the model's own classifier, and the one recipe that trains heads.

A head maps a layer's feature (CLS token or patch-token mean) into the
image-embedding space and scores it with the backbone's own
:class:`Classifier` (for CLIP, cosine similarity with the zero-shot text
classifier times CLIP's temperature; for a timm classifier, its linear
head), so its logits are comparable with the full-depth model's. Sizes scale
with the backbone: width -> width -> embed_dim (768 -> 768 -> 512 on ViT-B/32).

The method plugins (``methods/``) and the harness's own controls
(:mod:`harness.controls`) train their heads with :func:`train_heads`, so a
control and a method differ only in how their heads are used.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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


class Classifier(nn.Module):
    """Class scores [B, C] of image embeddings [B, E], as the full-depth model computes them.

    With a ``logit_scale`` (CLIP, zero-shot): the temperature times the cosine
    similarity with the class embeddings ``weight`` [C, E]. Without one (a
    timm classifier): its own linear head, ``embedding @ weight.T + bias``.
    """

    def __init__(self, weight: torch.Tensor, logit_scale: float | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.logit_scale = None if logit_scale is None else float(logit_scale)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        if self.logit_scale is not None:
            return self.logit_scale * F.normalize(embedding, dim=-1) @ self.weight.T
        return F.linear(embedding, self.weight, self.bias)

    def describe(self) -> str:
        kind = "zero-shot, cosine x temperature" if self.logit_scale is not None else "the model's linear head"
        return f"{self.num_classes} classes ({kind})"

    def copy_to(self, device: str | torch.device) -> "Classifier":
        """A copy on ``device`` (this one stays where it is)."""
        return Classifier.from_state(self.state()).to(device)

    def state(self) -> dict:
        """What a fitted policy saves of it (tensors and numbers only)."""
        return {"weight": self.weight, "bias": self.bias, "logit_scale": self.logit_scale}

    @classmethod
    def from_state(cls, state: dict) -> "Classifier":
        return cls(state["weight"], state["logit_scale"], state["bias"])


def train_heads(
    heads: dict[int, ExitHead],
    features: dict[int, np.ndarray],
    labels: np.ndarray,
    classifier: Classifier,
    seed: int,
    weights: dict[int, float] | None = None,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 5e-4,
    extra_loss: Callable[[int, torch.Tensor, np.ndarray], torch.Tensor] | None = None,
) -> None:
    """Train heads jointly with a weighted sum of their cross-entropies (Adam, seeded order).

    Args:
        heads: layer -> head; features: layer -> [N, width] inputs (memory maps
            are fine: each batch's rows are read and converted as it is drawn).
        weights: layer -> loss weight (default 1 each); normalised to sum to 1.
        extra_loss: optional ``f(layer, embedding, batch_indices)`` added to a
            head's loss (LRA-EE's distillation toward the fp32 embedding).
    """
    gen = torch.Generator().manual_seed(seed)
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
            rows = idx.numpy()
            loss = torch.zeros(())
            for layer, head in heads.items():
                embedding = head(torch.from_numpy(np.asarray(features[layer][rows], dtype=np.float32)))
                term = F.cross_entropy(classifier(embedding), y[idx])
                if extra_loss is not None:
                    term = term + extra_loss(layer, embedding, rows)
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
