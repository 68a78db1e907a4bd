from __future__ import annotations

import io
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness.config import HarnessConfig
from harness.session import Session
from harness.drivers import TraceView, replay
from harness.evaluate import top_classes
from harness.heads import Classifier
from harness.policy import FitContext, create_method
from methods.confidence import confidence_score
from harness.fidelity import inr
from methods.lra_ee import GRID, choose_thresholds, prune_layers

# -- threshold search on a crafted gate split ------------------------------------------------------
# Six samples, two exit layers (cost 0.5 and 0.75 of full depth, full depth 1.0), grid {0.3, 0.6, 0.9}.
#   sample  score@1 right@1  score@2 right@2  right@full   what happens
#   0       0.95    yes      0.10    no       yes          always exits at 1, right
#   1       0.70    no       0.95    yes      yes          t1 <= 0.6: exits at 1, wrong; else exits at 2, right
#   2       0.40    yes      0.40    no       no           t1 = 0.3: exits at 1, right; else t2 = 0.3: 2, wrong
#   3       0.10    no       0.70    yes      no           t2 <= 0.6: exits at 2, right; else full, wrong
#   4       0.10    no       0.50    no       yes          t2 = 0.3: exits at 2, wrong; else full, right
#   5       0.10    no       0.10    no       no           never exits, wrong
# Correct count / total cost of each (t1, t2), by hand:
#   (.3,.3) 3/4.00  (.3,.6) 4/4.25  (.3,.9) 3/4.50
#   (.6,.3) 2/4.25  (.6,.6) 3/4.75  (.6,.9) 2/5.00
#   (.9,.3) 3/4.50  (.9,.6) 4/5.00  (.9,.9) 3/5.25
CRAFTED = dict(
    scores=[np.array([0.95, 0.7, 0.4, 0.1, 0.1, 0.1]), np.array([0.1, 0.95, 0.4, 0.7, 0.5, 0.1])],
    correct=[np.array([1, 0, 1, 0, 0, 0], bool), np.array([0, 1, 0, 1, 0, 0], bool)],
    full_correct=np.array([1, 1, 0, 0, 1, 0], bool),
    exit_cost=[0.5, 0.75], full_cost=1.0, grid=[0.3, 0.6, 0.9],
)


def test_lct_picks_the_most_accurate_then_cheapest_thresholds():
    # 4 right twice: (.3,.6) costs 4.25/6 and (.9,.6) 5/6 -> the cheaper one
    thresholds, accuracy, flops, met = choose_thresholds(**CRAFTED, budget=1.0)
    assert thresholds == [0.3, 0.6] and met
    assert accuracy == pytest.approx(4 / 6) and flops == pytest.approx(4.25 / 6)


def test_lct_under_a_binding_budget():
    # only (.3,.3), at 4.00/6 = 0.667, fits under 0.70
    thresholds, accuracy, flops, met = choose_thresholds(**CRAFTED, budget=0.70)
    assert thresholds == [0.3, 0.3] and met
    assert accuracy == pytest.approx(3 / 6) and flops == pytest.approx(4 / 6)


def test_lct_when_the_budget_cannot_be_met_takes_the_cheapest():
    thresholds, accuracy, flops, met = choose_thresholds(**CRAFTED, budget=0.5)
    assert not met
    assert thresholds == [0.3, 0.3] and flops == pytest.approx(4 / 6) and accuracy == pytest.approx(3 / 6)


def test_global_threshold_is_shared_and_worse_than_lct_here():
    # shared: (.3,.3) 3/4.00, (.6,.6) 3/4.75, (.9,.9) 3/5.25 -> 0.3, 3 right
    thresholds, accuracy, flops, met = choose_thresholds(**CRAFTED, budget=1.0, per_layer=False)
    assert thresholds == [0.3, 0.3] and met
    assert accuracy == pytest.approx(3 / 6) and flops == pytest.approx(4 / 6)


def _brute_force(scores, correct, full_correct, exit_cost, full_cost, budget, grid):
    """Sample-by-sample reference: every threshold vector, loops only."""
    best = None
    for t in itertools.product(grid, repeat=len(scores)):
        right, cost = 0, 0.0
        for n in range(len(full_correct)):
            for k in range(len(scores)):
                if scores[k][n] >= t[k]:
                    right, cost = right + int(correct[k][n]), cost + exit_cost[k]
                    break
            else:
                right, cost = right + int(full_correct[n]), cost + full_cost
        cost /= len(full_correct)
        key = (cost > budget, -right, cost) if cost <= budget else (True, cost, -right)
        if best is None or key < best[0]:
            best = (key, list(t), right / len(full_correct), cost)
    return best[1], best[2], best[3]


@pytest.mark.parametrize("budget", [0.7, 0.85, 1.2])
def test_vectorised_search_matches_a_loop_on_random_data(budget):
    rng = np.random.default_rng(3)
    n, k = 40, 3
    data = dict(scores=list(rng.random((k, n))), correct=list(rng.random((k, n)) < 0.6),
                full_correct=rng.random(n) < 0.7, exit_cost=[0.55, 0.7, 0.85], full_cost=1.05,
                grid=[0.2, 0.4, 0.6, 0.8])
    thresholds, accuracy, flops, met = choose_thresholds(**data, budget=budget)
    ref_t, ref_acc, ref_flops = _brute_force(**data, budget=budget)
    assert accuracy == pytest.approx(ref_acc) and flops == pytest.approx(ref_flops)
    assert thresholds == ref_t
    assert met == (ref_flops <= budget)


def test_coordinate_ascent_beyond_three_layers_is_feasible_and_beats_a_shared_threshold():
    rng = np.random.default_rng(5)
    n, k = 200, 5
    data = dict(scores=list(rng.random((k, n))), correct=list(rng.random((k, n)) < np.linspace(0.4, 0.8, k)[:, None]),
                full_correct=rng.random(n) < 0.75, exit_cost=list(np.linspace(0.5, 0.9, k)), full_cost=1.02)
    lct = choose_thresholds(**data, budget=0.8)
    shared = choose_thresholds(**data, budget=0.8, per_layer=False)
    assert lct[3] and lct[2] <= 0.8 + 1e-12 and lct[1] >= shared[1]
    assert all(t in GRID for t in lct[0]) and len(lct[0]) == k
    assert choose_thresholds(**data, budget=0.8) == lct  # deterministic


# -- INR ------------------------------------------------------------------------------------------
def test_inr_against_numpy():
    rng = np.random.default_rng(0)
    fp32 = rng.normal(0.3, 1.0, size=(50, 8))
    quantized = fp32 + rng.normal(0.0, 0.05, size=(50, 8))
    eps = quantized - fp32
    expected = np.linalg.norm(fp32.mean(axis=0)) ** 2 / np.trace(np.cov(eps.T, bias=True))  # fp32 signal
    assert inr(quantized, fp32) == pytest.approx(expected, rel=1e-10)
    assert inr(quantized.astype(np.float16), fp32.astype(np.float16)) == pytest.approx(expected, rel=0.05)
    assert inr(fp32, fp32) == math.inf


def test_prune_layers_by_hand():
    # mean of (4, 1, 5, 6) = 4, cut 2: layer 9 goes (the paper's pathological layer)
    assert prune_layers([8, 9, 10, 11], [4.0, 1.0, 5.0, 6.0], kappa=0.5) == [8, 10, 11]
    assert prune_layers([8, 9, 10, 11], [4.0, 1.0, 5.0, 6.0], kappa=0.2) == [8, 9, 10, 11]
    assert prune_layers([8, 9], [math.inf, math.inf]) == [8, 9]
    assert prune_layers([8, 9, 10], [math.inf, 10.0, 1.0]) == [8, 9]  # cut from the finite mean 5.5


def _features(patch_mean: np.ndarray) -> SimpleNamespace:
    n = len(patch_mean)
    return SimpleNamespace(patch_mean=patch_mean, cls=patch_mean, sav=np.ones(patch_mean.shape[:2], np.float32),
                           embedding=np.zeros((n, 4), np.float32), logits=np.zeros((n, 3), np.float32),
                           labels=np.zeros(n, np.int64), indices=np.arange(n))


def test_inr_rule_drops_the_noisy_layer_of_a_crafted_trace():
    rng = np.random.default_rng(1)
    fp32 = rng.normal(1.0, 1.0, size=(64, 13, 6)).astype(np.float32)
    noise = np.array([0.01] * 9 + [0.5] + [0.01] * 3)  # layer 9's error has 2500x the variance of its peers
    quantized = fp32 + (rng.normal(size=fp32.shape) * noise[None, :, None]).astype(np.float32)
    heads = _features(quantized)
    shuffled = np.arange(64)[::-1].copy()  # the fp32 twin in another row order: aligned by indices
    twin = _features(fp32[shuffled])
    twin.indices = shuffled
    ctx = FitContext(heads=heads, gate=heads, classifier=Classifier(torch.eye(3, 4), 1.0), num_blocks=12, width=6,
                     embed_dim=4, block_flops=[1.0] * 12, load_heads_fp32=lambda: twin)
    policy = create_method("lra-ee")
    assert policy._select_layers(ctx) == [8, 10, 11]
    assert policy.report["inr_layers"] == [8, 9, 10, 11]
    assert policy.report["inr"][1] < 0.01 * policy.report["inr"][0]


# -- real fits on the embedded model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return Session(HarnessConfig(limit=64, batch_size=32, quant="fp32", cache_dir=str(cache)), progress=False)


@pytest.fixture(scope="module")
def fitted(ctx):
    """Default lra-ee fitted under fp32 and int8-dynamic (once per module)."""
    out = {}
    for quant in ("fp32", "int8-dynamic"):
        policy = create_method("lra-ee")
        policy.fit(ctx.fit_context(quant))
        out[quant] = policy
    return out


def _replay(ctx, policy, quant):
    return replay(policy, ctx.trace(quant, "test"), ctx.backbone.num_blocks, ctx.num_patches)


@pytest.mark.parametrize("quant", ["fp32", "int8-dynamic"])
def test_fit_decide_and_saved_state_replay_identically(ctx, fitted, quant):
    policy = fitted[quant]
    layers = policy.exit_layers()
    assert len(policy.thresholds) == len(layers) and all(t in GRID for t in policy.thresholds)
    report = policy.report
    assert report["budget_met"] is False or report["gate_flops_fraction"] <= 0.9 + 1e-9
    outcome = _replay(ctx, policy, quant)
    assert set(outcome.exit_layer.tolist()) <= set(layers) | {ctx.backbone.num_blocks}

    buffer = io.BytesIO()
    torch.save(policy.state_dict(), buffer)
    buffer.seek(0)
    reloaded = create_method("lra-ee")
    reloaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert reloaded.exit_layers() == layers and reloaded.report == report
    again = _replay(ctx, reloaded, quant)
    np.testing.assert_array_equal(again.exit_layer, outcome.exit_layer)
    np.testing.assert_array_equal(again.predictions, outcome.predictions)
    np.testing.assert_array_equal(again.top5, outcome.top5)


def test_inr_layers_are_candidates_and_fp32_keeps_them_all(fitted):
    for policy in fitted.values():
        assert policy.report["inr_layers"] == [8, 9, 10, 11]  # ceil(2 * 12 / 3) .. 11
        assert set(policy.exit_layers()) <= {8, 9, 10, 11} and policy.exit_layers()
    assert fitted["fp32"].report["inr"] == [math.inf] * 4 and fitted["fp32"].exit_layers() == [8, 9, 10, 11]
    assert all(math.isfinite(v) and v > 0 for v in fitted["int8-dynamic"].report["inr"])


def test_learned_gate_decides_by_its_threshold(ctx, fitted):
    policy = fitted["int8-dynamic"]
    trace = ctx.trace("int8-dynamic", "test")
    layer = policy.exit_layers()[0]
    view = TraceView(trace, layer, np.arange(len(trace)), 0)
    with torch.no_grad():
        decision = policy.decide(layer, view)
        features = torch.stack([confidence_score(decision.logits, "maxprob"),
                                confidence_score(decision.logits, "margin"), view.sav()], dim=1)
        g = policy.gates
        score = torch.sigmoid(((features - g.mean[0]) / g.std[0]) @ g.weight[0] + g.bias[0])
    torch.testing.assert_close(decision.exit, score >= policy.thresholds[0])
    assert policy.head_flops(layer) > 2 * ctx.backbone.width * ctx.backbone.width


def test_routing_last_exits_everyone_after_the_last_block_with_the_head(ctx):
    policy = create_method("lra-ee", routing="last", epochs=1)
    policy.fit(ctx.fit_context("fp32"))
    assert policy.exit_layers() == [12]
    trace = ctx.trace("fp32", "test")
    outcome = _replay(ctx, policy, "fp32")
    assert (outcome.exit_layer == 12).all()
    head = policy.decide(12, TraceView(trace, 12, np.arange(len(trace)), 0)).logits
    np.testing.assert_array_equal(outcome.predictions, head.argmax(1).numpy())
    np.testing.assert_array_equal(outcome.top5, top_classes(head.numpy(), 5))
    zero_shot = top_classes(np.asarray(trace.logits), 5)
    assert (np.sort(outcome.top5, 1) != np.sort(zero_shot, 1)).any()  # the head's scores, not the zero-shot ones


def test_heuristic_gate_with_a_global_threshold(ctx):
    policy = create_method("lra-ee", gate="heuristic", thresholds="global", exit_layers=(4, 8), epochs=1)
    policy.fit(ctx.fit_context("fp32"))
    assert policy.exit_layers() == [4, 8] and len(set(policy.thresholds)) == 1
    trace = ctx.trace("fp32", "test")
    with torch.no_grad():
        decision = policy.decide(4, TraceView(trace, 4, np.arange(len(trace)), 0))
    torch.testing.assert_close(decision.exit, decision.logits.softmax(-1).amax(-1) >= policy.thresholds[0])
    assert policy.head_flops(4) == policy.heads["4"].flops()  # no gate to pay for


def test_distilled_and_hard_heads_differ(ctx):
    fit_ctx = ctx.fit_context("int8-dynamic")
    heads = {}
    for supervision in ("hard", "distilled"):
        policy = create_method("lra-ee", supervision=supervision, exit_layers=(8,), epochs=1)
        policy.fit(fit_ctx)
        heads[supervision] = policy.heads["8"].net[3].weight
    assert not torch.allclose(heads["hard"], heads["distilled"])


def test_bad_switch_names_the_choices():
    with pytest.raises(ValueError, match="gate='oracle': must be one of 'learned', 'heuristic'"):
        create_method("lra-ee", gate="oracle")
    with pytest.raises(ValueError, match="exit_layers='some': must be one of 'inr', 'all', or a list of blocks"):
        create_method("lra-ee", exit_layers="some")
