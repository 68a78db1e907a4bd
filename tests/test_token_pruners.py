"""Token pruners (evit, token-pruner): dropping vs masking, FLOPs, CLS, keep 1.0, state, the run."""

from __future__ import annotations

import copy
import io

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import harness.drivers as drivers
from harness.backbones import cls_attention
from harness.config import HarnessConfig
from harness.session import Session
from harness.drivers import TokenView, _drop_tokens, run_early_exit
from harness.evaluate import BlockFlops, flops_per_sample
from harness.flops import block_flops, tower_flops
from harness.policy import create_method, keep_top
from harness.quantizers._fake import FakeQuantAttention
from harness.run import format_tables, run
from harness.scoring import outcome_flops
from methods.token_pruner import masked_block, pruned_forward


def _formula(n: int, d: int) -> int:
    """One block, n tokens of width d: projections and MLP 24 n d^2, attention scores and values 4 n^2 d."""
    return 24 * n * d * d + 4 * n * n * d


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return Session(HarnessConfig(limit=32, batch_size=16, quant="fp32", cache_dir=str(cache)), progress=False)


@pytest.fixture(scope="module")
def pruner(ctx):
    policy = create_method("token-pruner")
    policy.fit(ctx.fit_context())
    return policy


@pytest.fixture(scope="module")
def evit(ctx):
    policy = create_method("evit")
    policy.fit(ctx.fit_context())
    return policy


def _tokens_after(backbone, images, blocks: int) -> torch.Tensor:
    with torch.no_grad():
        x = backbone.embed(images)
        for block in backbone.blocks[:blocks]:
            x = block(x)
    return x


def _images(ctx, count=8):
    split = ctx.splits["test"]
    return torch.stack([ctx.backbone.preprocess(ctx.dataset.read_image(split.part, int(i)))
                        for i in split.indices[:count]])


def _key_mask(keep: torch.Tensor, heads: int, per_head: bool) -> torch.Tensor:
    """Additive attention mask [B*H, T, T] (nn.MultiheadAttention) or [B, 1, T, T] (SDPA): -inf on dropped keys."""
    full = torch.cat([torch.ones(len(keep), 1, dtype=torch.bool), keep], dim=1)
    mask = torch.zeros(full.shape, dtype=torch.float32).masked_fill(~full, -torch.inf)
    t = full.shape[1]
    mask = mask[:, None, None, :].expand(-1, heads if per_head else 1, t, -1)
    return mask.reshape(-1, t, t) if per_head else mask


@pytest.mark.parametrize("attention", ["multihead", "fake-quant module"])
def test_dropping_tokens_equals_masking_them_out_of_attention(ctx, attention):
    backbone = ctx.backbone  # fp32 embedded
    x = _tokens_after(backbone, _images(ctx), 3)
    block = backbone.blocks[3]
    if attention == "fake-quant module":  # the in_proj-module path, without rounding
        block = copy.deepcopy(block)
        block.attn = FakeQuantAttention(block.attn, None, None, per_token=True)
    keep = keep_top(torch.rand(x.shape[0], x.shape[1] - 1, generator=torch.Generator().manual_seed(0)), 30)
    with torch.no_grad():
        dropped = block(_drop_tokens(x, keep))
        masked = block(x, attn_mask=_key_mask(keep, block.attn.num_heads, attention == "multihead"))
        trained = masked_block(block, x, torch.cat([torch.ones(len(keep), 1), keep.float()], dim=1))
    for other in (masked, trained):  # CLS first, then the kept tokens in their order
        survivors = torch.stack([other[b][torch.cat([torch.tensor([True]), keep[b]])] for b in range(len(keep))])
        torch.testing.assert_close(survivors, dropped, atol=1e-5, rtol=0)


def test_training_masks_see_the_quantization_of_dropped_tokens(tmp_path):
    """Under a per-tensor quantizer (one activation scale per tensor) masked rows are zeroed before each Linear,
    so the scales, and the kept tokens' outputs, are those of the pruned batch."""
    ctx = Session(HarnessConfig(limit=16, batch_size=16, quant="fake-w8a3-tensor", cache_dir=str(tmp_path)),
                  progress=False)
    backbone, quantizer = ctx.quantized()
    assert not quantizer.batch_invariant
    x = _tokens_after(backbone, _images(ctx, 16), 3)
    keep = keep_top(torch.rand(16, 49, generator=torch.Generator().manual_seed(0)), 30)
    with torch.no_grad():
        dropped = backbone.blocks[3](_drop_tokens(x, keep))
        masked = masked_block(backbone.blocks[3], x, torch.cat([torch.ones(16, 1), keep.float()], dim=1))
    survivors = torch.stack([masked[b][torch.cat([torch.tensor([True]), keep[b]])] for b in range(16)])
    torch.testing.assert_close(survivors, dropped, atol=1e-5, rtol=0)


def test_cls_attention_is_the_blocks_own_attention(ctx):
    x = _tokens_after(ctx.backbone, _images(ctx), 3)
    block = ctx.backbone.blocks[3]
    with torch.no_grad():
        h = block.ln_1(x)
        _, weights = block.attn(h, h, h, need_weights=True, average_attn_weights=True)
        torch.testing.assert_close(cls_attention(block, x), weights[:, 0, 1:], atol=1e-6, rtol=0)
        fake = FakeQuantAttention(block.attn, None, None, per_token=True)
        block = copy.deepcopy(block)
        block.attn = fake
        torch.testing.assert_close(cls_attention(block, x), weights[:, 0, 1:], atol=1e-6, rtol=0)
    view = TokenView(x, 3, np.arange(len(x)), next_block=None)
    with pytest.raises(ValueError, match="no block runs after"):
        view.cls_attention()


@pytest.mark.parametrize("patches", [49, 34, 17, 1])
def test_pruned_block_flops_follow_the_hand_formula(embedded_backbone, patches):
    d = embedded_backbone.width
    tower = tower_flops(embedded_backbone)
    counter = BlockFlops(embedded_backbone, tower["embed"], tower["head"])
    assert counter(5, patches) == block_flops(embedded_backbone, patches + 1, 5) == _formula(patches + 1, d)


def test_sample_flops_count_each_block_at_its_token_count(ctx, evit, pruner):
    backbone = ctx.backbone
    d, blocks = backbone.width, backbone.num_blocks
    tower = tower_flops(backbone)
    counter = BlockFlops(backbone, tower["embed"], tower["head"])
    for policy, schedule in ((evit, [49] * 3 + [35] * 3 + [25] * 3 + [18] * 3),
                             (pruner, [49] * 3 + [34] * 3 + [24] * 3 + [17] * 3)):
        outcome = run_early_exit(policy, backbone, _images(ctx, 4), ctx.classifier)
        assert (outcome.tokens == schedule).all()  # quadratic attention: the count matters, not only the share
        decisions = sum(policy.head_flops(layer) for layer in range(1, blocks + 1))
        hand = tower["embed"] + sum(_formula(n + 1, d) for n in schedule) + tower["head"] + decisions
        np.testing.assert_allclose(outcome_flops(policy, outcome, counter, blocks), hand, rtol=1e-12)
        assert decisions > 0
    # the decision networks: LayerNorm is not counted (as everywhere), the two Linears per present token are
    assert pruner.head_flops(3) == 49 * (2 * d * (d // 4) + 2 * (d // 4))
    assert pruner.head_flops(4) == 0.0
    # evit's ranking: keys of CLS + 49 patches, CLS's query, 50 scores
    assert evit.head_flops(3) == 2 * 50 * d * d + 2 * d * d + 2 * 50 * d
    assert flops_per_sample(outcome.tokens, counter, outcome.exit_layer, {}, [], outcome.by_policy)[0] \
        == tower["embed"] + sum(_formula(n + 1, d) for n in schedule) + tower["head"]


@pytest.mark.parametrize("name", ["evit", "token-pruner", "evit-fuse"])
def test_cls_is_always_kept_and_every_sample_keeps_the_same_count(ctx, evit, pruner, name, monkeypatch):
    policy = {"evit": evit, "token-pruner": pruner}.get(name)
    if policy is None:
        policy = create_method("evit", fuse=True, keep_rate=0.5)
        policy.fit(ctx.fit_context())
    seen = []
    real = drivers._drop_tokens

    def checked(x, keep, prefix):
        out = real(x, keep, prefix)
        assert prefix == 1 and torch.equal(out[:, 0], x[:, 0])  # CLS first and untouched
        assert keep.shape == (x.shape[0], x.shape[1] - 1) and (keep.sum(1) == keep.sum(1)[0]).all()
        seen.append(int(keep.sum(1)[0]))
        return out

    monkeypatch.setattr(drivers, "_drop_tokens", checked)
    outcome = run_early_exit(policy, ctx.backbone, _images(ctx, 16), ctx.classifier)
    assert len(seen) == 3
    assert (outcome.tokens == outcome.tokens[0]).all()
    if name == "evit-fuse":  # ceil(0.5 n) kept plus the fused token, which later blocks count and may drop
        assert seen == [25, 13, 7] and outcome.tokens[0].tolist() == [49] * 3 + [26] * 3 + [14] * 3 + [8] * 3


def test_the_fused_token_is_the_attention_weighted_mean_of_the_dropped(ctx):
    policy = create_method("evit", fuse=True)
    policy.fit(ctx.fit_context())
    x = _tokens_after(ctx.backbone, _images(ctx, 4), 3)
    view = TokenView(x, 3, np.arange(4), ctx.backbone.blocks[3])
    keep = policy.keep_tokens(3, view)
    attention = cls_attention(ctx.backbone.blocks[3], x)
    fused = policy.merge_tokens(3, view, keep)
    for b in range(4):
        w = attention[b][~keep[b]]
        torch.testing.assert_close(fused[b, 0], (w[:, None] * x[b, 1:][~keep[b]]).sum(0) / w.sum())
        assert set(torch.argsort(attention[b], descending=True)[:35].tolist()) == set(keep[b].nonzero()[:, 0].tolist())


@pytest.mark.parametrize("quant", ["fp32", "int8-torchao", None])  # None: the embedded default
def test_keep_ratio_one_reproduces_the_full_depth_quantized_model(tmp_path, quant):
    config = HarnessConfig(limit=32, batch_size=16, quant=quant, cache_dir=str(tmp_path))
    ctx = Session(config, progress=False)
    test = ctx.trace(None, "test")
    for name in ("evit", "token-pruner"):
        policy = create_method(name)
        policy.fit(ctx.fit_context())
        outcome = ctx.real_outcomes([policy.with_knob(1.0)], test)[0]
        full = ctx.full_outcome(test)
        np.testing.assert_array_equal(outcome.predictions, full.predictions)
        np.testing.assert_array_equal(outcome.top5, full.top5)
        assert (outcome.tokens == ctx.num_patches).all()
        assert all(policy.with_knob(1.0).head_flops(layer) == 0 for layer in range(1, 13))
        pruned = ctx.real_outcomes([policy], test)[0]
        assert (pruned.tokens[:, -1] < ctx.num_patches).all()


def test_learned_pruner_state_round_trips_and_training_is_reproducible(ctx, pruner):
    buffer = io.BytesIO()
    torch.save(pruner.state_dict(), buffer)  # as Session.fit caches it
    buffer.seek(0)
    reloaded = create_method("token-pruner")
    reloaded.load_state_dict(torch.load(buffer, weights_only=True))
    x = _tokens_after(ctx.backbone, _images(ctx, 16), 6)
    for layer in (3, 6, 9):
        view = TokenView(x, layer, np.arange(16), ctx.backbone.blocks[layer])
        assert torch.equal(reloaded.keep_tokens(layer, view), pruner.keep_tokens(layer, view))
        assert torch.equal(reloaded.nets[str(layer)](x[:, 1:]), pruner.nets[str(layer)](x[:, 1:]))
    a = run_early_exit(pruner, ctx.backbone, _images(ctx, 16), ctx.classifier)
    b = run_early_exit(reloaded, ctx.backbone, _images(ctx, 16), ctx.classifier)
    np.testing.assert_array_equal(a.predictions, b.predictions)
    np.testing.assert_array_equal(a.top5, b.top5)

    again = create_method("token-pruner")
    again.fit(ctx.fit_context())  # same seed: bit for bit the same nets
    for (key, p), (_, q) in zip(pruner.nets.state_dict().items(), again.nets.state_dict().items()):
        assert torch.equal(p, q), key
    other = create_method("token-pruner")
    other.fit(ctx.fit_context(seed=1))
    assert not torch.equal(other.nets["3"].net[1].weight, pruner.nets["3"].net[1].weight)
    assert all(p.grad is None for p in ctx.backbone.visual.parameters())  # frozen: nothing flows into it
    assert pruner.report["train_images"] == len(ctx.splits["heads"]) and pruner.report["steps"] == 1


@pytest.mark.parametrize("straight_through", [True, False])
def test_training_forward_reaches_every_decision(ctx, straight_through):
    from methods.token_pruner import DecisionNet

    nets = nn.ModuleDict({str(layer): DecisionNet(ctx.backbone.width, 0.7) for layer in (3, 6, 9)})
    embedding, shares, log_prob = pruned_forward(ctx.backbone, _images(ctx, 8), nets, (3, 6, 9),
                                                 torch.Generator().manual_seed(0), 1.0, straight_through)
    assert embedding.shape == (8, ctx.backbone.embed_dim) and len(shares) == 3 and log_prob.shape == (8,)
    assert all((later <= earlier).all() for earlier, later in zip(shares, shares[1:]))  # dropped stays dropped
    assert 0.2 < float(shares[0].detach().mean()) < 1.0  # the initial bias keeps about target_keep
    assert embedding.requires_grad == straight_through  # score-function: the backbone runs without gradient
    objective = embedding.square().sum() + sum(s.sum() for s in shares) if straight_through else log_prob.sum()
    objective.backward()
    for layer, net in nets.items():
        assert net.net[1].weight.grad is not None and net.net[1].weight.grad.abs().sum() > 0, layer


def test_replay_refuses_token_policies(ctx, evit):
    with pytest.raises(NotImplementedError, match="real driver"):
        drivers.replay(evit, ctx.trace("fp32", "test"), 12, 49)


def test_run_compares_the_pruners_with_lra_ee_at_each_budget(tmp_path, count_calls):
    config = HarnessConfig(limit=32, batch_size=16, cache_dir=str(tmp_path))
    passes = count_calls(Session, "real_outcomes")
    metrics, frame = run(config, ["token-pruner", "evit", "lra-ee"], seeds=1, latency=False, agreement_images=16,
                         budgets=(10.0, 25.0))
    rows = metrics["rows"]
    for name in ("token-pruner", "evit"):
        first = rows[name]["per_seed"][0]
        assert first["flops_saving"] > 20 and first["exit_distribution"] == {12: 100.0}
        assert first["layer_accuracy"] == {}
        assert len(frame[frame.method == name]) == 32
        for point in rows[name]["operating_points"]["per_seed"][0]:
            # the keep ratio chosen on gate, where it saves at least the budget; keep 1.0 saves nothing
            assert point["knob"] in (0.5, 0.6, 0.7, 0.8, 0.9) and point["gate_saving"] >= point["budget"]
            assert point["control"] in ("static-cls", "static-ssa")
    # real-driver passes: per pruner, the default setting on test, one for its 5 keep ratios on gate (1.0 is
    # full depth's outcome, no pass), and one for the keep ratios chosen at the budgets on test, unless the
    # only one is the default's (stored)
    chosen = {name: {p["knob"] for p in rows[name]["operating_points"]["per_seed"][0]} - {0.7}
              for name in ("token-pruner", "evit")}
    assert passes["n"] == sum(1 + 1 + bool(knobs) for knobs in chosen.values())
    assert set(metrics["driver_agreement"]["methods"]) == {"full-depth", "lra-ee"}
    table = format_tables(metrics)
    assert "token-pruner" in table and "evit" in table and "routing gain" in table


def test_real_driver_outcomes_are_cached_across_seeds_and_runs(tmp_path, count_calls):
    """evit's fit does not depend on the seed: its real-driver pass runs once for 2 seeds, and not at all when
    the run is repeated; the replayed outcome is the one measured."""
    config = HarnessConfig(limit=32, batch_size=16, cache_dir=str(tmp_path))
    calls = count_calls(Session, "real_outcomes")
    quick = dict(latency=False, agreement_images=0, budgets=())  # no budgets: the default setting's pass only
    first, frame = run(config, ["evit"], seeds=2, **quick)
    assert calls["n"] == 1
    again, frame_again = run(config, ["evit"], seeds=2, **quick)
    assert calls["n"] == 1
    assert again["rows"]["evit"]["per_seed"] == first["rows"]["evit"]["per_seed"]
    pd.testing.assert_frame_equal(frame_again, frame)
    other = HarnessConfig(limit=32, batch_size=8, cache_dir=str(tmp_path))  # another batch: another entry
    run(other, ["evit"], seeds=1, **quick)
    assert calls["n"] == 2


def test_a_sweep_in_one_pass_gives_every_value_its_lone_outcome_and_runs_shared_blocks_once(ctx, evit, pruner):
    cls_ee = ctx.fit("cls-ee", ctx.config.seed)
    policies = [evit.with_knob(v) for v in (0.5, 0.7, 1.0)] + [pruner.with_knob(0.6), pruner.with_knob(0.6)]
    policies += [cls_ee.with_knob(0.3), cls_ee.with_knob(0.6), cls_ee.with_knob(2.0)]  # 2.0: no sample exits
    images = _images(ctx, 16)
    calls = [0] * ctx.num_blocks
    hooks = [block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, block in enumerate(ctx.backbone.blocks)]

    def blocks_run(run) -> tuple[list[int], object]:
        before = list(calls)
        result = run()
        return [b - a for a, b in zip(before, calls)], result

    try:
        shared, together = blocks_run(lambda: drivers.run_early_exits(policies, ctx.backbone, images, ctx.classifier))
        lone, alone = blocks_run(lambda: [run_early_exit(p, ctx.backbone, images, ctx.classifier) for p in policies])
        tokens_only, _ = blocks_run(lambda: drivers.run_early_exits(policies[:5], ctx.backbone, images, ctx.classifier))
    finally:
        for hook in hooks:
            hook.remove()
    for policy, joint, single in zip(policies, together, alone):
        for field in ("exit_layer", "predictions", "top5", "tokens", "by_policy"):
            assert np.array_equal(getattr(joint, field), getattr(single, field)), (policy.name, field)
    assert len({tuple(o.predictions) for o in together}) > 2  # the variants differ, so sharing is not trivial
    assert shared[0] == 1 and sum(shared) < sum(lone) and lone[0] == len(policies)
    # the token policies drop nothing before block 3, so they run blocks 1-3 once; then keep 0.5, 0.7 and the
    # two identical pruners (one batch) part ways, and keep 1.0 goes on with nothing dropped: 4 batches
    assert tokens_only == [1, 1, 1] + [4] * (ctx.num_blocks - 3)
    with pytest.raises(ValueError, match="distinct policy objects"):
        drivers.run_early_exits([evit, evit], ctx.backbone, images, ctx.classifier)


def test_training_runs_the_frozen_prefix_once_per_image_for_all_draws(ctx):
    from methods.token_pruner import DecisionNet

    nets = nn.ModuleDict({str(layer): DecisionNet(ctx.backbone.width, 0.7) for layer in (3, 6, 9)})
    images = _images(ctx, 8)
    rows = {}  # block index -> rows of each call
    hooks = [ctx.backbone.blocks[i].register_forward_hook(lambda _, args, __, i=i: rows.setdefault(i, []).append(
        len(args[0]))) for i in (0, 2)]
    try:
        once = pruned_forward(ctx.backbone, images, nets, (3, 6, 9), torch.Generator().manual_seed(0), 1.0, False,
                              draws=2)
        seen, rows = rows, {}
        repeated = pruned_forward(ctx.backbone, images.repeat(2, 1, 1, 1), nets, (3, 6, 9),
                                  torch.Generator().manual_seed(0), 1.0, False)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {0: [8], 2: [8]}  # blocks 1-3 (frozen, before any decision) on each image once
    assert rows == {0: [16], 2: [16]}
    embedding, shares, log_prob = once
    assert embedding.shape[0] == 16 and log_prob.shape == (16,) and all(s.shape == (16,) for s in shares)
    assert torch.equal(embedding, repeated[0]) and torch.equal(log_prob, repeated[2])  # the same numbers
