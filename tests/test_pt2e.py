"""int8-pt2e: what it converts, how close it stays to fp32, and its declared batch invariance."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from harness.backbones import state_dict_sha256
from harness.quantizers import create_quantizer

pytest.importorskip("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")


@pytest.fixture(scope="module")
def two_blocks(embedded_backbone) -> nn.Module:
    """The embedded vision tower cut to its first two blocks (compiling all twelve takes a minute)."""
    visual = copy.deepcopy(embedded_backbone.visual)
    visual.transformer.resblocks = nn.ModuleList(visual.transformer.resblocks[:2])
    return visual


@pytest.fixture(scope="module")
def quantized(two_blocks, images):
    quantizer = create_quantizer("int8-pt2e")
    before = state_dict_sha256(two_blocks)
    quantizer.calibrate(two_blocks, images)
    tower = quantizer.quantize(two_blocks)
    assert state_dict_sha256(two_blocks) == before, "the fp32 tower must not be modified"
    return quantizer, tower


def test_every_linear_of_a_block_is_int8_attention_included(quantized, embedded_backbone, images):
    quantizer, tower = quantized
    assert len(quantizer.targets(embedded_backbone.visual)) == 12 * 4
    for block in tower.transformer.resblocks:
        graph = block.compiled._orig_mod.graph
        linears = [node for node in graph.nodes if node.target == torch.ops.aten.linear.default]
        assert len(linears) == 4  # attention in_proj (q, k, v packed) and out_proj, mlp c_fc and c_proj
        for node in linears:
            activation, weight = node.args[0], node.args[1]
            assert "dequantize_per_tensor" in str(activation.target), node  # int8 activations, static scale
            assert "dequantize_per_channel" in str(weight.target), node  # int8 weights per output channel
    assert block.linears == ["attn", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"]
    assert quantizer.config()["calibration"]["images"] == len(images)  # in the cache key


def test_close_to_fp32_but_quantized(quantized, two_blocks, images):
    _, tower = quantized
    with torch.inference_mode():
        reference, output = two_blocks(images), tower(images)
    cosine = torch.nn.functional.cosine_similarity(output, reference).min().item()
    assert 0.99 < cosine and not torch.equal(output, reference)


def test_batch_invariant_as_declared(quantized, images):
    quantizer, tower = quantized
    assert quantizer.batch_invariant  # static activation scales
    with torch.inference_mode():
        together = tower(images)
        alone = torch.cat([tower(images[i:i + 1]) for i in range(len(images))])
        shuffled = tower(images.flip(0)).flip(0)
    assert (together - alone).abs().max().item() < 1e-4
    assert (together - shuffled).abs().max().item() < 1e-4


def test_linear_attention_equals_multihead_attention(embedded_backbone, images):
    from harness.quantizers._pt2e import LinearAttention

    block = embedded_backbone.visual.transformer.resblocks[3]
    with torch.no_grad():
        x = block.ln_1(embedded_backbone.embed(images))
        expected = block.attn(x, x, x, need_weights=False)[0]
        torch.testing.assert_close(LinearAttention(block.attn)(x)[0], expected, rtol=1e-5, atol=1e-5)
