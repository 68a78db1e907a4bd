"""Damage scenarios: towers hurt in a known, seeded way, to test the instrument itself.

Neither family models a real chip; each exists so that a benchmark result
can be checked against a case whose answer is known by construction.

``outliers-bK-cC-xS-BASE``
    Function-preserving LayerNorm-channel outliers, then ``BASE``. From block
    ``K`` on (1-based), ``C`` channels of both LayerNorms' outputs (``ln_1``
    and ``ln_2``) are multiplied by ``S``, and the matching input columns of
    the layers they feed (``attn.in_proj``, ``mlp.c_fc``) are divided by ``S``:
    the fp32 tower computes the same function (the inverse of SmoothQuant's
    fold, :func:`~harness.quantizers._smooth.fold_channel_factors`), but a
    quantizer that shares one activation scale across channels (per token or
    per tensor) now spends its range on ``C`` channels. Large CLIP and LLM
    transformers grow such channels in training; this injects them into a
    model too small to have them. The channels are a seeded draw, the same in
    every block, recorded in the config.

``noise-bK-sS[-BASE]``
    ``BASE`` (default ``fp32``), then noise added to the residual stream after
    every block from ``K`` on: per token, ``S`` times the token's RMS times a
    unit-RMS pseudo-random vector. The vector is a fixed, seeded function of the
    token itself (the sine of a random projection at high frequency), so the
    damage is deterministic and independent of the batch, yet carries nothing
    a head could use. It destroys information after block ``K - 1``: the
    positive control of ``experiment validate``, where exiting before the
    damage must beat any head recalibrated on the damaged last block.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from harness.errors import ConfigError
from harness.quantizers import Quantizer, create_quantizer, register_quantizer_family
from harness.quantizers._smooth import fold_channel_factors, smoothing_pairs
from harness.towers import block_index, tower

# The draws that define a scenario: outlier channels, noise projections (per block).
SCENARIO_SEED = 0
# Radians per unit of the projected token: high enough that the noise varies like random draws from
# token to token, low enough that float rounding in the token moves the noise only by rounding.
NOISE_FREQUENCY = 8.0


def _onset(visual: nn.Module, onset: int) -> list[int]:
    """1-based blocks from ``onset`` to the last; a clear error when the tower is shallower."""
    num_blocks = len(tower(visual).blocks)
    if not 1 <= onset <= num_blocks:
        raise ConfigError(f"damage onset block {onset} is outside this tower's blocks 1..{num_blocks}")
    return list(range(onset, num_blocks + 1))


def _base(name: str | None, default: str) -> Quantizer:
    base = create_quantizer(name or default)
    if base.calibration_split is not None:
        raise ConfigError(f"a damage scenario cannot wrap {base.name!r}, which needs its own calibration")
    return base


@register_quantizer_family("outliers-bK-cC-xS-BASE",
                           r"outliers-b(?P<onset>\d+)-c(?P<channels>\d+)-x(?P<scale>\d+(?:\.\d+)?)-(?P<base>.+)")
class LayerNormOutliers(Quantizer):
    """Function-preserving outliers: C LayerNorm channels x S from block K on, then BASE (synthetic damage)."""

    def __init__(self, onset: str, channels: str, scale: str, base: str):
        self.onset, self.channels, self.scale = int(onset), int(channels), float(scale)
        if self.channels < 1 or self.scale <= 0:
            raise ConfigError("outliers: need at least 1 channel and a positive scale")
        self.base = _base(base, "fp32")
        self.batch_invariant = self.base.batch_invariant  # the fold only changes static weights
        self.devices = self.base.devices
        self._where: dict[str, Any] | None = None  # blocks and channels, known once a tower is seen

    def config(self) -> dict[str, Any]:
        return {**super().config(), "synthetic": True,
                "damage": f"LayerNorm-channel outliers x{self.scale:g} from block {self.onset} "
                          f"(outputs of the LayerNorms before attention and MLP; the matching input columns of "
                          f"the q/k/v projection and the first MLP Linear divided alike)",
                "outliers": {"onset_block": self.onset, "channels": self.channels, "scale": self.scale,
                             "seed": SCENARIO_SEED, **(self._where or {})},
                "base": self.base.config()}

    def outlier_channels(self, width: int) -> list[int]:
        if self.channels > width:
            raise ConfigError(f"outliers: {self.channels} channels asked, the tower has {width}")
        generator = torch.Generator().manual_seed(SCENARIO_SEED)
        return sorted(torch.randperm(width, generator=generator)[:self.channels].tolist())

    def _factors(self, visual: nn.Module) -> dict[str, torch.Tensor]:
        blocks = _onset(visual, self.onset)
        width = tower(visual).width
        channels = self.outlier_channels(width)
        self._where = {"blocks": blocks, "channel_indices": channels}
        s = torch.ones(width)
        s[channels] = 1 / self.scale  # the fold divides the LayerNorm by s and multiplies the weights by s
        return {norm: s for norm, _ in smoothing_pairs(visual) if block_index(visual, norm) + 1 in blocks}

    def targets(self, visual: nn.Module) -> list[str]:
        """The base's targets plus the layers fed by an outlier LayerNorm (their LayerNorms change too)."""
        fed = {layer for norm, layer in smoothing_pairs(visual) if norm in self._factors(visual)}
        names = set(self.base.targets(visual)) | fed
        return [name for name, _ in visual.named_modules() if name in names]

    def quantize(self, visual: nn.Module) -> nn.Module:
        return self.base.quantize(fold_channel_factors(visual, self._factors(visual)))


class ResidualNoise:
    """Forward hook on a block: adds ``size`` x per-token RMS of pseudo-random unit-RMS noise to its output."""

    def __init__(self, width: int, size: float, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(width, width, generator=generator) / math.sqrt(width)
        self.phase = torch.rand(width, generator=generator) * 2 * math.pi
        self.size = size

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        rms = output.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-12)
        projection = self.projection.to(output.device, output.dtype)
        phase = self.phase.to(output.device, output.dtype)
        # sin of a uniform phase has RMS 1/sqrt(2)
        noise = math.sqrt(2) * torch.sin(NOISE_FREQUENCY * (output / rms) @ projection + phase)
        return output + self.size * rms * noise


@register_quantizer_family("noise-bK-sS[-BASE]",
                           r"noise-b(?P<onset>\d+)-s(?P<size>\d+(?:\.\d+)?)(?:-(?P<base>.+))?")
class ResidualStreamNoise(Quantizer):
    """BASE (fp32), then S x RMS pseudo-random noise on the residual stream after each block from K (synthetic)."""

    def __init__(self, onset: str, size: str, base: str | None = None):
        self.onset, self.size = int(onset), float(size)
        self.base = _base(base, "fp32")
        self.batch_invariant = self.base.batch_invariant  # the noise is a per-token function
        self.devices = self.base.devices

    def config(self) -> dict[str, Any]:
        return {**super().config(), "synthetic": True,
                "damage": f"residual-stream noise, {self.size:g} x per-token RMS, after every block from "
                          f"block {self.onset}",
                "noise": {"onset_block": self.onset, "size": self.size, "frequency": NOISE_FREQUENCY,
                          "seed": SCENARIO_SEED},
                "base": self.base.config()}

    def targets(self, visual: nn.Module) -> list[str]:
        """The base's targets plus each block whose output gets the noise."""
        damaged = {f"{tower(visual).blocks_name}.{block - 1}" for block in _onset(visual, self.onset)}
        names = set(self.base.targets(visual)) | damaged
        return [name for name, _ in visual.named_modules() if name in names]

    def quantize(self, visual: nn.Module) -> nn.Module:
        blocks = _onset(visual, self.onset)
        damaged = self.base.quantize(copy.deepcopy(visual))
        width = tower(visual).width
        for block in blocks:
            hook = ResidualNoise(width, self.size, seed=SCENARIO_SEED * 1000 + block)
            tower(damaged).blocks[block - 1].register_forward_hook(hook)
        return damaged
