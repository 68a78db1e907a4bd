from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.backbones import state_dict_sha256
from harness.config import HarnessConfig
from harness.session import Session
from harness.errors import ConfigError
from harness.quantizers import QuantizerUnavailable, create_quantizer, list_quantizers
from harness.quantizers._smooth import SmoothQuant, smoothing_factors


@pytest.fixture(scope="module")
def calibration_images(embedded_backbone, embedded_dataset):
    """32 real holdout images (the part the gate split is drawn from), preprocessed."""
    return torch.stack([embedded_backbone.preprocess(embedded_dataset.read_image("holdout", i)) for i in range(32)])


@pytest.fixture(scope="module")
def test_images(embedded_backbone, fmnist_images):
    return torch.stack([embedded_backbone.preprocess(im) for im in fmnist_images[0]])


@pytest.fixture(scope="module")
def smoothed(embedded_backbone, calibration_images):
    """(calibrated smoothquant-fp32 quantizer, the smoothed tower)."""
    quantizer = create_quantizer("smoothquant-fp32")
    quantizer.calibrate(embedded_backbone.visual, calibration_images)
    return quantizer, quantizer.quantize(embedded_backbone.visual)


def _ln_outputs(visual: torch.nn.Module, images: torch.Tensor, norm: str) -> list[torch.Tensor]:
    """The output of LayerNorm ``norm`` (ln_1 or ln_2) of every block, [B, T, D] each."""
    outputs: list[torch.Tensor] = []
    handles = [getattr(block, norm).register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
               for block in visual.transformer.resblocks]
    try:
        with torch.no_grad():
            visual(images)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def test_smoothing_alone_keeps_the_output_but_changes_the_weights(embedded_backbone, smoothed, test_images):
    quantizer, smooth_visual = smoothed
    visual = embedded_backbone.visual
    with torch.no_grad():
        torch.testing.assert_close(smooth_visual(test_images), visual(test_images), atol=1e-4, rtol=1e-4)
    assert len(quantizer.factors) == 2 * len(visual.transformer.resblocks)
    for old, new in zip(visual.transformer.resblocks, smooth_visual.transformer.resblocks):
        for before, after in ((old.ln_1.weight, new.ln_1.weight), (old.ln_1.bias, new.ln_1.bias),
                              (old.ln_2.weight, new.ln_2.weight), (old.attn.in_proj_weight, new.attn.in_proj_weight),
                              (old.mlp.c_fc.weight, new.mlp.c_fc.weight)):
            assert not torch.allclose(before, after, rtol=0.1, atol=0), "a smoothed weight barely changed"
        # layers outside the pairs keep their weights
        assert torch.equal(old.attn.out_proj.weight, new.attn.out_proj.weight)
        assert torch.equal(old.mlp.c_proj.weight, new.mlp.c_proj.weight)


def test_factors_and_folding_match_a_hand_computation(embedded_backbone, smoothed, calibration_images):
    quantizer, smooth_visual = smoothed
    block = 5
    old = embedded_backbone.visual.transformer.resblocks[block]
    new = smooth_visual.transformer.resblocks[block]
    for norm, weight_of in (("ln_2", lambda b: b.mlp.c_fc.weight), ("ln_1", lambda b: b.attn.in_proj_weight)):
        x = _ln_outputs(embedded_backbone.visual, calibration_images, norm)[block]  # [B, T, D]
        act_max = x.abs().amax(dim=(0, 1))
        weight_max = weight_of(old).detach().abs().amax(dim=0)  # over all output rows (q, k and v for ln_1)
        expected = torch.sqrt(act_max) / torch.sqrt(weight_max)  # alpha = 0.5
        torch.testing.assert_close(quantizer.factors[f"transformer.resblocks.{block}.{norm}"], expected)
        ln_old, ln_new = getattr(old, norm), getattr(new, norm)
        torch.testing.assert_close(ln_new.weight, ln_old.weight / expected)
        torch.testing.assert_close(ln_new.bias, ln_old.bias / expected)
        torch.testing.assert_close(weight_of(new), weight_of(old) * expected[None, :])


def test_smoothing_factors_floor_dead_channels():
    s = smoothing_factors(torch.tensor([4.0, 1.0, 0.0, 9.0]), torch.tensor([1.0, 4.0, 2.0, 0.0]), alpha=0.5)
    torch.testing.assert_close(s[:2], torch.tensor([2.0, 0.5]))
    assert torch.isfinite(s).all() and (s > 0).all()
    # alpha = 1 moves the whole activation range into the weights, alpha = 0 none of it
    torch.testing.assert_close(smoothing_factors(torch.tensor([3.0]), torch.tensor([5.0]), alpha=1.0), torch.tensor([3.0]))
    torch.testing.assert_close(smoothing_factors(torch.tensor([3.0]), torch.tensor([5.0]), alpha=0.0), torch.tensor([0.2]))


def test_activations_entering_c_fc_are_flatter(embedded_backbone, smoothed, test_images):
    _, smooth_visual = smoothed

    def peakiness(x: torch.Tensor) -> float:
        channel_max = x.abs().amax(dim=(0, 1))
        return (channel_max.max() / channel_max.median()).item()

    before = [peakiness(x) for x in _ln_outputs(embedded_backbone.visual, test_images, "ln_2")]
    after = [peakiness(x) for x in _ln_outputs(smooth_visual, test_images, "ln_2")]
    assert all(a < b for a, b in zip(after, before)), list(zip(before, after))


def test_through_context_calibrates_on_the_gate_split_and_traces(tmp_path, monkeypatch):
    seen: list[torch.Tensor] = []
    calibrate = SmoothQuant.calibrate
    monkeypatch.setattr(SmoothQuant, "calibrate", lambda self, visual, images: (seen.append(images),
                                                                                calibrate(self, visual, images))[1])
    config = HarnessConfig(limit=64, batch_size=32, quant="smoothquant-fake-w8a3-tensor", cache_dir=str(tmp_path))
    ctx = Session(config, progress=False)
    trace = ctx.trace(None, "test")
    assert len(trace) == 64 and np.isfinite(trace.logits).all()

    gate = ctx.splits["gate"]
    expected = torch.stack([ctx.backbone.preprocess(ctx.dataset.read_image(gate.part, int(i))) for i in gate.indices])
    assert len(seen) == 1 and torch.equal(seen[0], expected)

    _, quantizer = ctx.quantized()
    recorded = trace.meta["key"]["quantizer"]
    assert recorded == quantizer.config()
    assert recorded["smoothing alpha"] == 0.5
    assert recorded["base"]["name"] == "fake-w8a3-tensor"
    assert recorded["calibration"]["split"] == "gate" and recorded["calibration"]["images"] == 64
    assert recorded["batch_invariant"] is False

    # the same config finds the same cache entry; another seed's gate split gives another key
    assert Session(config, progress=False).trace(None, "test").path == trace.path
    other_seed = Session(HarnessConfig(**{**vars(config), "seed": 1}), progress=False)
    assert other_seed.quantized()[1].config()["calibration"]["images_sha256"] != recorded["calibration"]["images_sha256"]
    assert other_seed.trace(None, "test").path != trace.path


def test_calibration_images_are_capped_and_spread_over_the_split(tmp_path, monkeypatch):
    monkeypatch.setattr(SmoothQuant, "calibration_images", 8)
    ctx = Session(HarnessConfig(limit=64, batch_size=32, quant="smoothquant-fp32", cache_dir=str(tmp_path)),
                  progress=False)
    _, quantizer = ctx.quantized()
    assert quantizer.config()["calibration"]["images"] == 8
    gate = ctx.splits["gate"]
    images = ctx._calibration_images(quantizer)
    assert torch.equal(images[0], ctx.backbone.preprocess(ctx.dataset.read_image(gate.part, int(gate.indices[0]))))
    assert torch.equal(images[-1], ctx.backbone.preprocess(ctx.dataset.read_image(gate.part, int(gate.indices[-1]))))


def test_smoothquant_fp32_traces_equal_fp32_traces(tmp_path):
    ctx = Session(HarnessConfig(limit=32, batch_size=32, quant="fp32", cache_dir=str(tmp_path)), progress=False)
    fp32, smooth = ctx.trace("fp32", "test"), ctx.trace("smoothquant-fp32", "test")
    assert smooth.path != fp32.path
    np.testing.assert_allclose(smooth.logits, fp32.logits, atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(smooth.cls.astype(np.float32), fp32.cls.astype(np.float32), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("name", ["smoothquant-fp32", "smoothquant-fake-w8a3-tensor", "smoothquant"])
def test_the_input_tower_is_not_modified(name, embedded_backbone, calibration_images):
    visual = embedded_backbone.visual
    before = state_dict_sha256(visual)
    quantizer = create_quantizer(name)
    quantizer.calibrate(visual, calibration_images[:8])
    quantized = quantizer.quantize(visual)
    assert quantized is not visual
    assert state_dict_sha256(visual) == before


def test_quantize_before_calibrate_is_a_clear_error(embedded_backbone):
    with pytest.raises(RuntimeError, match="calibrate.*before quantize"):
        create_quantizer("smoothquant-fp32").quantize(embedded_backbone.visual)


def test_names_bases_and_what_they_inherit(embedded_backbone):
    assert "smoothquant[-BASE]" in {name for name, _ in list_quantizers()}
    default = create_quantizer("smoothquant")
    assert default.config()["base"]["name"] == "int8-dynamic" and default.batch_invariant is False
    with pytest.raises(QuantizerUnavailable, match="runs on cpu"):
        default.check_device("cuda")
    per_token = create_quantizer("smoothquant-fake-w8a8")
    assert per_token.batch_invariant is True and per_token.config()["calibration"] is None
    # the base's targets plus every smoothed attention and c_fc (fake-w8a8 already has them all)
    assert per_token.targets(embedded_backbone.visual) == create_quantizer("fake-w8a8").targets(embedded_backbone.visual)
    assert len(create_quantizer("smoothquant-fp32").targets(embedded_backbone.visual)) == 24
    with pytest.raises(KeyError, match="Did you mean 'int8-dynamic'"):
        create_quantizer("smoothquant-int8-dynamc")
    with pytest.raises(ConfigError, match="needs its own calibration"):
        create_quantizer("smoothquant-smoothquant-fp32")
