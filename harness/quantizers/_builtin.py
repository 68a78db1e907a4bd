"""Built-in quantizers: fp32 (identity), int8-dynamic, int8-torchao."""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

from harness.quantizers import Quantizer, QuantizerUnavailable, block_linear_names, register_quantizer


# The deprecation notices torch prints for torch.ao quantization (kept out of our output).
_DEPRECATION_MESSAGES = (
    r"torch\.ao\.quantization is deprecated",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor",
)


@register_quantizer("fp32")
class FP32(Quantizer):
    """No quantization: the full-precision reference."""

    batch_invariant = True

    def targets(self, visual: nn.Module) -> list[str]:
        return []

    def quantize(self, visual: nn.Module) -> nn.Module:
        return visual


@register_quantizer("int8-dynamic")
class Int8Dynamic(Quantizer):
    """torch.ao quantize_dynamic on the blocks' plain Linears (per-tensor activation scale; the paper's)."""

    batch_invariant = False
    devices = ("cpu",)

    def config(self) -> dict:
        return {**super().config(), "api": "torch.ao.quantization.quantize_dynamic",
                "weights": "int8 per-tensor symmetric",
                "activations": "uint8 per-tensor asymmetric dynamic over the batch, reduce_range=True",
                "engine": torch.backends.quantized.engine}

    def targets(self, visual: nn.Module) -> list[str]:
        return block_linear_names(visual)

    def quantize(self, visual: nn.Module) -> nn.Module:
        # torch.ao.quantization is deprecated in favour of torchao; we keep it
        # because the reference paper uses it, and keep its warnings out of our output.
        with warnings.catch_warnings():
            for message in _DEPRECATION_MESSAGES:
                warnings.filterwarnings("ignore", message=message)
            qconfig = torch.ao.quantization.default_dynamic_qconfig  # what {nn.Linear} with qint8 maps to
            return torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(visual), {name: qconfig for name in self.targets(visual)}, dtype=torch.qint8
            )


@register_quantizer("int8-torchao")
class Int8Torchao(Quantizer):
    """torchao int8 weights + per-token dynamic int8 activations on the blocks' plain Linears."""

    batch_invariant = True

    def config(self) -> dict:
        return {**super().config(), "api": "torchao.quantization.Int8DynamicActivationInt8WeightConfig",
                "weights": "per-channel symmetric int8", "activations": "per-token dynamic int8"}

    def targets(self, visual: nn.Module) -> list[str]:
        return block_linear_names(visual)

    def quantize(self, visual: nn.Module) -> nn.Module:
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        except Exception as exc:  # not installed, or built against another torch
            raise QuantizerUnavailable(f"int8-torchao needs torchao ({type(exc).__name__}: {exc})") from None
        quantized = copy.deepcopy(visual)
        with warnings.catch_warnings():
            for message in _DEPRECATION_MESSAGES:
                warnings.filterwarnings("ignore", message=message)
            targets = set(self.targets(quantized))
            quantize_(quantized, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda _, name: name in targets)
        return quantized
