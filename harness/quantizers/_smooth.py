"""SmoothQuant ``smoothquant[-BASE]``: move activation outliers into the weights, then quantize.

SmoothQuant (Xiao et al. 2023) divides each input channel j of a Linear's
activations X by a factor s_j and multiplies column j of its weight W by the
same s_j, which leaves ``X @ W.T`` unchanged in exact arithmetic but makes
the activations easier to quantize when a few channels carry outliers::

    s_j = max|X_j| ** alpha / max_i |W_ij| ** (1 - alpha)

In a pre-norm ViT block the division is free: it is folded into the affine
parameters of the LayerNorm that produces X. Each block has two such pairs,
``ln_1`` -> the attention input projection (``attn.in_proj_weight``, shared
by queries, keys and values) and ``ln_2`` -> ``mlp.c_fc``. ``max|X_j|`` comes
from calibration images (the ``gate`` split, see :class:`harness.session.Session`).

``smoothquant`` smooths then applies ``int8-dynamic`` (the paper's INT8
scheme); ``smoothquant-BASE`` applies any other quantizer after smoothing;
``smoothquant-fp32`` smooths only, which must leave the tower's output
unchanged up to float rounding (tested).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from harness.errors import ConfigError
from harness.towers import tower
from harness.quantizers import (Quantizer, QuantizerUnavailable, calibration_record, create_quantizer,
                                register_quantizer_family)

DEFAULT_BASE = "int8-dynamic"
DEFAULT_ALPHA = 0.5
# Floor for the maxima and the factors: a dead channel (all zeros) must not give s = 0 or inf.
_MIN = 1e-5
# Calibration images per forward pass (bounds memory for large towers).
_CALIBRATION_BATCH = 64


def smoothing_factors(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-channel factors ``s = act_max ** alpha / weight_max ** (1 - alpha)``.

    Args:
        act_max: [D] max |X_j| over every calibration token.
        weight_max: [D] max_i |W_ij| over the following layer's output rows.
        alpha: migration strength; 0 leaves the activations alone, 1 moves all
            of their range into the weights.
    """
    return (act_max.clamp(min=_MIN) ** alpha / weight_max.clamp(min=_MIN) ** (1 - alpha)).clamp(min=_MIN)


def smoothing_pairs(visual: nn.Module) -> list[tuple[str, str]]:
    """(LayerNorm, the layer it feeds) qualified names, two per block: the attention's input norm -> its
    q/k/v projection, the MLP's input norm -> its first Linear (open_clip: ``ln_1 -> attn``, ``ln_2 ->
    mlp.c_fc``; timm: ``norm1 -> attn.qkv``, ``norm2 -> mlp.fc1``).

    Raises:
        QuantizerUnavailable: a block is not a pre-norm block with affine
            LayerNorms feeding a packed q/k/v projection and a first MLP Linear
    """
    adapter = tower(visual)
    layers = adapter.layers
    qkv_name = layers.qkv or layers.attn
    pairs = []
    for i, block in enumerate(adapter.blocks):
        norm1, norm2 = block.get_submodule(layers.norm1), block.get_submodule(layers.norm2)
        qkv, fc1 = block.get_submodule(qkv_name), block.get_submodule(layers.fc1)
        supported = (
            isinstance(norm1, nn.LayerNorm) and norm1.weight is not None
            and isinstance(norm2, nn.LayerNorm) and norm2.weight is not None
            and (isinstance(qkv, nn.Linear) or isinstance(qkv, nn.MultiheadAttention) and qkv._qkv_same_embed_dim)
            and isinstance(fc1, nn.Linear) and not hasattr(block, "ln_1_kv")
        )
        if not supported:
            raise QuantizerUnavailable(
                f"folding factors into LayerNorms (smoothquant, outliers) needs pre-norm blocks (affine "
                f"{layers.norm1} -> a packed q/k/v projection, affine {layers.norm2} -> {layers.fc1} Linear); "
                f"block {i} is not one"
            )
        prefix = f"{adapter.blocks_name}.{i}"
        pairs += [(f"{prefix}.{layers.norm1}", f"{prefix}.{qkv_name}"),
                  (f"{prefix}.{layers.norm2}", f"{prefix}.{layers.fc1}")]
    return pairs


def _input_weight(module: nn.Module) -> nn.Parameter:
    """The [out, in] weight that multiplies the LayerNorm output."""
    return module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight


def fold_channel_factors(visual: nn.Module, factors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``visual`` where each LayerNorm named in ``factors`` is divided by its factors s and the
    matching input columns of the layer it feeds are multiplied by s (:func:`smoothing_pairs`).

    The tower computes the same function up to float rounding; only where the
    activations' range sits (LayerNorm output or weights) moves.
    """
    folded = copy.deepcopy(visual)
    with torch.no_grad():
        for norm_name, layer_name in smoothing_pairs(folded):
            if norm_name not in factors:
                continue
            norm = folded.get_submodule(norm_name)
            s = factors[norm_name].to(norm.weight.device, norm.weight.dtype)
            norm.weight.div_(s)
            if norm.bias is not None:
                norm.bias.div_(s)
            _input_weight(folded.get_submodule(layer_name)).mul_(s)
    return folded


@register_quantizer_family("smoothquant[-BASE]", r"smoothquant(?:-(?P<base>.+))?")
class SmoothQuant(Quantizer):
    """SmoothQuant: per-channel smoothing from gate-split activations (alpha 0.5), then BASE (int8-dynamic)."""

    calibration_split = "gate"

    def __init__(self, base: str | None = None, alpha: float = DEFAULT_ALPHA):
        self.base = create_quantizer(base or DEFAULT_BASE)
        if self.base.calibration_split is not None:
            raise ConfigError(f"smoothquant cannot wrap {self.base.name!r}, which needs its own calibration")
        self.alpha = alpha
        self.batch_invariant = self.base.batch_invariant  # smoothing only changes static weights
        self.devices = self.base.devices
        self.factors: dict[str, torch.Tensor] | None = None  # LayerNorm name -> s, set by calibrate
        self._calibration: dict[str, Any] | None = None

    def config(self) -> dict[str, Any]:
        return {**super().config(),
                "smoothing": "SmoothQuant: in every block, the attention's input LayerNorm -> its q/k/v projection "
                             "and the MLP's input LayerNorm -> its first Linear",
                "smoothing alpha": self.alpha, "base": self.base.config(), "calibration": self._calibration}

    def targets(self, visual: nn.Module) -> list[str]:
        """The base's targets plus every smoothed layer (their LayerNorms change too)."""
        names = set(self.base.targets(visual)) | {layer for _, layer in smoothing_pairs(visual)}
        return [name for name, _ in visual.named_modules() if name in names]

    @torch.no_grad()
    def calibrate(self, visual: nn.Module, images: torch.Tensor) -> None:
        """Run ``images`` through ``visual`` and derive the factors from each LayerNorm's output abs-max."""
        if len(images) == 0:
            raise ConfigError(f"smoothquant needs calibration images; the {self.calibration_split!r} split gave none")
        pairs = smoothing_pairs(visual)
        act_max: dict[str, torch.Tensor] = {}

        def recorder(name: str):
            def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
                channel_max = output.detach().abs().flatten(0, -2).amax(dim=0).float()
                act_max[name] = torch.maximum(act_max[name], channel_max) if name in act_max else channel_max
            return record

        device = next(visual.parameters()).device
        handles = [visual.get_submodule(norm).register_forward_hook(recorder(norm)) for norm, _ in pairs]
        try:
            for start in range(0, len(images), _CALIBRATION_BATCH):
                visual(images[start:start + _CALIBRATION_BATCH].to(device))
        finally:
            for handle in handles:
                handle.remove()
        self.factors = {}
        for norm, layer in pairs:
            weight_max = _input_weight(visual.get_submodule(layer)).detach().abs().amax(dim=0).float()
            self.factors[norm] = smoothing_factors(act_max[norm], weight_max, self.alpha)
        self._calibration = calibration_record(self.calibration_split, images)

    def smooth(self, visual: nn.Module) -> nn.Module:
        """A copy of ``visual`` with the factors folded in (same function, up to float rounding)."""
        if self.factors is None:
            raise RuntimeError("smoothquant: call calibrate(visual, images) before quantize() "
                               f"(harness.session.Session does, on the {self.calibration_split!r} split)")
        return fold_channel_factors(visual, self.factors)

    def quantize(self, visual: nn.Module) -> nn.Module:
        return self.base.quantize(self.smooth(visual))
