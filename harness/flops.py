"""FLOPs of the vision tower's pieces, counted with ``torch.utils.flop_counter``.

Two switches make the counter see every matmul: the MultiheadAttention
fast path is turned off (its fused kernel is invisible to the counter), and
scaled-dot-product attention runs on the math backend (the CPU flash kernel
hides the score and value matmuls). With both, one block counts exactly
24 n d^2 + 4 n^2 d for n tokens of width d (tested against that formula).
FLOPs are counted on the fp32 modules: a quantized matmul does the same
number of operations, and the counter cannot see quantized kernels.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from harness.backbones import Backbone


@contextmanager
def _countable() -> Iterator[None]:
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matmuls and convolutions, multiply-add = 2)."""
    with _countable(), torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def block_flops(backbone: Backbone, tokens: int, block: int = 0) -> int:
    """FLOPs of one sample through ``block`` with ``tokens`` tokens (class and register tokens included)."""
    x = torch.zeros(1, tokens, backbone.width, device=backbone.device)
    return count_flops(lambda: backbone.blocks[block](x))


def tower_flops(backbone: Backbone) -> dict[str, object]:
    """Per-sample FLOPs of the full-depth vision tower: embed, every block, head, total."""
    images = torch.zeros(1, 3, *backbone.tower.image_size, device=backbone.device)
    tokens = backbone.embed(images)
    embed = count_flops(lambda: backbone.embed(images))
    blocks = [block_flops(backbone, tokens.shape[1], i) for i in range(backbone.num_blocks)]
    head = count_flops(lambda: backbone.head(tokens))
    return {"embed": embed, "blocks": blocks, "head": head, "total": embed + sum(blocks) + head}
