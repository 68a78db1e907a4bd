from __future__ import annotations

import pytest

from harness.context import Context, HarnessConfig
from harness.profile import noise_profile


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return Context(HarnessConfig(limit=24, batch_size=12, cache_dir=str(cache)), progress=False)


def test_fp32_against_itself_has_no_error(ctx):
    profile = noise_profile(ctx, "fp32")
    assert len(profile.layers) == 12 and profile.samples == 24
    for layer in profile.layers:
        assert layer.quant_error == 0 and layer.ratio == 0 and layer.cls_mse == 0
        assert layer.cls_cosine == pytest.approx(1, abs=1e-6)
        assert layer.nat_update > 0
    assert profile.top1_quant == profile.top1_fp32


def test_coarser_quantization_drifts_more(ctx):
    mild, harsh = noise_profile(ctx, "fake-w8a8"), noise_profile(ctx, "fake-w4a4")
    for a, b in zip(mild.layers, harsh.layers):
        assert 0 < a.quant_error < b.quant_error
        assert a.ratio == pytest.approx(a.quant_error / a.nat_update)
        assert b.patch_mean_cosine < a.patch_mean_cosine <= 1 + 1e-6
    # error accumulates with depth under 4-bit activations
    assert harsh.layers[-1].quant_error > harsh.layers[0].quant_error
