from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.backbones import state_dict_sha256
from harness.quantizers import QuantizerUnavailable, create_quantizer, list_quantizers
from harness.quantizers._fake import FakeQuantAttention, FakeQuantLinear, fake_quantize

QUANTIZERS = ["fp32", "int8-dynamic", "int8-torchao", "fake-w8a8", "fake-w4a4", "fake-w6a6-tensor"]


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Dequantized weight of every Linear-like module (works for torch.ao and torchao too)."""
    out = {}
    for name, mod in module.named_modules():
        weight = getattr(mod, "weight", None)
        if callable(weight):  # torch.ao dynamic Linear: weight() returns a quantized tensor
            weight = weight()
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            w = weight.dequantize() if hasattr(weight, "dequantize") else weight
            out[name] = w.detach().float()
        if isinstance(mod, nn.MultiheadAttention):
            out[name + ".in_proj"] = mod.in_proj_weight.detach().float()
    return out


@pytest.mark.parametrize("name", QUANTIZERS)
def test_quantizer_changes_exactly_the_layers_it_claims(name, embedded_backbone):
    quantizer = create_quantizer(name)
    visual = embedded_backbone.visual
    before = state_dict_sha256(visual)
    quantized = quantizer.quantize(visual)
    assert state_dict_sha256(visual) == before, "the fp32 tower must not be modified"

    targets = set(quantizer.targets(visual))
    original, changed = _weights(visual), _weights(quantized)
    assert set(changed) == set(original)
    for layer, weight in original.items():
        parent, _, leaf = layer.rpartition(".")
        claimed = layer in targets or (leaf in ("in_proj", "out_proj") and parent in targets)
        if claimed:
            assert not torch.equal(changed[layer], weight), f"{name}: {layer} claimed but unchanged"
        else:
            assert torch.equal(changed[layer], weight), f"{name}: {layer} changed but not claimed"
    expected_count = {"fp32": 0, "int8-dynamic": 24, "int8-torchao": 24}.get(name, 36)
    assert len(targets) == expected_count


# damage scenarios (harness/quantizers/_damage.py) inherit their base's batch invariance
DAMAGE = ["noise-b10-s1", "noise-b4-s0.5-fake-w8a8", "outliers-b7-c4-x300-fake-w8a8",
          "outliers-b7-c4-x300-fake-w8a8-tensor"]


@pytest.mark.parametrize("name", QUANTIZERS + DAMAGE)
def test_batch_invariance_is_measured_not_assumed(name, embedded_backbone, images):
    quantizer = create_quantizer(name)
    quantized = quantizer.quantize(embedded_backbone.visual)
    with torch.inference_mode():
        together = quantized(images)
        alone = torch.cat([quantized(images[i:i + 1]) for i in range(len(images))])
    gap = (together - alone).abs().max().item()
    if quantizer.batch_invariant:
        assert gap < 1e-4, f"{name} claims batch invariance but differs by {gap}"
    else:
        assert gap > 1e-4, f"{name} claims batch dependence but differs by only {gap}"


def test_fake_quant_attention_without_rounding_equals_multihead_attention(embedded_backbone, images):
    mha = embedded_backbone.blocks[3].attn
    x = torch.randn(4, 50, 128)
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False)[0]
        got, _ = FakeQuantAttention(mha, None, None, per_token=True)(x, x, x, need_weights=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_fake_quantize_by_hand():
    x = torch.tensor([[-1.0, -0.2, 0.26, 0.5], [2.0, 1.0, 0.0, -0.4]])
    # 3 bits: levels -3..3, per row scale max|x| / 3
    per_row = fake_quantize(x, 3, dim=-1)
    torch.testing.assert_close(per_row[0], torch.tensor([-3, -1, 1, 2]) / 3.0)
    torch.testing.assert_close(per_row[1], torch.tensor([3, 2, 0, -1]) * (2 / 3))
    whole = fake_quantize(x, 3, dim=None)  # one scale 2/3 for the tensor
    torch.testing.assert_close(whole[0], torch.tensor([-2, 0, 0, 1]) * (2 / 3))
    # 8 bits: every value is an integer multiple of its row's scale, within +-127
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    levels = fake_quantize(x, 8, dim=-1) / scale
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert levels.abs().max() <= 127 + 1e-4


def test_fused_fake_quantize_gives_the_eager_numbers_bit_for_bit(images, embedded_backbone):
    from harness.quantizers._fake import fused_fake_quantize

    g = torch.Generator().manual_seed(0)
    real = embedded_backbone.embed(images)  # real tokens entering block 1
    for x in (real, real[:3, :7], torch.randn(300, 128, generator=g) * 300, torch.randn(2, 5, 512, generator=g) * 1e-6):
        for bits in (2, 4, 8):
            for dim in (-1, None):
                assert torch.equal(fused_fake_quantize(x, bits, dim), fake_quantize(x, bits, dim)), (x.shape, bits, dim)
    assert fused_fake_quantize(real, None, -1) is real


def test_fused_fake_quantize_falls_back_to_eager_with_one_warning(monkeypatch):
    import torch._dynamo.exc

    import harness.quantizers._fake as fake

    def broken():
        def call(*args):
            raise torch._dynamo.exc.BackendCompilerFailed(lambda: None, RuntimeError("no C++ compiler"), None)
        return call

    monkeypatch.setattr(fake, "_fused", broken)
    monkeypatch.setattr(fake, "_COMPILE_FAILED", False)
    x = torch.randn(4, 6)
    with pytest.warns(UserWarning, match="runs unfused .*RuntimeError: no C\\+\\+ compiler"):
        assert torch.equal(fake.fused_fake_quantize(x, 4, -1), fake_quantize(x, 4, -1))
    assert fake._COMPILE_FAILED and not fake.fusion_active()  # later calls go straight to eager mode, no warning


def test_eager_fake_quantization_bypasses_the_fused_kernel_inside_its_block(monkeypatch):
    import harness.quantizers._fake as fake

    calls = []
    monkeypatch.setattr(fake, "_fused", lambda: lambda *args: calls.append(args) or fake_quantize(*args))
    monkeypatch.setattr(fake, "_COMPILE_FAILED", False)
    x = torch.randn(4, 6)
    with fake.eager_fake_quantization():
        assert torch.equal(fake.fused_fake_quantize(x, 4, -1), fake_quantize(x, 4, -1))
        assert not fake.fusion_active()
    assert calls == [] and fake.fusion_active()
    fake.fused_fake_quantize(x, 4, -1)
    assert len(calls) == 1  # after the block, the fused kernel again


def test_fake_quant_weights_are_per_output_channel(embedded_backbone):
    linear = embedded_backbone.blocks[0].mlp.c_fc  # weight [512, 128]: rows are output channels
    fq = FakeQuantLinear.from_linear(linear, w_bits=4, a_bits=None, per_token=True)
    w, q = linear.weight.detach(), fq.weight.detach()
    # each row keeps its own max (scale = row max / 7), so the row maxima survive exactly
    torch.testing.assert_close(q.abs().amax(dim=1), w.abs().amax(dim=1))
    row_scale = w.abs().amax(dim=1, keepdim=True) / 7
    torch.testing.assert_close(q / row_scale, (q / row_scale).round(), atol=1e-4, rtol=0)
    assert not torch.equal(q.abs().amax(dim=0), w.abs().amax(dim=0))  # columns are not the unit


def test_int8_deprecation_warnings_stay_out_of_our_output(embedded_backbone, images):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("int8-dynamic", "int8-torchao"):
            with torch.inference_mode():
                create_quantizer(name).quantize(embedded_backbone.visual)(images[:2])
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]


def test_lower_precision_gives_larger_error(embedded_backbone, images):
    with torch.inference_mode():
        ref = embedded_backbone.visual(images)
        errors = [(create_quantizer(q).quantize(embedded_backbone.visual)(images) - ref).norm().item()
                  for q in ("fake-w8a8", "fake-w6a6", "fake-w4a4")]
    assert 0 < errors[0] < errors[1] < errors[2]


def test_registry_names_and_errors():
    names = [n for n, _ in list_quantizers()]
    assert {"fp32", "int8-dynamic", "int8-torchao", "fake-wNaM[-tensor]"} <= set(names)
    with pytest.raises(KeyError, match="Did you mean 'int8-dynamic'"):
        create_quantizer("int8-dynamc")
    with pytest.raises(KeyError, match="Unknown quantizer 'fake-w9a9'"):
        create_quantizer("fake-w9a9")
    assert create_quantizer("fake-w4a8").config()["activations"].startswith("8-bit per-token")


def test_int8_dynamic_refuses_cuda():
    with pytest.raises(QuantizerUnavailable, match="runs on cpu"):
        create_quantizer("int8-dynamic").check_device("cuda")
