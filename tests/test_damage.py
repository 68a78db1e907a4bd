"""Damage scenarios (synthetic): function-preserving outliers, and residual-stream noise."""

from __future__ import annotations

import pytest
import torch

from harness.backbones import state_dict_sha256
from harness.errors import ConfigError
from harness.quantizers import create_quantizer


def _block_outputs(visual: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream after every block (hooks included), [B, T, D] each."""
    x = visual._embeds(images)
    outputs = []
    with torch.no_grad():
        for block in visual.transformer.resblocks:
            x = block(x)
            outputs.append(x)
    return outputs


def test_outliers_alone_keep_the_function_and_move_the_range_into_chosen_channels(embedded_backbone, images):
    quantizer = create_quantizer("outliers-b7-c4-x300-fp32")
    visual = embedded_backbone.visual
    before = state_dict_sha256(visual)
    damaged = quantizer.quantize(visual)
    assert state_dict_sha256(visual) == before, "the input tower must not be modified"
    with torch.no_grad():
        torch.testing.assert_close(damaged(images), visual(images), atol=1e-4, rtol=1e-4)
    channels = quantizer.config()["outliers"]["channel_indices"]
    assert len(channels) == 4 and quantizer.config()["outliers"]["blocks"] == list(range(7, 13))
    for i, (old, new) in enumerate(zip(visual.transformer.resblocks, damaged.transformer.resblocks)):
        scale = 300.0 if i >= 6 else 1.0
        others = [c for c in range(128) if c not in channels]
        for ln in ("ln_1", "ln_2"):
            torch.testing.assert_close(getattr(new, ln).weight[channels], getattr(old, ln).weight[channels] * scale)
            assert torch.equal(getattr(new, ln).weight[others], getattr(old, ln).weight[others])
        torch.testing.assert_close(new.mlp.c_fc.weight[:, channels], old.mlp.c_fc.weight[:, channels] / scale)
        torch.testing.assert_close(new.attn.in_proj_weight[:, channels], old.attn.in_proj_weight[:, channels] / scale)
        assert torch.equal(new.mlp.c_proj.weight, old.mlp.c_proj.weight)
    assert set(quantizer.targets(visual)) == {f"transformer.resblocks.{i}.{layer}"
                                              for i in range(6, 12) for layer in ("attn", "mlp.c_fc")}


def test_outliers_hurt_a_per_token_quantizer_only_from_their_onset(embedded_backbone, images):
    visual = embedded_backbone.visual
    plain = _block_outputs(create_quantizer("fake-w8a8").quantize(visual), images)
    damaged = _block_outputs(create_quantizer("outliers-b7-c4-x300-fake-w8a8").quantize(visual), images)
    reference = _block_outputs(visual, images)
    for i in range(6):
        torch.testing.assert_close(damaged[i], plain[i], atol=1e-5, rtol=1e-5)
    error = [(out[-1] - reference[-1]).norm() / reference[-1].norm() for out in (plain, damaged)]
    assert error[1] > 5 * error[0], f"outliers barely changed the quantization error: {error}"


def test_noise_leaves_the_blocks_before_its_onset_alone_and_is_deterministic(embedded_backbone, images):
    visual = embedded_backbone.visual
    quantizer = create_quantizer("noise-b10-s1")
    damaged = quantizer.quantize(visual)
    reference, noisy = _block_outputs(visual, images), _block_outputs(damaged, images)
    for i in range(9):
        assert torch.equal(noisy[i], reference[i])
    # block 10 adds noise of the size asked: RMS of the difference = 1 x the token's RMS, within sampling
    clean_block_10 = visual.transformer.resblocks[9](noisy[8])
    ratio = (noisy[9] - clean_block_10).pow(2).mean(-1).sqrt() / clean_block_10.pow(2).mean(-1).sqrt()
    assert 0.8 < ratio.mean().item() < 1.2 and ratio.std().item() < 0.2
    again = _block_outputs(create_quantizer("noise-b10-s1").quantize(visual), images)
    assert torch.equal(again[-1], noisy[-1])
    assert quantizer.targets(visual) == [f"transformer.resblocks.{i}" for i in (9, 10, 11)]
    assert quantizer.batch_invariant and quantizer.config()["synthetic"] is True


def test_noise_is_uncorrelated_with_the_token(embedded_backbone, images):
    """Pseudo-random: the added vector's channels are not a scaled copy of the token's."""
    visual = embedded_backbone.visual
    damaged = create_quantizer("noise-b10-s1").quantize(visual)
    x = _block_outputs(visual, images)[8]
    clean = visual.transformer.resblocks[9](x)
    added = damaged.transformer.resblocks[9](x) - clean
    cosine = torch.nn.functional.cosine_similarity(added.flatten(0, 1), clean.flatten(0, 1), dim=-1)
    assert cosine.abs().mean().item() < 0.15


def test_damage_names_and_errors(embedded_backbone):
    with pytest.raises(ConfigError, match="outside this tower's blocks 1..12"):
        create_quantizer("noise-b13-s1").quantize(embedded_backbone.visual)
    with pytest.raises(ConfigError, match="cannot wrap 'smoothquant'"):
        create_quantizer("outliers-b7-c4-x300-smoothquant")
    with pytest.raises(KeyError):
        create_quantizer("outliers-b7-fake-w8a8")
    assert create_quantizer("noise-b3-s2").config()["base"]["name"] == "fp32"
