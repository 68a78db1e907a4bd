"""Zero-shot classifier weights: class names x prompt templates -> text embeddings."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# Prompts encoded per text-tower forward when building a classifier. ImageNet-1k
# with open_clip's 80 templates is 80,000 prompts: in one batch they need more
# than 24 GB (measured: OOM-killed); a batch of this size needs a few hundred MB
# on ViT-B/32's text tower.
PROMPTS_PER_BATCH = 1024


def class_text_embeddings(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """The standard CLIP prompt ensemble, all prompts in one text-tower batch.

    Each class name is put into every template, encoded by the text tower,
    L2-normalised, averaged over templates and normalised again.
    Differentiable when called with grad enabled, which only the embedded
    model's training does (10 classes); everything else goes through
    :func:`zero_shot_weights`, which bounds the batch.

    Returns:
        ``[num_classes, embed_dim]`` tensor of unit vectors.
    """
    prompts = [template.format(name) for name in classnames for template in templates]
    device = next(model.parameters()).device
    tokens = tokenizer(prompts).to(device)
    text = F.normalize(model.encode_text(tokens).float(), dim=-1)
    text = text.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(text, dim=-1)


@torch.no_grad()
def zero_shot_weights(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    prompts_per_batch: int = PROMPTS_PER_BATCH,
    progress: bool = True,
) -> torch.Tensor:
    """:func:`class_text_embeddings` without autograd, a bounded number of prompts per forward.

    Classes are encoded in groups of ``max(1, prompts_per_batch // len(templates))``
    (as open_clip's ``build_zero_shot_classifier`` batches by classes), so
    memory does not grow with the class count. A class's templates always
    share one forward, so a class count that fits one batch (the embedded
    default) gives exactly the numbers of a single call.

    Returns:
        ``[num_classes, embed_dim]`` tensor of unit vectors.
    """
    from tqdm import tqdm

    if not classnames or not templates:
        raise ValueError("a zero-shot classifier needs at least one class name and one template")
    step = max(1, prompts_per_batch // len(templates))
    starts = range(0, len(classnames), step)
    bar = tqdm(starts, desc=f"text tower: {len(classnames)} classes x {len(templates)} templates",
               unit="batch", leave=False, disable=not progress or len(starts) == 1)
    return torch.cat([class_text_embeddings(model, tokenizer, classnames[i:i + step], templates) for i in bar])
