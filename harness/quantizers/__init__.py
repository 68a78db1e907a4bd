"""Quantizers: a registry of schemes applied to a backbone's vision tower.

Each quantizer returns a quantized *copy* of the vision tower (the fp32 tower
stays usable, e.g. for the noise profile), names the Linear layers it
changes, and declares whether it is batch-invariant: whether a sample's output
is independent of the other samples in its batch (per-tensor dynamic
activation scales are not; per-token scales are).

Built-ins: ``fp32``, ``int8-dynamic`` (PyTorch's deprecated
``torch.ao.quantization.quantize_dynamic``, as in the reference paper; its
deprecation warning is silenced in our output), ``int8-torchao`` (torchao int8
weights + per-token dynamic int8 activations) and ``fake-wNaM[-tensor]``
(fake quantization of every Linear, attention projections included, for a
precision sweep) and ``smoothquant[-BASE]`` (SmoothQuant smoothing calibrated on
the ``gate`` split, then BASE, by default ``int8-dynamic``; ``smoothquant-fp32``
smooths only). More can come from other packages through the entry-point
group ``harness.quantizers``.
"""

from __future__ import annotations

import abc
import hashlib
from typing import Any

import torch
from torch import nn

from harness._registry import Registry
from harness.errors import UserError
from harness.towers import block_modules, tower


class QuantizerUnavailable(UserError, RuntimeError):
    """This quantizer cannot run here; the message says why."""


class Quantizer(abc.ABC):
    """A quantization scheme for a ViT vision tower."""

    name: str
    batch_invariant: bool
    devices: tuple[str, ...] = ("cpu", "cuda")
    # A scheme that needs data names the split it calibrates on; the harness then
    # calls calibrate() with up to calibration_images images of it before quantize().
    calibration_split: str | None = None
    calibration_images: int = 256

    def config(self) -> dict[str, Any]:
        """Scheme and parameters, recorded in every result and cache key."""
        return {"name": self.name, "batch_invariant": self.batch_invariant}

    @abc.abstractmethod
    def targets(self, visual: nn.Module) -> list[str]:
        """Qualified names of the Linear layers (or attention modules) this scheme changes."""

    @abc.abstractmethod
    def quantize(self, visual: nn.Module) -> nn.Module:
        """Return a quantized copy of ``visual``; ``visual`` itself is not modified."""

    def calibrate(self, visual: nn.Module, images: torch.Tensor) -> None:
        """Learn from preprocessed ``images`` [B, 3, H, W] of :attr:`calibration_split` run through ``visual``.

        Called once before :meth:`quantize` when :attr:`calibration_split` is set;
        whatever it learns must show in :meth:`config` (the cache key).
        """

    def check_device(self, device: str) -> None:
        """Raise QuantizerUnavailable if this scheme cannot run on ``device``."""
        kind = str(device).split(":")[0]
        if kind not in self.devices:
            raise QuantizerUnavailable(
                f"quantizer {self.name!r} runs on {', '.join(self.devices)}, not {kind}"
            )


QUANTIZERS: Registry[type[Quantizer]] = Registry(
    "quantizer",
    entry_point_group="harness.quantizers",
    builtin_modules=("harness.quantizers._builtin", "harness.quantizers._fake", "harness.quantizers._smooth",
                    "harness.quantizers._damage", "harness.quantizers._pt2e"),
)
register_quantizer = QUANTIZERS.register
register_quantizer_family = QUANTIZERS.register_pattern


def create_quantizer(name: str) -> Quantizer:
    """Instantiate a registered quantizer by name (``fp32``, ``int8-dynamic``, ``fake-w4a8`` ...)."""
    quantizer = QUANTIZERS.get(name)()
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"quantizer plugin {name!r} does not build a harness.quantizers.Quantizer")
    quantizer.name = name
    return quantizer


def list_quantizers() -> list[tuple[str, str]]:
    """(name, one-line description) for every registered quantizer."""
    return QUANTIZERS.describe()


def calibration_record(split: str, images: torch.Tensor) -> dict[str, Any]:
    """What identifies a quantizer's calibration images in its config (the cache key): the split, the count and
    a digest of the pixels (which fix the indices, the dataset content and the preprocessing)."""
    pixels = images.detach().cpu().float().contiguous().numpy().tobytes()
    return {"split": split, "images": len(images), "images_sha256": hashlib.sha256(pixels).hexdigest()}


def block_targets(quantizer: Quantizer, visual: nn.Module) -> list[str]:
    """What ``quantizer`` changes (its targets), named inside a block (``mlp.c_fc``, ``attn.qkv``, ``block
    output`` for a whole block), each name once, in model order: for results, where the same scheme
    converts different layers in different model families."""
    prefix = tower(visual).blocks_name + "."
    names = []
    for name in quantizer.targets(visual):
        inside = name.removeprefix(prefix).partition(".")[2] if name.startswith(prefix) else name
        names.append(inside or "block output")
    return list(dict.fromkeys(names))


def block_linear_names(visual: nn.Module) -> list[str]:
    """Names of the plain ``nn.Linear`` modules inside the blocks: what the int8 quantizers convert.

    In open_clip's ViT blocks these are the MLPs only: attention's
    ``out_proj`` is a ``NonDynamicallyQuantizableLinear`` and its ``in_proj``
    a bare parameter. In timm blocks attention's ``qkv`` and ``proj`` are
    plain Linears too, so attention is quantized as well. The projection or
    classifier after the blocks is never converted.
    """
    return [name for name, mod in block_modules(visual) if type(mod) is nn.Linear]
