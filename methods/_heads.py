"""Exit heads shared by the method plugins: features -> CLIP-space class scores.

A head maps a layer's feature (CLS token or patch-token mean) into the
image-embedding space and scores it by cosine similarity with the zero-shot
text classifier, times CLIP's temperature, so its logits are comparable with
the full-depth model's. Sizes scale with the backbone: width -> width ->
embed_dim (768 -> 768 -> 512 on ViT-B/32).
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


def head_logits(embedding: torch.Tensor, classifier: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Cosine similarity with the class embeddings, times CLIP's temperature."""
    return logit_scale * F.normalize(embedding, dim=-1) @ classifier.T


def train_head(
    head: ExitHead,
    features: np.ndarray,
    labels: np.ndarray,
    classifier: torch.Tensor,
    logit_scale: float,
    seed: int,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 5e-4,
    extra_loss: Callable[[torch.Tensor, np.ndarray], torch.Tensor] | None = None,
) -> ExitHead:
    """Train ``head`` with cross-entropy on its cosine logits (Adam, seeded shuffling).

    Args:
        features: [N, width] inputs (e.g. one layer's patch means).
        extra_loss: optional ``f(embedding, batch_indices)`` added to the loss
            (LRA-EE's cosine distillation toward the fp32 embedding).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.array(features, dtype=np.float32))  # a copy: traces are read-only maps
    y = torch.from_numpy(np.array(labels, dtype=np.int64))
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            embedding = head(x[idx])
            loss = F.cross_entropy(head_logits(embedding, classifier, logit_scale), y[idx])
            if extra_loss is not None:
                loss = loss + extra_loss(embedding, idx.numpy())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return head.eval().requires_grad_(False)
