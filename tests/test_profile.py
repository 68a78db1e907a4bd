from __future__ import annotations

import json

import pytest

from harness.config import HarnessConfig
from harness.session import Session
from harness.profile import noise_profile


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return Session(HarnessConfig(limit=24, batch_size=12, cache_dir=str(cache)), progress=False)


def test_fp32_against_itself_has_no_error(ctx):
    profile = noise_profile(ctx, "fp32")
    assert len(profile.layers) == 12 and profile.samples == 24
    for layer in profile.layers:
        assert layer.quant_error == 0 and layer.ratio == 0 and layer.cls_mse == 0 and layer.relative_error == 0
        assert layer.cls_cosine == pytest.approx(1, abs=1e-6)
        assert layer.nat_update > 0
    assert profile.top1_quant == profile.top1_fp32


def test_first_block_numbers_against_a_direct_computation(ctx):
    import torch

    profile = noise_profile(ctx, "fake-w4a4")
    fp32, (quant, _) = ctx.backbone, ctx.quantized("fake-w4a4")
    split = ctx.splits["heads"]  # the profile's default split
    images = torch.stack([fp32.preprocess(ctx.dataset.read_image(split.part, int(i))) for i in split.indices])
    with torch.no_grad():
        z0 = fp32.embed(images)
        z1, z1q = fp32.blocks[0](z0), quant.blocks[0](quant.embed(images))
    nat = (z1 - z0).flatten(1).norm(dim=1).mean().item()
    err = (z1q - z1).flatten(1).norm(dim=1).mean().item()
    first = profile.layers[0]
    assert first.nat_update == pytest.approx(nat, rel=1e-4)
    assert first.quant_error == pytest.approx(err, rel=1e-3)
    assert first.ratio == pytest.approx(err / nat, rel=1e-3)
    relative = ((z1q - z1).flatten(1).norm(dim=1) / z1.flatten(1).norm(dim=1)).mean().item()
    assert first.relative_error == pytest.approx(relative, rel=1e-3) and 0 < first.relative_error < 1
    cosine = torch.nn.functional.cosine_similarity(z1q.flatten(1), z1.flatten(1), dim=1).mean().item()
    assert first.token_cosine == pytest.approx(cosine, rel=1e-5)


def test_coarser_quantization_drifts_more(ctx):
    mild, harsh = noise_profile(ctx, "fake-w8a8"), noise_profile(ctx, "fake-w4a4")
    for a, b in zip(mild.layers, harsh.layers):
        assert 0 < a.quant_error < b.quant_error
        assert b.inr < a.inr  # more noise, lower information-to-noise ratio
        assert b.patch_mean_cosine < a.patch_mean_cosine <= 1 + 1e-6
    # error accumulates with depth under 4-bit activations
    assert harsh.layers[-1].quant_error > harsh.layers[0].quant_error


def test_existing_results_are_not_overwritten_and_nothing_is_computed(tmp_path, capsys, monkeypatch):
    import harness.session
    from harness.cli import main

    def no_computation(*args, **kwargs):
        raise AssertionError("the output folder is checked before any computation")

    monkeypatch.setattr(harness.session, "Session", no_computation)
    out = tmp_path / "profile"
    out.mkdir()
    (out / "profile.json").write_text("committed")
    assert main(["profile", "--limit", "24", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: {out} holds results already; pass --overwrite to replace them, "
                                       "or another --out\n")
    assert (out / "profile.json").read_text() == "committed"


def test_overwrite_replaces_results_and_profile_json_records_no_machine_paths(tmp_path, capsys):
    from pathlib import Path

    import harness
    from harness.cli import main

    out, cache = tmp_path / "profile", tmp_path / "cache"
    out.mkdir()
    (out / "profile.json").write_text("committed")
    assert main(["profile", "--limit", "24", "--batch-size", "12", "--quant", "fake-w8a8", "--cache-dir", str(cache),
                 "--out", str(out), "--overwrite"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"wrote {out / 'profile.json'}")
    text = (out / "profile.json").read_text()
    saved = json.loads(text)
    assert saved["quant"] == "fake-w8a8" and saved["samples"] == 24
    assert str(cache) not in text and str(Path(harness.__file__).resolve().parent.parent) not in text
    assert "cache_dir" not in saved["config"]["config"]
    assert saved["config"]["backbone"]["pretrained"].endswith("/open_clip_model.safetensors")
