"""Vision towers run block by block: one adapter per model family.

An early-exit driver needs three pieces of a vision transformer: the token
embedding, the list of blocks and the head. It also needs the token layout
(how many prefix tokens, class and register tokens, come before the patches)
and, for the LayerNorm folds of SmoothQuant and the outlier scenarios, the
names of the layers inside a block. A :class:`Tower` gives all of these for one family:

- ``open_clip``: open_clip's own ``VisionTransformer`` (``transformer.resblocks``,
  class-token or mean pooling, ``proj``).
- ``timm``: a timm ``VisionTransformer`` classifier (DeiT, ViT, with or
  without class and register tokens). Its "embedding" is the pre-logits
  feature (after the final norm, the model's pooling and ``fc_norm``); the
  classifier is the model's own linear head.
- ``open_clip-timm``: an open_clip ``TimmModel`` whose trunk is a timm
  ``VisionTransformer`` (SigLIP: no class token, attention pooling): the
  trunk's pooling and head, then open_clip's projection.

What "CLS" means: token 0 when the model has a class token. A model without
one (SigLIP, mean-pooled ViTs) has none, and the features and methods that
read it refuse such a model (:attr:`Tower.has_class_token`).

:func:`tower` picks the adapter of a vision module; a quantized copy of the
module gets the same adapter.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where the patches start in a token sequence, and whether token 0 is a class token.

    ``cls`` is token 0 for a model with a class token; for a model without
    one (SigLIP, mean-pooled ViTs) it is defined as the patch-token mean,
    the same as ``patch_mean``, so CLS-feature rows of such a model equal
    its patch-mean rows (the results record ``class_token: false``).
    """

    prefix: int = 1
    class_token: bool = True

    def patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """The patch tokens [B, N, D] of tokens [B, prefix + N, D]."""
        return tokens[:, self.prefix:]


@dataclasses.dataclass(frozen=True)
class BlockLayers:
    """Qualified names, inside one block, of the layers that folding LayerNorm factors (SmoothQuant, the
    outlier scenarios) pairs up: each pre-norm and the first layer it feeds.

    ``qkv`` is the packed query/key/value projection: a Linear (timm) or the
    ``in_proj_weight`` of an ``nn.MultiheadAttention`` (open_clip), named by
    ``attn``.
    """

    norm1: str
    attn: str
    norm2: str
    fc1: str
    qkv: str | None  # None: packed inside ``attn`` (nn.MultiheadAttention)


class Tower(abc.ABC):
    """The pieces of one vision tower (``visual``) an early-exit driver runs."""

    family: ClassVar[str]
    layers: ClassVar[BlockLayers]
    blocks_name: ClassVar[str]  # qualified name of the blocks inside ``visual``

    def __init__(self, visual: nn.Module):
        self.visual = visual

    @staticmethod
    @abc.abstractmethod
    def accepts(visual: nn.Module) -> bool:
        """Whether this adapter runs ``visual``."""

    @property
    @abc.abstractmethod
    def blocks(self) -> nn.Sequential | nn.ModuleList:
        """The transformer blocks, in order; each maps tokens [B, T, width] to tokens."""

    @property
    @abc.abstractmethod
    def width(self) -> int:
        """Token width."""

    @property
    @abc.abstractmethod
    def embed_dim(self) -> int:
        """Width of :meth:`head`'s output."""

    @property
    @abc.abstractmethod
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token (if any) and register tokens."""

    @property
    @abc.abstractmethod
    def has_class_token(self) -> bool:
        """Whether token 0 is a class token."""

    @property
    @abc.abstractmethod
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns)."""

    @property
    @abc.abstractmethod
    def image_size(self) -> tuple[int, int]:
        """Input (height, width) the tower expects."""

    @abc.abstractmethod
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> tokens [B, prefix + patches, width] entering block 1."""

    @abc.abstractmethod
    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block -> embedding [B, embed_dim] (not normalised)."""

    @property
    def num_patches(self) -> int:
        rows, columns = self.grid_size
        return rows * columns

    @property
    def device(self) -> torch.device:
        return next(self.visual.parameters()).device

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(self.num_prefix_tokens, self.has_class_token)

    def describe(self) -> dict[str, object]:
        """The token layout, for results."""
        return {"family": self.family, "prefix_tokens": self.num_prefix_tokens,
                "class_token": self.has_class_token, "grid": list(self.grid_size)}


class OpenClipTower(Tower):
    """open_clip's ``VisionTransformer`` with token or mean pooling (no attention pooler)."""

    family = "open_clip"
    blocks_name = "transformer.resblocks"
    layers = BlockLayers(norm1="ln_1", attn="attn", norm2="ln_2", fc1="mlp.c_fc", qkv=None)

    @staticmethod
    def accepts(visual: nn.Module) -> bool:
        from open_clip.transformer import VisionTransformer

        return isinstance(visual, VisionTransformer) and visual.attn_pool is None

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    @property
    def width(self) -> int:
        return self.visual.transformer.width

    @property
    def embed_dim(self) -> int:
        return self.visual.output_dim

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def has_class_token(self) -> bool:
        return True

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.visual.image_size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual._embeds(images)

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(tokens)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled


def _is_timm_vit(module: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return type(module) is VisionTransformer  # subclasses (relative positions, ...) change the block call


class _TimmTrunk(Tower, abc.ABC):
    """A timm ``VisionTransformer`` (:attr:`trunk`) run block by block."""

    layers = BlockLayers(norm1="norm1", attn="attn", norm2="norm2", fc1="mlp.fc1", qkv="attn.qkv")

    @property
    @abc.abstractmethod
    def trunk(self) -> nn.Module:
        """The timm ``VisionTransformer``."""

    @property
    def blocks(self) -> nn.Sequential:
        return self.trunk.blocks

    @property
    def width(self) -> int:
        return self.trunk.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        return self.trunk.num_prefix_tokens

    @property
    def has_class_token(self) -> bool:
        return self.trunk.has_class_token

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.trunk.patch_embed.grid_size)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.trunk.patch_embed.img_size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        trunk = self.trunk
        return trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images))))

    def pre_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The trunk's final norm, its own pooling (class token, mean or attention pooling) and ``fc_norm``."""
        return self.trunk.forward_head(self.trunk.norm(tokens), pre_logits=True)


class TimmTower(_TimmTrunk):
    """A timm ``VisionTransformer`` classifier; :meth:`head` gives its pre-logits feature and
    :attr:`classifier` the linear head that scores it."""

    family = "timm"
    blocks_name = "blocks"

    @staticmethod
    def accepts(visual: nn.Module) -> bool:
        return _is_timm_vit(visual)

    @property
    def trunk(self) -> nn.Module:
        return self.visual

    @property
    def embed_dim(self) -> int:
        return self.trunk.num_features

    @property
    def classifier(self) -> nn.Linear:
        head = self.trunk.head
        if not isinstance(head, nn.Linear):
            raise ValueError(f"timm model has no linear classifier head ({type(head).__name__})")
        return head

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pre_logits(tokens)


class OpenClipTimmTower(_TimmTrunk):
    """open_clip's ``TimmModel`` around a timm ``VisionTransformer`` trunk (SigLIP and other timm-trunk CLIPs)."""

    family = "open_clip-timm"
    blocks_name = "trunk.blocks"

    @staticmethod
    def accepts(visual: nn.Module) -> bool:
        from open_clip.timm_model import TimmModel

        return isinstance(visual, TimmModel) and _is_timm_vit(visual.trunk)

    @property
    def trunk(self) -> nn.Module:
        return self.visual.trunk

    @property
    def embed_dim(self) -> int:
        head = self.trunk.head  # the projection when open_clip's config says proj "none", else an Identity
        width = head.out_features if isinstance(head, nn.Linear) else self.trunk.num_features
        linears = [m for m in self.visual.head.modules() if isinstance(m, nn.Linear)]
        return linears[-1].out_features if linears else width

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.visual.head(self.trunk.head(self.pre_logits(tokens)))


TOWERS: tuple[type[Tower], ...] = (OpenClipTower, TimmTower, OpenClipTimmTower)


def tower(visual: nn.Module) -> Tower:
    """The adapter that runs ``visual``.

    Raises:
        TypeError: no adapter runs this kind of vision module (the families are listed).
    """
    for adapter in TOWERS:
        if adapter.accepts(visual):
            return adapter(visual)
    families = ", ".join(f"{t.family} ({t.__doc__.splitlines()[0].rstrip('.')})" for t in TOWERS)
    raise TypeError(f"no adapter runs a {type(visual).__name__} vision tower; supported: {families}")


def block_modules(visual: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every module inside the blocks of ``visual`` (the blocks excluded), in
    order: what quantizers may convert (never the embedding, the pooling or the projection/classifier)."""
    prefix = tower(visual).blocks_name + "."
    return [(name, module) for name, module in visual.named_modules() if name.startswith(prefix)
            and "." in name.removeprefix(prefix)]


def block_index(visual: nn.Module, name: str) -> int:
    """The 0-based block that the qualified module ``name`` of ``visual`` sits in."""
    return int(name.removeprefix(tower(visual).blocks_name + ".").split(".")[0])

