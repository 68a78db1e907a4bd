"""EViT-style token pruning: keep the patch tokens CLS attends to most, training-free.

After each block of ``prune_after`` the patch tokens are ranked by the
CLS-to-patch attention of the next block (the view's ``cls_attention``,
mean over heads) and the top ``ceil(keep_rate * N)`` of the N present are
kept; with ``fuse`` the dropped ones are replaced by one token, their
attention-weighted mean, which later blocks treat as a patch token (and the
FLOPs count as one). EViT reorganises tokens inside blocks 4, 7 and 10 of a
12-block ViT with keep rate 0.7; here the driver prunes between blocks, so
the default prunes the tokens leaving blocks 3, 6 and 9, i.e. those entering
blocks 4, 7 and 10. Nothing is learned and nobody exits early.

The ranking needs the next block's query/key projection on the tokens
before pruning, which the next block then recomputes on the kept ones; that
extra work (keys of every token, the CLS query, the scores) is counted in
:meth:`EViT.head_flops`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.options import BLOCKS_BUT_LAST, option
from harness.policy import KEEP_RATIO_GRID, ExitPolicy, FitContext, LayerView, keep_top, register_method


@dataclass
class EViTConfig:
    keep_rate: float = option(0.7, above=0, max=1)  # share of the present patch tokens kept at each pruning block (count rounded up)
    prune_after: tuple[int, ...] = option((3, 6, 9), blocks=True, max=BLOCKS_BUT_LAST)  # prune the tokens leaving these blocks (1-based)
    fuse: bool = option(False)  # replace the dropped tokens by one token, their CLS-attention-weighted mean


def keep_count(rate: float, present: int) -> int:
    """EViT's budget: ``ceil(rate * present)`` tokens, at least one.

    Example:
        >>> keep_count(0.7, 49), keep_count(0.7, 35), keep_count(1.0, 49)
        (35, 25, 49)
    """
    return max(1, min(present, math.ceil(rate * present - 1e-9)))  # the tolerance: 0.7 * 50 is 35.000...01


@register_method("evit", "training-free token pruning: top-k patch tokens by CLS attention (EViT)")
class EViT(ExitPolicy):
    """Keeps the patch tokens with the most CLS attention after the blocks of ``prune_after``."""

    Config = EViTConfig
    needs = frozenset({"cls_attention", "patch_tokens"})
    prunes_tokens = True
    knob, knob_grid = "keep_rate", KEEP_RATIO_GRID

    def __init__(self, config: EViTConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.num_patches = 0  # the backbone's patch tokens and width, for head_flops (set by fit)
        self.width = 0

    def fit(self, ctx: FitContext) -> None:
        """Nothing to train; records the backbone's token count and width (for the FLOPs count)."""
        if ctx.backbone is None:
            raise ValueError("evit: the fit context has no backbone (it needs the token count)")
        layers = self.config.prune_after
        if list(layers) != sorted(set(layers)) or not all(1 <= layer < ctx.num_blocks for layer in layers):
            raise ValueError(f"evit: prune_after {layers} must be ascending blocks in 1..{ctx.num_blocks - 1}")
        if not ctx.backbone.has_class_token:
            raise ValueError("evit ranks patches by their attention from the class token; this model has none")
        self.num_patches, self.width = int(ctx.backbone.num_patches), int(ctx.width)

    def keep_tokens(self, layer: int, view: LayerView) -> torch.Tensor | None:
        if layer not in self.config.prune_after:
            return None
        present = view.patch_tokens().shape[1]
        count = keep_count(self.config.keep_rate, present)
        if count == present:
            return None
        return keep_top(view.cls_attention(), count)

    def merge_tokens(self, layer: int, view: LayerView, keep: torch.Tensor) -> torch.Tensor | None:
        if not self.config.fuse:
            return None
        weights = view.cls_attention().masked_fill(keep, 0.0)  # the dropped tokens' attention
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return (weights[:, :, None] * view.patch_tokens()).sum(dim=1, keepdim=True)

    def schedule(self) -> dict[int, tuple[int, int]]:
        """Pruning block -> (patch tokens present, patch tokens after pruning, fused token included)."""
        present, out = self.num_patches, {}
        for layer in self.config.prune_after:
            kept = keep_count(self.config.keep_rate, present)
            after = kept + (1 if self.config.fuse and kept < present else 0)
            out[layer] = (present, after)
            present = after
        return out

    def head_flops(self, layer: int) -> float:
        """The ranking's extra work at a pruning block: keys of CLS and the N patches, CLS's query, the scores
        (and the fused token's weighted sum); zero where nothing is dropped, which is skipped."""
        if layer not in self.config.prune_after or not self.num_patches:
            return 0.0
        present, after = self.schedule()[layer]
        if keep_count(self.config.keep_rate, present) == present:
            return 0.0
        d, tokens = self.width, present + 1
        flops = 2 * tokens * d * d + 2 * d * d + 2 * tokens * d
        if self.config.fuse:
            flops += 2 * (present - keep_count(self.config.keep_rate, present)) * d
        return float(flops)

    def state_dict(self) -> dict:
        return {"num_patches": self.num_patches, "width": self.width}

    def load_state_dict(self, state: dict) -> None:
        self.num_patches, self.width = int(state["num_patches"]), int(state["width"])
