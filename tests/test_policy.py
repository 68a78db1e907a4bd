from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.config import HarnessConfig
from harness.session import Session
from harness.drivers import TraceView, replay, run_early_exit
from harness.policy import METHODS, create_method
from harness.run import layer_accuracy


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return Session(HarnessConfig(limit=64, batch_size=32, quant="fp32", cache_dir=str(cache)), progress=False)


@pytest.fixture(scope="module")
def fit_ctx(ctx):
    return ctx.fit_context("fp32")


def _test_images(ctx):
    split = ctx.splits["test"]
    images = [ctx.backbone.preprocess(ctx.dataset.read_image(split.part, int(i))) for i in split.indices]
    return torch.stack(images)


def _fitted(name, fit_ctx):
    policy = create_method(name, epochs=1) if "epochs" in METHODS.get(name).Config.__dataclass_fields__ \
        else create_method(name)
    policy.fit(fit_ctx)
    return policy


def _run(policy, ctx, trace):
    """The driver a policy runs under: trace replay, or the real driver for token policies (which cannot
    be replayed: their later features depend on the tokens they drop)."""
    if policy.prunes_tokens:
        with pytest.raises(NotImplementedError, match="prunes tokens"):
            replay(policy, trace, ctx.backbone.num_blocks, ctx.num_patches)
        return run_early_exit(policy, ctx.backbone, _test_images(ctx), ctx.classifier)
    return replay(policy, trace, ctx.backbone.num_blocks, ctx.num_patches)


@pytest.mark.parametrize("name", METHODS.names())
def test_contract_fit_decide_and_state_round_trip(name, ctx, fit_ctx):
    policy = _fitted(name, fit_ctx)
    layers = policy.exit_layers()
    assert layers == sorted(set(layers)) and all(1 <= layer <= ctx.backbone.num_blocks for layer in layers)
    trace = ctx.trace("fp32", "test")
    outcome = _run(policy, ctx, trace)
    assert outcome.top5.shape == (len(trace), 5) and outcome.exit_layer.shape == (len(trace),)

    reloaded = create_method(name)
    reloaded.load_state_dict(policy.state_dict())
    again = _run(reloaded, ctx, trace)
    np.testing.assert_array_equal(again.exit_layer, outcome.exit_layer)
    np.testing.assert_array_equal(again.predictions, outcome.predictions)
    np.testing.assert_array_equal(again.top5, outcome.top5)
    np.testing.assert_array_equal(again.tokens, outcome.tokens)


@pytest.mark.parametrize("name", [n for n in METHODS.names() if not METHODS.get(n).prunes_tokens])
def test_both_drivers_agree_for_a_batch_invariant_quantizer(name, ctx, fit_ctx):
    """Token policies have one driver only (the contract test checks that replay refuses them)."""
    policy = _fitted(name, fit_ctx)
    trace = ctx.trace("fp32", "test")
    replayed = replay(policy, trace, ctx.backbone.num_blocks, ctx.num_patches)
    real = run_early_exit(policy, ctx.backbone, _test_images(ctx), ctx.classifier)
    np.testing.assert_array_equal(real.exit_layer, replayed.exit_layer)
    np.testing.assert_array_equal(real.predictions, replayed.predictions)
    np.testing.assert_array_equal(real.tokens, replayed.tokens)
    np.testing.assert_array_equal(real.by_policy, replayed.by_policy)


def test_cls_ee_exits_early_and_skips_blocks(ctx, fit_ctx):
    policy = create_method("cls-ee", exit_layers=(4, 8), epochs=1)
    policy.fit(fit_ctx)
    # a threshold at the median confidence of block 4 sends about half the samples out there
    trace = ctx.trace("fp32", "test")
    logits = policy.decide(4, TraceView(trace, 4, np.arange(len(trace)), 0)).logits
    policy.config.threshold = float(logits.softmax(-1).amax(-1).median())
    real = run_early_exit(policy, ctx.backbone, _test_images(ctx), ctx.classifier)
    assert len(set(real.exit_layer.tolist())) >= 2  # a mix of early and later exits
    for layer, tokens in zip(real.exit_layer, real.tokens):
        assert (tokens[:layer] == ctx.num_patches).all() and (tokens[layer:] == 0).all()
    replayed = replay(policy, ctx.trace("fp32", "test"), ctx.backbone.num_blocks, ctx.num_patches)
    np.testing.assert_array_equal(real.exit_layer, replayed.exit_layer)


@pytest.mark.parametrize("name, knob", [("pabee", 1), ("cls-ee", 0.5)])  # knobs at which samples exit at many layers
def test_replay_and_layer_accuracy_read_the_trace_in_chunks_with_the_same_result(name, knob, ctx, fit_ctx):
    policy, trace = _fitted(name, fit_ctx).with_knob(knob), ctx.trace("fp32", "test")
    whole = replay(policy, trace, ctx.backbone.num_blocks, ctx.num_patches)
    chunked = replay(policy, trace, ctx.backbone.num_blocks, ctx.num_patches, chunk=7)  # 64 rows: a last chunk of 1
    for field in ("exit_layer", "predictions", "top5", "tokens", "by_policy"):
        np.testing.assert_array_equal(getattr(chunked, field), getattr(whole, field))
    assert len(set(whole.exit_layer.tolist())) > 3  # samples leave at several layers, in every chunk
    labels = np.asarray(trace.labels)
    expected = {}
    for layer in policy.exit_layers():
        policy.start_batch(len(labels))
        logits = policy.decide(layer, TraceView(trace, layer, np.arange(len(labels)), 0)).logits
        expected[layer] = float(100 * np.mean(logits.argmax(-1).numpy() == labels))
    assert layer_accuracy(policy, trace, chunk=7) == expected
