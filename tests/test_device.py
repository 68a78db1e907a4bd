"""``--device cuda``: policies fit on the CPU and run where the backbone runs (issue #14).

The rule under test (:mod:`harness.drivers`): replay hands a policy features
on the CPU, the real driver on the backbone's device; a policy fits on the
CPU, keeps its fitted state there, and moves its modules to the features'
device when it meets them (:func:`harness.drivers.on_device`). The tests
marked ``cuda`` need a GPU and are skipped without one; they also compare
the GPU's numbers with the CPU's (run them with ``-rA`` to see the sizes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from harness.config import HarnessConfig
from harness.session import Session
from harness.drivers import on_device, replay, run_early_exit
from harness.policy import METHODS, create_method

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_on_device_moves_a_module_in_place_and_only_when_it_is_elsewhere():
    module = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2))
    weight = module[1].weight
    assert on_device(module, torch.device("cpu")) is module and module[1].weight is weight  # no copy
    assert on_device(module, torch.device("meta")) is module
    assert {p.device.type for p in [*module.parameters(), *module.buffers()]} == {"meta"}
    gelu = nn.GELU()
    assert on_device(gelu, torch.device("meta")) is gelu  # nothing to move


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _fitted(name: str, ctx: Session):
    config = {"epochs": 1} if "epochs" in METHODS.get(name).Config.__dataclass_fields__ else {}
    policy = create_method(name, **config)
    policy.fit(ctx.fit_context("fp32"))
    return policy


def _real(policy, ctx: Session):
    """The real driver over the test split in the trace's batches (as :meth:`harness.session.Session.real_outcomes`)."""
    split, backbone = ctx.splits["test"], ctx.backbone
    images = torch.stack([backbone.preprocess(ctx.dataset.read_image(split.part, int(i))) for i in split.indices])
    size = ctx.config.batch_size
    parts = [run_early_exit(policy, backbone, images[i:i + size], ctx.classifier) for i in range(0, len(images), size)]
    return {field: np.concatenate([getattr(p, field) for p in parts]) for field in ("exit_layer", "predictions", "tokens")}


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    """device -> a small fp32 Session of the embedded default (64 images per split), one cache."""
    cache = str(tmp_path_factory.mktemp("cache"))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {device: Session(HarnessConfig(limit=64, batch_size=32, quant="fp32", device=device, cache_dir=cache),
                            progress=False) for device in devices}


@cuda
@pytest.mark.parametrize("name", METHODS.names())
def test_methods_fit_on_the_cpu_and_decide_on_the_gpu(name, contexts):
    ctx = contexts["cuda"]
    policy = _fitted(name, ctx)
    assert {t.device.type for t in _tensors(policy.state_dict())} <= {"cpu"}, "a fitted state must be on the CPU"
    real = _real(policy, ctx)  # the real driver: features on the GPU
    trace = ctx.trace("fp32", "test")
    assert real["predictions"].shape == (len(trace),)
    if policy.prunes_tokens:
        assert (real["tokens"][:, -1] < ctx.num_patches).all()  # the last blocks ran on fewer tokens
        return
    replayed = replay(policy, trace, ctx.backbone.num_blocks, ctx.num_patches)  # back on the CPU
    exits = np.mean(real["exit_layer"] == replayed.exit_layer)
    predictions = np.mean(real["predictions"] == replayed.predictions)
    print(f"{name}: real driver on cuda vs replay of the cuda trace: exits agree {exits:.1%}, "
          f"predictions {predictions:.1%}")
    # the heads now run on the GPU, replay's on the CPU: a sample at a threshold may go either way
    assert exits >= 0.9 and predictions >= 0.9


@cuda
@pytest.mark.parametrize("quant", ["fp32", "fake-w8a8", "fake-w8a3-tensor", "smoothquant-fake-w8a8"])
def test_gpu_traces_match_cpu_traces(quant, contexts):
    cpu, gpu = contexts["cpu"].trace(quant, "test"), contexts["cuda"].trace(quant, "test")
    assert (cpu.meta["key"]["device"], gpu.meta["key"]["device"]) == ("cpu", "cuda")
    np.testing.assert_array_equal(cpu.indices, gpu.indices)
    a, b = np.asarray(cpu.embedding, np.float64), np.asarray(gpu.embedding, np.float64)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    predictions = np.mean(np.asarray(cpu.logits).argmax(1) == np.asarray(gpu.logits).argmax(1))
    print(f"{quant}: cuda vs cpu trace: min embedding cosine {cosine.min():.6f}, max |logit diff| "
          f"{np.abs(np.asarray(cpu.logits) - np.asarray(gpu.logits)).max():.4f}, predictions agree {predictions:.1%}")
    assert cosine.min() > (0.9999 if quant == "fp32" else 0.99) and predictions >= 0.95


@cuda
def test_flops_and_the_classifier_do_not_depend_on_the_device(contexts):
    from harness.flops import block_flops, tower_flops

    cpu, gpu = contexts["cpu"], contexts["cuda"]
    assert tower_flops(gpu.backbone) == tower_flops(cpu.backbone)
    assert block_flops(gpu.backbone, 36, 4) == block_flops(cpu.backbone, 36, 4)
    assert gpu.classifier.weight.device.type == "cuda"
    torch.testing.assert_close(gpu.classifier.weight.cpu(), cpu.classifier.weight, atol=1e-5, rtol=0)


@cuda
def test_gpu_fp32_matches_the_cpu_without_tf32(contexts):
    """cuDNN runs fp32 convolutions (the patch embedding) in TF32 unless told not to: the trace key records it."""
    cpu, gpu = contexts["cpu"], contexts["cuda"]
    split = cpu.splits["test"]
    images = torch.stack([cpu.backbone.preprocess(cpu.dataset.read_image(split.part, int(i)))
                          for i in split.indices[:32]])
    with torch.no_grad():
        reference = cpu.backbone.encode_image(images)
        saved, out = torch.backends.cudnn.allow_tf32, {}
        try:
            for tf32 in (True, False):
                torch.backends.cudnn.allow_tf32 = tf32
                out[tf32] = gpu.backbone.encode_image(images.cuda()).cpu()
        finally:
            torch.backends.cudnn.allow_tf32 = saved
    print(f"embedded encode_image, cuda vs cpu, max |diff| (embedding max {reference.abs().max():.3f}): "
          f"cuDNN TF32 on {(out[True] - reference).abs().max():.2e}, off {(out[False] - reference).abs().max():.2e} "
          f"(default: {'on' if saved else 'off'})")
    torch.testing.assert_close(out[False], reference, rtol=1e-4, atol=1e-4)


@cuda
def test_cpu_only_quantizers_refuse_the_gpu_in_one_line(tmp_path):
    from harness.quantizers import QuantizerUnavailable

    ctx = Session(HarnessConfig(quant="int8-dynamic", device="cuda", cache_dir=str(tmp_path)), progress=False)
    with pytest.raises(QuantizerUnavailable, match="^quantizer 'int8-dynamic' runs on cpu, not cuda$"):
        ctx.quantized()
