"""Zero-shot classifier weights: class names x prompt templates -> text embeddings."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def class_text_embeddings(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """The standard CLIP prompt ensemble.

    Each class name is put into every template, encoded by the text tower,
    L2-normalised, averaged over templates and normalised again.

    Returns:
        ``[num_classes, embed_dim]`` tensor of unit vectors (differentiable
        when called with grad enabled, as the embedded-model training does).
    """
    prompts = [template.format(name) for name in classnames for template in templates]
    device = next(model.parameters()).device
    tokens = tokenizer(prompts).to(device)
    text = F.normalize(model.encode_text(tokens).float(), dim=-1)
    text = text.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(text, dim=-1)
