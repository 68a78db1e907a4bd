"""The vision-tower adapters: block by block equals each model's own forward."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from harness.errors import ConfigError
from harness.towers import OpenClipTimmTower, OpenClipTower, TimmTower, tower

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=7)


def _timm_vit(**options) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **options}).eval()


def _blockwise(adapter, images: torch.Tensor) -> torch.Tensor:
    x = adapter.embed(images)
    for block in adapter.blocks:
        x = block(x)
    return adapter.head(x)


@pytest.mark.parametrize("options, prefix, class_token", [
    ({}, 1, True),                                                  # DeiT/ViT: class token, token pooling
    ({"reg_tokens": 4}, 5, True),                                   # class token and 4 registers
    ({"class_token": False, "global_pool": "avg"}, 0, False),       # no class token, mean pooling
    ({"class_token": False, "global_pool": "map", "reg_tokens": 2}, 2, False),  # SigLIP-style attention pooling
])
def test_timm_vit_block_by_block_equals_its_forward(options, prefix, class_token):
    model = _timm_vit(**options)
    adapter = tower(model)
    assert isinstance(adapter, TimmTower) and adapter.family == "timm"
    assert (adapter.num_prefix_tokens, adapter.has_class_token) == (prefix, class_token)
    assert adapter.grid_size == (4, 4) and adapter.width == 48 and len(adapter.blocks) == 3
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = adapter.embed(images)
        assert tokens.shape == (3, prefix + 16, 48)
        features = _blockwise(adapter, images)
        expected = model.forward_head(model.forward_features(images), pre_logits=True)
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
        assert features.shape == (3, adapter.embed_dim)
        torch.testing.assert_close(adapter.classifier(features), model(images), atol=1e-5, rtol=1e-5)


def test_open_clip_timm_trunk_block_by_block_equals_encode_image():
    import open_clip
    from open_clip.timm_model import TimmModel

    torch.manual_seed(0)
    visual = TimmModel("vit_tiny_patch16_224", embed_dim=24, image_size=224, pool="map", proj="none").eval()
    adapter = tower(visual)
    assert isinstance(adapter, OpenClipTimmTower) and adapter.embed_dim == 192  # proj "none": the trunk's width
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(_blockwise(adapter, images), visual(images), atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    linear = TimmModel("vit_tiny_patch16_224", embed_dim=24, image_size=224, pool="avg", proj="linear").eval()
    adapter = tower(linear)
    assert adapter.embed_dim == 24
    with torch.no_grad():
        torch.testing.assert_close(_blockwise(adapter, images), linear(images), atol=1e-5, rtol=1e-5)
    assert open_clip  # the import is what the family needs


def test_open_clip_vit_block_by_block_equals_encode_image():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", load_weights=False).eval()
    adapter = tower(model.visual)
    assert isinstance(adapter, OpenClipTower) and adapter.num_prefix_tokens == 1 and adapter.grid_size == (7, 7)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(_blockwise(adapter, images), model.encode_image(images), atol=1e-5, rtol=1e-5)


def test_unsupported_towers_are_named():
    with pytest.raises(TypeError, match="no adapter runs a ResNet vision tower; supported: open_clip"):
        tower(timm.create_model("resnet18", pretrained=False))


# -- quantizers and FLOPs on timm blocks ---------------------------------------------------------------
TIMM_LINEARS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def test_quantizers_target_the_linears_inside_timm_blocks_only():
    from harness.quantizers import block_targets, create_quantizer

    model = _timm_vit()
    expected = [f"blocks.{i}.{layer}" for i in range(3) for layer in TIMM_LINEARS]
    for name in ("fake-w8a8", "int8-dynamic", "int8-torchao"):
        quantizer = create_quantizer(name)
        assert quantizer.targets(model) == expected, name  # never the classifier head
        assert block_targets(quantizer, model) == TIMM_LINEARS
    quantized = create_quantizer("int8-dynamic").quantize(model)
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert all(isinstance(quantized.get_submodule(name), dynamic) for name in expected)
    assert type(quantized.head) is nn.Linear  # the classifier stays fp32
    torchao = create_quantizer("int8-torchao").quantize(model)
    assert all(type(torchao.get_submodule(name).weight) is not nn.Parameter for name in expected)  # int8 tensors
    assert type(torchao.head.weight) is nn.Parameter
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference, fake = model(images), create_quantizer("fake-w8a8").quantize(model)(images)
    assert 0 < (fake - reference).abs().max() < 0.1 * reference.abs().max()  # quantized, and close


def test_smoothquant_folds_timm_norms_into_qkv_and_fc1_without_changing_the_function():
    from harness.quantizers import create_quantizer
    from harness.quantizers._smooth import smoothing_pairs

    model = _timm_vit()
    assert smoothing_pairs(model)[:2] == [("blocks.0.norm1", "blocks.0.attn.qkv"),
                                          ("blocks.0.norm2", "blocks.0.mlp.fc1")]
    quantizer = create_quantizer("smoothquant-fp32")
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    quantizer.calibrate(model, images)
    smooth = quantizer.quantize(model)
    assert not torch.equal(smooth.blocks[0].norm1.weight, model.blocks[0].norm1.weight)  # factors were folded
    with torch.no_grad():
        torch.testing.assert_close(smooth(images), model(images), atol=1e-4, rtol=1e-4)


def test_a_timm_block_counts_the_hand_formula_of_flops():
    from harness.flops import count_flops

    model = _timm_vit()
    assert model.blocks[0].attn.fused_attn  # fused scaled-dot-product attention: the counter must still see it
    for tokens in (17, 9):
        x = torch.zeros(1, tokens, 48)
        d = 48
        assert count_flops(lambda: model.blocks[0](x)) == 24 * tokens * d * d + 4 * tokens * tokens * d


# -- an open_clip model with a timm trunk and no class token (SigLIP's layout), end to end -----------------
TINY_SIGLIP = "test-tiny-siglip"


@pytest.fixture(scope="module")
def tiny_siglip():
    """A SigLIP-shaped open_clip config (timm trunk, no class token, attention pooling, a Hugging Face
    tokenizer) at toy size, registered for this module's tests."""
    import open_clip
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    def test_tiny_siglip_vit(pretrained: bool = False, **kwargs):
        options = dict(img_size=32, patch_size=8, embed_dim=48, depth=12, num_heads=3, class_token=False,
                       global_pool="map")  # 12 blocks: every method's default layers exist
        return _create_vision_transformer("vit_tiny_patch16_224", pretrained=False, **{**options, **kwargs})

    test_tiny_siglip_vit.__module__ = "timm.models.vision_transformer"  # listed with timm's plain ViTs
    if "test_tiny_siglip_vit" not in timm.list_models():
        register_model(test_tiny_siglip_vit)
    open_clip.factory._MODEL_CONFIGS[TINY_SIGLIP] = {
        "embed_dim": 48, "init_logit_bias": -10, "custom_text": True,
        "vision_cfg": {"image_size": 32, "timm_model_name": "test_tiny_siglip_vit", "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP",
                     "width": 32, "heads": 2, "layers": 2, "no_causal_mask": True, "proj_bias": True,
                     "pool_type": "last"},
    }
    yield TINY_SIGLIP
    del open_clip.factory._MODEL_CONFIGS[TINY_SIGLIP]


def test_a_timm_trunk_clip_is_listed_and_runs_block_by_block(tiny_siglip, capsys, tmp_path):
    from safetensors.torch import save_file

    from harness.backbones import backbone_config, backbone_family, create_backbone, list_backbones

    assert tiny_siglip in list_backbones() and backbone_family(tiny_siglip) == "open_clip-timm"
    assert "ViT-B-16-SigLIP" in list_backbones() and "EVA02-B-16" not in list_backbones()  # EVA: rotary blocks
    backbone = create_backbone(tiny_siglip, "none")
    assert "stand-in" in capsys.readouterr().err  # no Hugging Face tokenizer here: said in one line
    assert (backbone.num_prefix_tokens, backbone.has_class_token, backbone.num_patches) == (0, False, 16)
    assert backbone_config(backbone)["tokens"] == {"family": "open_clip-timm", "prefix_tokens": 0,
                                                   "class_token": False, "grid": [4, 4]}
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_image(images), backbone.clip.encode_image(images),
                                   atol=1e-5, rtol=1e-5)
    tokens = backbone.tokenizer(["a photo of a shirt", "a photo of a shoe"])
    assert tokens.shape == (2, 16) and int(tokens.max()) < 1000 and not torch.equal(tokens[0], tokens[1])
    checkpoint = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.clip.state_dict().items()}, str(checkpoint))
    with pytest.raises(ConfigError, match="tokenizer cannot be loaded"):
        create_backbone(tiny_siglip, str(checkpoint))  # real weights need the real tokenizer


def test_run_all_methods_on_a_timm_trunk_clip(tiny_siglip, tmp_path):
    from harness.config import HarnessConfig
    from harness.policy import METHODS
    from harness.run import run

    config = HarnessConfig(model=tiny_siglip, pretrained="none", limit=200, cache_dir=str(tmp_path), quant="fake-w8a8")
    metrics, predictions = run(config, METHODS.names(), seeds=1, latency=False, agreement_images=0)
    assert metrics["run"]["backbone"]["tokens"]["class_token"] is False
    assert metrics["run"]["quantizer"]["targets_in_each_block"] == TIMM_LINEARS
    # CLS attention needs a class token; the learned pruner trains through open_clip blocks only
    assert "class token" in metrics["failures"]["evit"] and "open_clip" in metrics["failures"]["token-pruner"]
    ran = set(METHODS.names()) - set(metrics["failures"])
    assert ran and ran <= set(metrics["rows"]) and len(metrics["failures"]) == 2
    # without a class token, "cls" is the patch mean: the CLS and patch-mean controls see the same features
    for name in ran:
        top1 = metrics["rows"][name]["summary"]["top1"]["mean"]
        assert 0 <= top1 <= 100
    assert set(predictions["method"]) >= ran


# -- a timm classifier (DeiT/ViT): no text tower, its own head --------------------------------------------
@pytest.fixture(scope="module")
def tiny_deit():
    """``timm:test_tiny_deit``: a 12-block ViT classifier with a class token, 32x32 inputs, 1000 classes."""
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    def test_tiny_deit(pretrained: bool = False, **kwargs):
        options = dict(img_size=32, patch_size=8, embed_dim=48, depth=12, num_heads=3)
        return _create_vision_transformer("vit_tiny_patch16_224", pretrained=False, **{**options, **kwargs})

    test_tiny_deit.__module__ = "timm.models.deit"  # listed with timm's DeiTs
    if "test_tiny_deit" not in timm.list_models():
        register_model(test_tiny_deit)
    return "timm:test_tiny_deit"


def test_a_timm_classifier_scores_with_its_own_head(tiny_deit, tmp_path):
    from safetensors.torch import save_file

    from harness.backbones import create_backbone
    from harness.config import HarnessConfig
    from harness.session import Session

    backbone = create_backbone(tiny_deit, "none")
    assert backbone.clip is None and backbone.tower.family == "timm" and backbone.num_prefix_tokens == 1
    session = Session(HarnessConfig(model=tiny_deit, pretrained="none", limit=40, cache_dir=str(tmp_path)),
                      progress=False)
    classifier = session.classifier
    assert classifier.logit_scale is None and classifier.num_classes == 1000
    images = session.test_images(4)[0]  # the embedded (grayscale) images, as the model's own transform gives them
    assert images.shape == (4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(classifier(backbone.encode_image(images)), backbone.visual(images),
                                   atol=1e-5, rtol=1e-5)
    trace = session.trace("fp32", "test")
    assert trace.logits.shape == (len(trace), 1000)
    checkpoint = tmp_path / "deit.safetensors"
    save_file(backbone.visual.state_dict(), str(checkpoint))
    loaded = create_backbone(tiny_deit, str(checkpoint))
    assert loaded.weights_sha256 == backbone.weights_sha256
    with pytest.raises(FileNotFoundError, match="takes 'timm', 'none' or a file"):
        create_backbone(tiny_deit, str(tmp_path / "missing.safetensors"))


def test_run_all_methods_on_a_timm_classifier(tiny_deit, tmp_path):
    from harness.config import HarnessConfig
    from harness.policy import METHODS
    from harness.run import run

    config = HarnessConfig(model=tiny_deit, pretrained="none", limit=200, cache_dir=str(tmp_path), quant="fake-w8a8")
    metrics, _ = run(config, METHODS.names(), seeds=1, latency=False, agreement_images=0)
    assert metrics["run"]["dataset"]["classifier"] == "1000 classes (the model's linear head)"
    assert metrics["run"]["quantizer"]["targets_in_each_block"] == TIMM_LINEARS
    assert list(metrics["failures"]) == ["token-pruner"]  # EViT runs on timm blocks; the learned pruner refuses
    assert set(METHODS.names()) - {"token-pruner"} <= set(metrics["rows"])


def test_cls_attention_and_token_dropping_leave_register_tokens_out():
    from harness.backbones import cls_attention
    from harness.drivers import _drop_tokens

    model = _timm_vit(reg_tokens=4)
    layout = tower(model).layout
    assert (layout.prefix, layout.class_token) == (5, True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    block = model.blocks[1]
    block.attn.fused_attn = False  # the unfused path hands its attention matrix to attn_drop
    seen = []
    block.attn.attn_drop.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        x = model.blocks[0](tower(model).embed(images))
        block(x)
        weights = cls_attention(block, x, layout)
    assert weights.shape == (2, 16)  # patches only: class and register tokens left out
    torch.testing.assert_close(weights, seen[0][:, :, 0, 5:].mean(dim=1), atol=1e-6, rtol=0)
    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[0, [1, 5, 9]], keep[1, [0, 2, 15]] = True, True
    dropped = _drop_tokens(x, keep, layout.prefix)
    assert dropped.shape == (2, 8, 48) and torch.equal(dropped[:, :5], x[:, :5])
    assert torch.equal(dropped[0, 5:], x[0, [6, 10, 14]]) and torch.equal(dropped[1, 5:], x[1, [5, 7, 20]])
    with pytest.raises(ValueError, match="no class token"):
        cls_attention(block, x, type(layout)(prefix=4, class_token=False))
