from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness.backbones import Backbone
from harness.cache import DamagedEntry, read_entry
from harness.heads import Classifier
from harness.config import HarnessConfig
from harness.session import Session
from harness.datasets import ImageBatches, Split, create_dataset
from harness.quantizers import create_quantizer
from harness.trace import layer_features, trace_split


@pytest.fixture
def ctx(cache_dir):
    return Session(HarnessConfig(limit=40, batch_size=16, cache_dir=str(cache_dir), quant="fp32"), progress=False)


def test_trace_matches_a_direct_forward(ctx, embedded_dataset):
    trace = ctx.trace("fp32", "gate")
    split = ctx.splits["gate"]
    assert len(trace) == 40 and np.array_equal(trace.indices, split.indices)
    assert trace.cls.shape == (40, 13, 128) and trace.sav.shape == (40, 13) and trace.logits.shape == (40, 10)
    assert np.array_equal(trace.labels, embedded_dataset.labels("holdout")[split.indices])

    backbone = ctx.backbone
    images = torch.stack([backbone.preprocess(embedded_dataset.read_image("holdout", int(i))) for i in split.indices[:5]])
    with torch.no_grad():
        tokens = backbone.embed(images)
        for _ in range(6):
            tokens = backbone.blocks[_](tokens)
        cls, mean, sav = layer_features(tokens)
        embedding = backbone.encode_image(images)
    np.testing.assert_allclose(trace.cls[:5, 6], cls.numpy(), rtol=2e-3, atol=2e-3)  # stored in fp16
    np.testing.assert_allclose(trace.patch_mean[:5, 6], mean.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(trace.sav[:5, 6], sav.numpy(), rtol=1e-5)
    np.testing.assert_allclose(trace.embedding[:5], embedding.numpy(), rtol=1e-4, atol=1e-5)
    logits = backbone.logit_scale * torch.nn.functional.normalize(embedding, dim=-1) @ ctx.classifier.weight.T
    np.testing.assert_allclose(trace.logits[:5], logits.numpy(), rtol=1e-4, atol=1e-4)


def test_layer_features_against_numpy():
    tokens = torch.randn(3, 50, 8, dtype=torch.float64)
    cls, mean, sav = layer_features(tokens)
    t = tokens.numpy()
    patches = t[:, 1:]
    expected_sav = np.mean(np.sum((patches - patches.mean(axis=1, keepdims=True)) ** 2, axis=-1), axis=1)
    np.testing.assert_allclose(cls.numpy(), t[:, 0])
    np.testing.assert_allclose(mean.numpy(), patches.mean(axis=1))
    np.testing.assert_allclose(sav.numpy(), expected_sav)


def _forbid_forward(monkeypatch):
    def fail(self, images):
        raise AssertionError("backbone forward ran although the trace is cached")

    monkeypatch.setattr(Backbone, "embed", fail)


def test_second_run_hits_the_cache(ctx, cache_dir, monkeypatch):
    first = ctx.trace("fp32", "test")
    again = Session(ctx.config, progress=False)
    _forbid_forward(monkeypatch)
    second = again.trace("fp32", "test")
    assert second.path == first.path
    for name in ("cls", "patch_mean", "sav", "embedding", "logits", "labels", "indices"):
        assert np.array_equal(getattr(first, name), getattr(second, name))


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_damaged_entry_is_detected_and_rebuilt(ctx, damage, capsys):
    trace = ctx.trace("fp32", "test")
    path, original = trace.path, np.array(trace.patch_mean)
    victim = path / "patch_mean.npy"
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        victim.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        (path / "meta.json").write_text("{")
    with pytest.raises(DamagedEntry):
        read_entry(path)
    capsys.readouterr()
    rebuilt = Session(ctx.config, progress=False).trace("fp32", "test")
    assert f"note: cache entry {path} is corrupt" in capsys.readouterr().err
    read_entry(path)
    assert np.array_equal(np.array(rebuilt.patch_mean), original)


def test_cache_key_separates_quantizers_and_batch_size_only_when_it_matters(ctx, cache_dir):
    fp32 = ctx.trace("fp32", "test")
    dyn = ctx.trace("int8-dynamic", "test")
    assert fp32.path != dyn.path
    bigger = Session(HarnessConfig(**{**ctx.config.__dict__, "batch_size": 32}), progress=False)
    assert bigger.trace("fp32", "test").path == fp32.path  # batch-invariant: same entry
    assert bigger.trace("int8-dynamic", "test").path != dyn.path  # batch-dependent: its own entry


def test_bad_images_are_skipped_and_reported(tmp_path, embedded_backbone, cache_dir):
    root = tmp_path / "folder"
    for cls in ("shoe", "bag"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(root / cls / f"{i}.png")
    (root / "bag" / "broken.png").write_bytes(b"")
    dataset = create_dataset("imagefolder", str(root))
    # trace every sample so the broken file is certainly included
    everything = Split("all", np.arange(dataset.parts()["all"]))
    quantizer = create_quantizer("fp32")
    weights = embedded_backbone.zero_shot_classifier(dataset.classnames, dataset.templates)
    classifier = Classifier(weights, embedded_backbone.logit_scale)
    batches = ImageBatches(dataset, everything, embedded_backbone.preprocess, batch_size=4)
    trace = trace_split(embedded_backbone, quantizer, batches, classifier, cache_dir=cache_dir, progress=False)
    assert len(trace) == 6 and len(trace.bad_images) == 1
    assert trace.bad_images[0]["sample"].endswith("broken.png")
    assert trace.bad_images[0]["index"] not in set(trace.indices.tolist())


def test_key_follows_what_changes_the_numbers(ctx):
    base = ctx.config.__dict__
    gate, test = ctx.trace("fp32", "gate").path, ctx.trace("fp32", "test").path
    other_seed = Session(HarnessConfig(**{**base, "seed": 1}), progress=False)
    assert other_seed.trace("fp32", "test").path == test  # the test split does not depend on the seed
    assert other_seed.trace("fp32", "gate").path != gate
    fewer = Session(HarnessConfig(**{**base, "limit": 20}), progress=False)
    assert fewer.trace("fp32", "test").path != test
    fp16_text = Session(HarnessConfig(**{**base, "text_precision": "fp16"}), progress=False)
    assert fp16_text.trace("fp32", "test").path != test
    random_init = Session(HarnessConfig(**{**base, "pretrained": "none"}), progress=False)
    assert random_init.trace("fp32", "test").path != test


def test_a_failed_pass_leaves_no_entry(ctx, cache_dir, monkeypatch):
    import harness.trace as trace_module

    calls = {"n": 0}
    real = trace_module.trace_batch

    def fail_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(trace_module, "trace_batch", fail_on_second_batch)
    with pytest.raises(RuntimeError, match="power cut"):
        ctx.trace("fp32", "heads")
    assert list((cache_dir / "traces").iterdir()) == []  # neither an entry nor a temporary folder


def test_select_picks_rows_by_dataset_index_into_a_memory_mapped_entry(ctx, cache_dir):
    trace = ctx.trace("fp32", "gate")
    wanted = np.array([trace.indices[5], trace.indices[1], 10**9, trace.indices[30]])  # 10**9: not traced
    sub = trace.select(wanted, cache_dir)
    assert sub.indices.tolist() == [trace.indices[5], trace.indices[1], trace.indices[30]]
    for name in ("cls", "patch_mean", "sav", "embedding", "logits", "labels"):
        np.testing.assert_array_equal(getattr(sub, name), np.asarray(getattr(trace, name))[[5, 1, 30]])
        assert isinstance(getattr(sub, name), np.memmap)  # on disk, not copied into memory
    assert sub.path.parent == cache_dir / "trace-rows"
    again = trace.select(wanted, cache_dir)
    assert again.path == sub.path and len(list((cache_dir / "trace-rows").iterdir())) == 1  # written once
    assert trace.select(wanted[::-1], cache_dir).indices.tolist() == sub.indices.tolist()[::-1]
    assert trace.select(trace.indices, cache_dir) is trace


def _count_passes(monkeypatch) -> list[list[str]]:
    """The quantizers of every backbone pass from here on (one list per pass over the images)."""
    import harness.trace as trace_module

    passes, real = [], trace_module._run_backbones

    def counted(backbones, *args):
        passes.append([backbone.quantizer for backbone in backbones])
        return real(backbones, *args)

    monkeypatch.setattr(trace_module, "_run_backbones", counted)
    return passes


def test_quantizers_traced_together_decode_once_and_match_traces_made_alone(ctx, tmp_path, monkeypatch):
    config = HarnessConfig(**{**ctx.config.__dict__, "quant": "fake-w8a8", "cache_dir": str(tmp_path / "together")})
    together = Session(config, progress=False)
    passes = _count_passes(monkeypatch)
    together.prepare_traces([(None, "test"), ("fp32", "test"), (None, "gate")])
    assert passes == [["fake-w8a8", "fp32"], ["fake-w8a8"]]  # the test images decoded once for both
    alone = Session(HarnessConfig(**{**config.__dict__, "cache_dir": str(tmp_path / "alone")}), progress=False)
    for quant in ("fake-w8a8", "fp32"):
        joint, single = together.trace(quant, "test"), alone.trace(quant, "test")
        assert joint.path.name == single.path.name  # the same cache key
        for name in ("cls", "patch_mean", "sav", "embedding", "logits", "labels", "indices"):
            assert np.array_equal(getattr(joint, name), getattr(single, name)), (quant, name)
    assert passes[2:] == [["fake-w8a8"], ["fp32"]]
    assert not np.array_equal(together.trace("fp32", "test").logits, together.trace(None, "test").logits)


def test_only_the_missing_traces_of_a_pass_are_traced(ctx, monkeypatch):
    ctx.trace("fp32", "test")
    again = Session(HarnessConfig(**{**ctx.config.__dict__, "quant": "fake-w8a8"}), progress=False)
    passes = _count_passes(monkeypatch)
    again.prepare_traces([("fp32", "test"), (None, "test")])
    again.prepare_traces([("fp32", "test"), (None, "test")])
    assert passes == [["fake-w8a8"]]
    assert again.trace("fp32", "test").path == ctx.trace("fp32", "test").path


def test_a_failed_joint_pass_leaves_no_entry(ctx, cache_dir, monkeypatch):
    import harness.trace as trace_module

    real = trace_module.trace_batch

    def fail_under_fp32(backbone, *args):
        if backbone.quantizer == "fp32":
            raise RuntimeError("power cut")
        return real(backbone, *args)

    monkeypatch.setattr(trace_module, "trace_batch", fail_under_fp32)
    joint = Session(HarnessConfig(**{**ctx.config.__dict__, "quant": "fake-w8a8"}), progress=False)
    with pytest.raises(RuntimeError, match="power cut"):
        joint.prepare_traces([(None, "heads"), ("fp32", "heads")])
    assert list((cache_dir / "traces").iterdir()) == []  # neither entry, nor a temporary folder
