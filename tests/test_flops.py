from __future__ import annotations

import pytest

from harness.flops import block_flops, tower_flops


@pytest.mark.parametrize("tokens", [50, 20, 2])
def test_block_flops_match_the_hand_formula(embedded_backbone, tokens):
    d = embedded_backbone.width
    # qkv + out projections 8nd^2, MLP 16nd^2, scores and weighted values 4n^2 d
    assert block_flops(embedded_backbone, tokens) == 24 * tokens * d * d + 4 * tokens * tokens * d


def test_vit_b32_tower_flops(vit_b32_backbone):
    flops = tower_flops(vit_b32_backbone)
    n, d = 50, 768
    assert flops["blocks"] == [24 * n * d * d + 4 * n * n * d] * 12
    assert flops["embed"] == 2 * 49 * (3 * 32 * 32) * d  # the patchifying convolution
    assert flops["head"] == 2 * d * 512  # the projection of the pooled CLS token
    assert 8.7e9 < flops["total"] < 8.9e9
