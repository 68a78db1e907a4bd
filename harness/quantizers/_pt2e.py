"""``int8-pt2e``: int8 inference on x86 CPUs through PyTorch 2 export quantization, attention included.

PyTorch's documented route to fast int8 on x86 is PT2E: export the model,
annotate it with torchao's ``X86InductorQuantizer``, calibrate, convert,
and let ``torch.compile`` (inductor, with weight freezing) lower the
quantize/dequantize patterns to oneDNN int8 kernels. Unlike
``quantize_dynamic`` and torchao's int8 config, which convert the MLP
Linears only, the export sees every Linear of a block as an ``aten.linear``:
attention's packed q/k/v input projection and its output projection are
quantized too.

The harness needs the tower block by block (the drivers run blocks one at
a time and drop exited samples), so each block is exported and quantized
on its own, with the batch and token counts dynamic in the export. Each
block is compiled on first use for that shape (a full batch gets
static-shape kernels) and once more, with dynamic shapes, when a batch of
another shape comes (a smaller last batch, or the samples left after an
exit); compiling takes seconds per block, once per process. Activations get
static per-tensor scales observed on the ``gate`` split (histogram
observer), which makes the scheme batch-invariant: a sample's output does
not depend on the rest of its batch (tested). Weights are int8 per output
channel. CPU only.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch
from torch import nn

from harness.errors import ConfigError
from harness.quantizers import Quantizer, QuantizerUnavailable, calibration_record, register_quantizer
from harness.towers import tower

_CALIBRATION_BATCH = 32


def _block_inputs(visual: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The fp32 input of every block of ``visual`` for ``images`` (what the observers see)."""
    inputs: list[list[torch.Tensor]] = [[] for _ in visual.transformer.resblocks]
    with torch.no_grad():
        for start in range(0, len(images), _CALIBRATION_BATCH):
            x = visual._embeds(images[start:start + _CALIBRATION_BATCH])
            for i, block in enumerate(visual.transformer.resblocks):
                inputs[i].append(x)
                x = block(x)
    return [torch.cat(parts) for parts in inputs]


class LinearAttention(nn.Module):
    """open_clip's batch-first self-attention with its projections as ``nn.Linear`` modules.

    ``nn.MultiheadAttention`` keeps the q/k/v projection as a bare parameter
    and the output one as a ``Linear`` subclass, and the PT2E quantizer
    annotates neither; with plain Linears it quantizes both. Same function
    (tested against ``nn.MultiheadAttention``).
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha.batch_first or not mha._qkv_same_embed_dim:
            raise ValueError("LinearAttention supports batch-first self-attention only")
        width = mha.embed_dim
        self.num_heads = mha.num_heads
        self.in_proj = nn.Linear(width, 3 * width, bias=mha.in_proj_bias is not None)
        self.out_proj = nn.Linear(width, width, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if attn_mask is not None:
            raise ValueError("LinearAttention takes no attention mask")
        b, n, d = query.shape
        q, k, v = self.in_proj(query).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), None


class CompiledBlock(nn.Module):
    """A block quantized by PT2E and compiled by inductor; called like the block it replaces."""

    def __init__(self, compiled: Any, linears: list[str]):
        super().__init__()
        self.compiled = compiled
        self.linears = linears  # what was converted, for targets() and the config

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None:  # open_clip's vision tower passes None
            raise ValueError("int8-pt2e blocks take no attention mask")
        with torch.no_grad():
            return self.compiled(x)


@register_quantizer("int8-pt2e")
class Int8PT2E(Quantizer):
    """PT2E int8 (X86InductorQuantizer, torch.compile): every Linear incl. attention, static activation scales."""

    batch_invariant = True
    devices = ("cpu",)
    calibration_split = "gate"
    calibration_images = 256

    def __init__(self) -> None:
        self._inputs: list[torch.Tensor] | None = None
        self._calibration: dict[str, Any] | None = None

    def config(self) -> dict[str, Any]:
        return {**super().config(),
                "api": "torch.export + torchao.quantization.pt2e X86InductorQuantizer + torch.compile (inductor)",
                "weights": "int8 per-channel symmetric",
                "activations": "uint8 per-tensor affine, static (histogram observer on the calibration images)",
                "layers": "every Linear of every block: attention in_proj (q, k, v) and out_proj, mlp c_fc and c_proj",
                "calibration": self._calibration}

    def targets(self, visual: nn.Module) -> list[str]:
        return [name for name, module in visual.named_modules()
                if name.startswith("transformer.resblocks.")
                and (type(module) is nn.Linear or isinstance(module, nn.MultiheadAttention)
                     or name.endswith(".attn.out_proj"))]

    def calibrate(self, visual: nn.Module, images: torch.Tensor) -> None:
        if tower(visual).family != "open_clip":
            raise QuantizerUnavailable(f"int8-pt2e rewrites open_clip's nn.MultiheadAttention blocks only; this is a "
                                       f"{tower(visual).family} tower (use int8-dynamic or fake-wNaM)")
        if len(images) == 0:
            raise ConfigError(f"int8-pt2e needs calibration images; the {self.calibration_split!r} split gave none")
        self._inputs = _block_inputs(visual, images)
        self._calibration = calibration_record(self.calibration_split, images)

    def quantize(self, visual: nn.Module) -> nn.Module:
        if self._inputs is None:
            raise RuntimeError("int8-pt2e: call calibrate(visual, images) before quantize() "
                               f"(harness.session.Session does, on the {self.calibration_split!r} split)")
        try:
            import torch._inductor.config as inductor_config
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
                X86InductorQuantizer, get_default_x86_inductor_quantization_config)
        except Exception as exc:  # not installed, or built against another torch
            raise QuantizerUnavailable(f"int8-pt2e needs torchao's PT2E quantizer ({type(exc).__name__}: {exc})") \
                from None
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
        # inductor's oneDNN lowering warns about its own torch.tensor(tensor) call when it compiles each block
        warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning,
                                module="torch._inductor.mkldnn_lowerings")
        inductor_config.freezing = True  # lets inductor pack the int8 weights for oneDNN
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        quantized = copy.deepcopy(visual)
        blocks = quantized.transformer.resblocks
        linears = [name.removeprefix("transformer.resblocks.0.") for name in self.targets(visual)
                   if name.startswith("transformer.resblocks.0.")]
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        tokens = torch.export.Dim("tokens", min=2, max=1 << 16)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # export the plain linear/attention ops, not the fused kernel
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for i, block in enumerate(blocks):
                    block.attn = LinearAttention(block.attn)
                    inputs = self._inputs[i]
                    exported = torch.export.export(block.eval(), (inputs[:2],),
                                                   dynamic_shapes=({0: batch, 1: tokens},)).module()
                    prepared = prepare_pt2e(exported, quantizer)
                    with torch.no_grad():
                        for chunk in inputs.split(_CALIBRATION_BATCH):
                            prepared(chunk)
                    # dynamic=None: compiled for the first shape it runs (a full batch: the fastest kernels),
                    # then once more with dynamic batch and token counts when another shape comes
                    blocks[i] = CompiledBlock(torch.compile(convert_pt2e(prepared), dynamic=None), linears)
        finally:
            self._inputs = None  # up to hundreds of MB for a large tower
            torch.backends.mha.set_fastpath_enabled(fastpath)
        return quantized
