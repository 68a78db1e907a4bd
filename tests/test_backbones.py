from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from harness._registry import UnknownNameError
from harness.backbones import CheckpointError, create_backbone, state_dict_sha256


def _batch(backbone, images):
    return torch.stack([backbone.preprocess(im) for im in images])


@pytest.mark.parametrize("fixture", ["embedded_backbone", "vit_b32_backbone"])
def test_block_by_block_equals_open_clip_encode_image(fixture, request, fmnist_images):
    backbone = request.getfixturevalue(fixture)
    x = _batch(backbone, fmnist_images[0][:4])
    with torch.no_grad():
        ours = backbone.encode_image(x)
        theirs = backbone.clip.encode_image(x)
        # the pieces by hand, so a change in how encode_image is assembled is caught too
        tokens = backbone.embed(x)
        assert tokens.shape[1] == 50  # a 7x7 grid + CLS in both models
        for block in backbone.blocks:
            tokens = block(tokens)
        by_hand = backbone.head(tokens)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_hand, theirs, atol=1e-5, rtol=0)
    assert backbone.num_blocks == 12


def test_embedded_shape_and_accuracy_sanity(embedded_backbone, embedded_dataset, fmnist_images):
    images, labels = fmnist_images
    classifier = embedded_backbone.zero_shot_classifier(embedded_dataset.classnames, embedded_dataset.templates)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(embedded_backbone.encode_image(_batch(embedded_backbone, images)), dim=-1)
    predictions = (emb @ classifier.T).argmax(1).numpy()
    # the shipped model is a real classifier: most of 16 test images right
    assert (predictions == labels).mean() >= 0.6


def test_local_checkpoint_safetensors_and_torch(embedded_backbone, tmp_path):
    state = {k: v.clone().contiguous() for k, v in embedded_backbone.clip.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = create_backbone("embedded", pretrained=str(tmp_path / name))
        assert loaded.weights_sha256 == embedded_backbone.weights_sha256


def test_random_init_is_seeded_and_differs_from_shipped(embedded_backbone):
    a = create_backbone("embedded", pretrained="none", seed=1)
    b = create_backbone("embedded", pretrained="none", seed=1)
    assert a.weights_sha256 == b.weights_sha256 != embedded_backbone.weights_sha256


def test_mismatched_checkpoint_is_one_clear_line(embedded_backbone, tmp_path):
    state = {k: v.clone().contiguous() for k, v in embedded_backbone.clip.state_dict().items()}
    state["visual.proj"] = torch.zeros(128, 64)
    del state["logit_scale"]
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        create_backbone("embedded", pretrained=str(path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "1 missing keys (e.g. logit_scale)" in message
    assert "visual.proj (128, 64) vs model (128, 128)" in message


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint"])
def test_unreadable_checkpoint(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        create_backbone("embedded", pretrained=str(path))


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": _Pickled()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*evil.pt"):
        create_backbone("embedded", pretrained=str(path))


class _Pickled:
    """An arbitrary object: torch.load(weights_only=True) must refuse to build it."""


def test_missing_checkpoint_and_unknown_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        create_backbone("embedded", pretrained=str(tmp_path / "nope.safetensors"))
    with pytest.raises(UnknownNameError, match="Did you mean.*ViT-B-32"):
        create_backbone("ViT-B-23")
    with pytest.raises(ValueError, match="Known tags: .*openai"):
        create_backbone("ViT-B-32", pretrained="no-such-tag")


def test_zero_shot_classifier_is_cached_and_normalised(embedded_backbone, embedded_dataset, cache_dir, monkeypatch):
    args = (embedded_dataset.classnames, embedded_dataset.templates, "fp32", cache_dir)
    first = embedded_backbone.zero_shot_classifier(*args)
    assert first.shape == (10, embedded_backbone.embed_dim)
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(10))

    def no_text_forward(*a, **k):
        raise AssertionError("text tower ran although the classifier is cached")

    monkeypatch.setattr(embedded_backbone.clip, "encode_text", no_text_forward)
    torch.testing.assert_close(embedded_backbone.zero_shot_classifier(*args), first, atol=0, rtol=0)


def test_fp16_text_tower_close_to_fp32(embedded_backbone, embedded_dataset):
    fp32 = embedded_backbone.zero_shot_classifier(embedded_dataset.classnames, embedded_dataset.templates, "fp32")
    fp16 = embedded_backbone.zero_shot_classifier(embedded_dataset.classnames, embedded_dataset.templates, "fp16")
    assert not torch.equal(fp32, fp16)
    assert torch.nn.functional.cosine_similarity(fp32, fp16).min() > 0.999


def test_weights_hash_sees_every_tensor(embedded_backbone):
    before = state_dict_sha256(embedded_backbone.clip)
    with torch.no_grad():
        embedded_backbone.clip.logit_scale.add_(1.0)
    try:
        assert state_dict_sha256(embedded_backbone.clip) != before
    finally:
        with torch.no_grad():
            embedded_backbone.clip.logit_scale.sub_(1.0)
    assert state_dict_sha256(embedded_backbone.clip) == before
