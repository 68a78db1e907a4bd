"""Fake quantization ``fake-wNaM``: simulated N-bit weights and M-bit activations.

Every Linear of the vision tower is replaced, attention projections
included: ``nn.MultiheadAttention`` keeps its input projection as a bare
parameter and calls a fused kernel, so it is swapped for
:class:`FakeQuantAttention`, which computes the same attention with two
fake-quantized projections. Weights are rounded once (per output channel,
symmetric); activations are rounded on the fly with a symmetric dynamic
scale per token (batch-invariant) or, with the ``-tensor`` suffix, one scale
for the whole input tensor (batch-dependent, like ``quantize_dynamic``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from harness.quantizers import Quantizer, register_quantizer_family
from harness.towers import block_modules


def fake_quantize(x: torch.Tensor, bits: int | None, dim: int | None) -> torch.Tensor:
    """Symmetric round-to-nearest fake quantization.

    Args:
        bits: N, giving integer levels in [-(2^(N-1) - 1), 2^(N-1) - 1];
            ``None`` returns ``x`` unchanged (the full-precision reference).
        dim: reduce the max over this dim (one scale per slice along the
            other dims); ``None`` for a single scale over the whole tensor.
    """
    if bits is None:
        return x
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = amax.clamp(min=1e-8) / qmax
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


@functools.cache
def _fused() -> Callable[[torch.Tensor, int | None, int | None], torch.Tensor]:
    return torch.compile(fake_quantize, dynamic=True)


def fused_fake_quantize(x: torch.Tensor, bits: int | None, dim: int | None) -> torch.Tensor:
    """:func:`fake_quantize` as one fused kernel (``torch.compile``): the same numbers, bit for bit.

    The max is exact in any reduction order, and the division, rounding,
    clamp and product are the same correctly rounded operations on the same
    values; eager mode runs them as six passes over memory. The first call per
    input rank and scale kind compiles (seconds). Where the compiler cannot
    run (no C++ compiler for Inductor on CPU, say), it warns once and falls
    back to eager mode, which gives the same numbers.
    """
    global _COMPILE_FAILED
    if bits is None:
        return x
    if fusion_active():
        try:
            return _fused()(x, bits, dim)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            _COMPILE_FAILED = True
            cause = exc.inner_exception
            warnings.warn(f"fake quantization runs unfused (slower, same numbers): torch.compile failed: "
                          f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}", stacklevel=2)
    return fake_quantize(x, bits, dim)


_COMPILE_FAILED = False
_EAGER = False  # set inside eager_fake_quantization()


def fusion_active() -> bool:
    """Whether :func:`fused_fake_quantize` runs its compiled kernel (False once compiling has failed)."""
    return not _COMPILE_FAILED and not _EAGER


@contextlib.contextmanager
def eager_fake_quantization() -> Iterator[None]:
    """Inside the block, :func:`fused_fake_quantize` runs unfused (the same numbers, slower), so that ``bench``
    can time what the fusion gains."""
    global _EAGER
    previous, _EAGER = _EAGER, True
    try:
        yield
    finally:
        _EAGER = previous


class FakeQuantLinear(nn.Module):
    """A Linear with pre-rounded weights and dynamically rounded inputs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, w_bits: int | None, a_bits: int | None, per_token: bool):
        super().__init__()
        self.weight = nn.Parameter(fake_quantize(weight.detach().clone(), w_bits, dim=1), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.a_bits = a_bits
        self.per_token = per_token

    @classmethod
    def from_linear(cls, linear: nn.Linear, w_bits: int | None, a_bits: int | None, per_token: bool) -> "FakeQuantLinear":
        return cls(linear.weight, linear.bias, w_bits, a_bits, per_token)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fused_fake_quantize(x, self.a_bits, dim=-1 if self.per_token else None)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"out={self.weight.shape[0]}, in={self.weight.shape[1]}, a_bits={self.a_bits}, per_token={self.per_token}"


class FakeQuantAttention(nn.Module):
    """Drop-in for open_clip's batch-first self-attention ``nn.MultiheadAttention``."""

    def __init__(self, mha: nn.MultiheadAttention, w_bits: int | None, a_bits: int | None, per_token: bool):
        super().__init__()
        if not mha.batch_first or not mha._qkv_same_embed_dim:
            raise ValueError("FakeQuantAttention supports batch-first self-attention only")
        self.num_heads = mha.num_heads
        self.in_proj = FakeQuantLinear(mha.in_proj_weight, mha.in_proj_bias, w_bits, a_bits, per_token)
        self.out_proj = FakeQuantLinear.from_linear(mha.out_proj, w_bits, a_bits, per_token)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if key is not None and key is not query:
            raise ValueError("FakeQuantAttention supports self-attention only")
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            # nn.MultiheadAttention's True means "blocked", SDPA's means "attend"
            raise ValueError("FakeQuantAttention takes additive float masks only")
        b, n, d = query.shape
        q, k, v = self.in_proj(query).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), None


@register_quantizer_family("fake-wNaM[-tensor]", r"fake-w(?P<w_bits>[2-8])a(?P<a_bits>[2-8])(?P<tensor>-tensor)?")
class FakeQuant(Quantizer):
    """Fake-quantized N-bit weights (per channel) and M-bit activations (per token, or -tensor), all Linears."""

    def __init__(self, w_bits: str, a_bits: str, tensor: str | None = None):
        self.w_bits, self.a_bits = int(w_bits), int(a_bits)
        self.per_token = tensor is None
        self.batch_invariant = self.per_token

    def config(self) -> dict:
        return {**super().config(), "weights": f"{self.w_bits}-bit per-channel symmetric",
                "activations": f"{self.a_bits}-bit {'per-token' if self.per_token else 'per-tensor'} dynamic symmetric",
                "layers": "every Linear, attention in/out projections included"}

    def targets(self, visual: nn.Module) -> list[str]:
        return [name for name, mod in block_modules(visual) if isinstance(mod, (nn.Linear, nn.MultiheadAttention))
                and not name.endswith(".out_proj")]  # an attention out_proj: inside FakeQuantAttention

    def quantize(self, visual: nn.Module) -> nn.Module:
        quantized = copy.deepcopy(visual)
        for name in self.targets(quantized):
            parent_name, _, child = name.rpartition(".")
            parent = quantized.get_submodule(parent_name)
            module = getattr(parent, child)
            args = (self.w_bits, self.a_bits, self.per_token)
            if isinstance(module, nn.MultiheadAttention):
                setattr(parent, child, FakeQuantAttention(module, *args))
            else:
                setattr(parent, child, FakeQuantLinear.from_linear(module, *args))
        return quantized
