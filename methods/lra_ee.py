"""LRA-EE: layer-wise representation-aware early exit for quantized ViTs (arXiv 2605.26415, sections 4-5).

Four parts, each behind a config switch so that the factorial ablation is
only a list of configs:

- a head per exit layer on the patch-token mean (SSA) or the CLS token,
  trained with cross-entropy, optionally plus a cosine loss toward the fp32
  model's final embedding of the same image ("distilled");
- a gate per exit layer, a logistic regression on (max probability, top-2
  margin, spatial-activation variance) fitted on the ``gate`` split, or the
  max probability alone;
- exit layers: by default the candidates are blocks ceil(2n/3) to n - 1
  (blocks 8-11 of 12: the paper's "last third", our reading), minus those
  whose information-to-noise ratio is below ``kappa`` x the candidates' mean
  (:func:`harness.fidelity.inr`: the harness's one definition, fp32 signal
  over quantization-error variance, on the ``heads`` split, the same as the
  noise profile's); or every block; or a list;
- thresholds per exit layer (LCT) or one shared threshold, picked on the
  ``gate`` split by :func:`choose_thresholds` to maximise accuracy under a
  FLOPs budget.

``routing="last"`` is the recalibration control: one head after the last
block, every sample classified by it, no early exit.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.drivers import on_device
from harness.fidelity import inr
from harness.heads import Classifier, ExitHead, load_heads, train_heads
from harness.options import option
from harness.policy import (THRESHOLD_GRID, Decision, ExitPolicy, FitContext, LayerView, SplitFeatures,
                            register_method)
from methods.confidence import confidence_score

GRID = THRESHOLD_GRID  # the paper's 25-point threshold grid
GATE_FLOPS = 8.0  # 3 multiply-adds, the bias and the sigmoid: negligible, but counted


@dataclass
class LraEEConfig:
    feature: str = option("patch_mean", choices=("patch_mean", "cls"))  # head input: "patch_mean" (SSA: LayerNorm of the patch-token mean) or "cls"
    supervision: str = option("distilled", choices=("distilled", "hard"))  # "distilled" (CE + 1 - cos to the fp32 final embedding) or "hard" (CE only)
    distill_weight: float = option(1.0, min=0)  # weight of the cosine term in "distilled" supervision
    routing: str = option("adaptive", choices=("adaptive", "last"))  # "adaptive" (gated exits) or "last" (recalibration control: one head after the last block)
    gate: str = option("learned", choices=("learned", "heuristic"))  # "learned" (logistic gate on conf, margin, SAV) or "heuristic" (max softmax probability)
    gate_steps: int = option(300, min=1)  # full-batch Adam steps of each learned gate
    gate_lr: float = option(1e-2, above=0)  # the paper's gate learning rate
    exit_layers: str | tuple[int, ...] = option("inr", choices=("inr", "all"), blocks=True)  # "inr" (last third, low-INR layers pruned), "all", or explicit blocks
    kappa: float = option(0.5, min=0)  # "inr": drop a candidate whose INR < kappa * mean INR of the candidates
    thresholds: str = option("lct", choices=("lct", "global"))  # "lct" (one threshold per exit layer) or "global" (one shared threshold)
    max_flops_fraction: float = option(0.9, above=0, max=1)  # budget: mean FLOPs on the gate split <= this share of the full-depth blocks
    epochs: int = option(3, min=1)  # head training: Adam, batch 64, lr 5e-4 (the paper's recipe)
    batch_size: int = option(64, min=1)
    lr: float = option(5e-4, above=0)


def prune_layers(layers: Sequence[int], values: Sequence[float], kappa: float = 0.5) -> list[int]:
    """The layers whose INR is at least ``kappa`` times the mean INR of ``layers``.

    A layer with no quantization error (every layer of an fp32 run) has
    infinite INR: it is always kept, and the mean is taken over the finite
    values only.

    Example:
        >>> prune_layers([8, 9, 10, 11], [4.0, 1.0, 5.0, 6.0])
        [8, 10, 11]
    """
    finite = [v for v in values if math.isfinite(v)]
    cut = kappa * float(np.mean(finite)) if finite else math.inf
    return [int(layer) for layer, v in zip(layers, values) if not math.isfinite(v) or v >= cut]


def _simulate(thresholds: np.ndarray, scores: np.ndarray, correct: np.ndarray, full_correct: np.ndarray,
              exit_cost: np.ndarray, full_cost: float, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Correct-sample counts [M] and mean cost [M] of M threshold vectors [M, K] (first passing layer exits)."""
    hits, costs = [], []
    for start in range(0, len(thresholds), chunk):
        t = thresholds[start:start + chunk]
        remaining = np.ones((len(t), scores.shape[1]), dtype=bool)
        hit = np.zeros(len(t), dtype=np.int64)
        cost = np.zeros(len(t))
        for k in range(scores.shape[0]):
            leaving = remaining & (scores[k][None, :] >= t[:, k, None])
            hit += (leaving & correct[k][None, :]).sum(axis=1)
            cost += leaving.sum(axis=1) * exit_cost[k]
            remaining &= ~leaving
        hit += (remaining & full_correct[None, :]).sum(axis=1)
        cost += remaining.sum(axis=1) * full_cost
        hits.append(hit)
        costs.append(cost / scores.shape[1])
    return np.concatenate(hits), np.concatenate(costs)


def _best(hits: np.ndarray, costs: np.ndarray, budget: float) -> tuple[int, bool]:
    """Most accurate within budget (then cheapest, then first); if none fits, the cheapest (then most accurate)."""
    feasible = costs <= budget + 1e-12
    if feasible.any():
        candidates = np.flatnonzero(feasible)
        order = np.lexsort((candidates, costs[candidates], -hits[candidates]))
        return int(candidates[order[0]]), True
    order = np.lexsort((np.arange(len(costs)), -hits, costs))
    return int(order[0]), False


def choose_thresholds(scores: Sequence[np.ndarray], correct: Sequence[np.ndarray], full_correct: np.ndarray,
                      exit_cost: Sequence[float], full_cost: float, budget: float,
                      grid: Sequence[float] = GRID, per_layer: bool = True,
                      passes: int = 4) -> tuple[list[float], float, float, bool]:
    """Exit thresholds that maximise accuracy subject to mean cost <= ``budget``.

    A sample exits at the first exit layer k whose score reaches threshold k,
    else runs to full depth. Per-layer search is exhaustive for up to three
    exit layers and coordinate ascent (from the best shared threshold) beyond.

    Args:
        scores, correct: per exit layer (in depth order), [N] gate scores and
            [N] bool "this layer's prediction is right".
        full_correct: [N] bool, the full-depth prediction is right.
        exit_cost: cost of a sample that exits at each exit layer; full_cost:
            of one that does not (any unit, e.g. a share of full-depth FLOPs).
        budget: the largest allowed mean cost, in the same unit.
        grid: candidate threshold values.
        per_layer: one threshold per layer (LCT), or one shared by all.
        passes: coordinate-ascent passes (more than three layers only).

    Returns:
        (thresholds per exit layer, accuracy, mean cost, budget met). When no
        setting meets the budget, the cheapest one is returned with False.

    Example:
        >>> choose_thresholds([np.array([0.9, 0.1])], [np.array([True, False])], np.array([True, True]),
        ...                   [0.5], 1.0, budget=0.8, grid=[0.5])
        ([0.5], 1.0, 0.75, True)
    """
    s = np.stack([np.asarray(x, dtype=np.float64) for x in scores])
    c = np.stack([np.asarray(x, dtype=bool) for x in correct])
    full_correct = np.asarray(full_correct, dtype=bool)
    exit_cost = np.asarray(exit_cost, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    k, n = s.shape

    def search(candidates: np.ndarray) -> tuple[np.ndarray, int, float, bool]:
        hits, costs = _simulate(candidates, s, c, full_correct, exit_cost, full_cost)
        i, met = _best(hits, costs, budget)
        return candidates[i], int(hits[i]), float(costs[i]), met

    shared = np.repeat(grid[:, None], k, axis=1)
    best, hits, cost, met = search(shared)
    if per_layer and k <= 3:
        best, hits, cost, met = search(np.array(list(itertools.product(grid, repeat=k))))
    elif per_layer:
        for _ in range(passes):  # each step keeps the current vector among the candidates: never worse
            before = best.copy()
            for layer in range(k):
                candidates = np.repeat(best[None, :], len(grid), axis=0)
                candidates[:, layer] = grid
                best, hits, cost, met = search(candidates)
            if np.array_equal(before, best):
                break
    return [float(t) for t in best], hits / n, cost, met


class _Gates(nn.Module):
    """Per exit layer: sigmoid(w . standardised(conf, margin, SAV) + b)."""

    def __init__(self, layers: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(layers, 3))
        self.bias = nn.Parameter(torch.zeros(layers))
        self.register_buffer("mean", torch.zeros(layers, 3))
        self.register_buffer("std", torch.ones(layers, 3))

    def forward(self, index: int, features: torch.Tensor) -> torch.Tensor:
        """Gate logit [B] of exit layer ``index`` (position among the exit layers) from raw features [B, 3]."""
        z = (features - self.mean[index]) / self.std[index]
        return z @ self.weight[index] + self.bias[index]


def _gate_features(logits: torch.Tensor, sav: torch.Tensor) -> torch.Tensor:
    return torch.stack([confidence_score(logits, "maxprob"), confidence_score(logits, "margin"), sav.float()], dim=1)


def _fp32_rows(quantized: SplitFeatures, fp32: SplitFeatures) -> np.ndarray:
    """Row of each quantized sample in the fp32 trace (both hold the ``heads`` split)."""
    if not (hasattr(quantized, "indices") and hasattr(fp32, "indices")):  # no sample ids: rows must correspond
        if len(quantized.labels) != len(fp32.labels):
            raise ValueError(f"lra-ee: {len(quantized.labels)} quantized vs {len(fp32.labels)} fp32 heads samples")
        return np.arange(len(quantized.labels))
    q_idx, f_idx = np.asarray(quantized.indices), np.asarray(fp32.indices)
    if np.array_equal(q_idx, f_idx):
        return np.arange(len(q_idx))
    position = {int(i): row for row, i in enumerate(f_idx)}
    missing = [int(i) for i in q_idx if int(i) not in position]
    if missing:
        raise ValueError(f"lra-ee: {len(missing)} heads samples (e.g. index {missing[0]}) have no fp32 trace row; "
                         "the fp32 and quantized traces skipped different images")
    return np.array([position[int(i)] for i in q_idx], dtype=np.int64)


@register_method("lra-ee", "SSA heads, learned gates, INR-pruned exit layers, per-layer thresholds (LRA-EE)")
class LraEE(ExitPolicy):
    """LRA-EE: gated exits from patch-mean heads at INR-selected layers, thresholds under a FLOPs budget."""

    Config = LraEEConfig
    knob, knob_grid = "shared threshold", THRESHOLD_GRID
    reads_heads_fp32 = True  # the INR layer choice and the distillation loss

    def __init__(self, config: LraEEConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self._check_config()
        self.heads = nn.ModuleDict()
        self.gates = _Gates(0)
        self.thresholds: list[float] = []
        self.classifier: Classifier | None = None  # the model's, copied at fit time
        self.report: dict = {}  # fit diagnostics: INR, gate-split accuracy and FLOPs, whether the budget was met

    def _check_config(self) -> None:
        self.needs = frozenset({self.config.feature} | ({"sav"} if self.config.gate == "learned" else set()))

    # -- fitting ---------------------------------------------------------------------------------
    def fit(self, ctx: FitContext) -> None:
        c = self.config
        self.classifier = ctx.classifier.copy_to("cpu")  # fits on the CPU
        self.report = {}
        layers = [ctx.num_blocks] if c.routing == "last" else self._select_layers(ctx)
        self._fit_heads(ctx, layers)
        if c.routing == "last":
            self.gates, self.thresholds = _Gates(1), [0.0]
            return
        scores, correct = self._fit_gates(ctx, layers)
        head_cost = [self.head_flops(layer) for layer in layers]
        full = float(sum(ctx.block_flops))
        exit_cost = [(sum(ctx.block_flops[:layer]) + sum(head_cost[:i + 1])) / full for i, layer in enumerate(layers)]
        full_correct = np.asarray(ctx.gate.logits).argmax(axis=1) == np.asarray(ctx.gate.labels)
        thresholds, accuracy, flops, met = choose_thresholds(
            scores, correct, full_correct, exit_cost, 1.0 + sum(head_cost) / full, c.max_flops_fraction,
            per_layer=c.thresholds == "lct")
        self.thresholds = thresholds
        self.report.update(gate_accuracy=accuracy, gate_flops_fraction=flops, budget_met=met)

    def _select_layers(self, ctx: FitContext) -> list[int]:
        c, n = self.config, ctx.num_blocks
        if isinstance(c.exit_layers, tuple):
            layers = sorted(set(int(layer) for layer in c.exit_layers))
            if not layers or not all(1 <= layer <= n for layer in layers):
                raise ValueError(f"lra-ee: exit_layers {c.exit_layers} must be blocks in 1..{n}")
            return layers
        if c.exit_layers == "all":
            return list(range(1, n))
        candidates = list(range(math.ceil(2 * n / 3), n))
        if not candidates:
            raise ValueError(f"lra-ee: a {n}-block backbone has no INR candidate layers; give exit_layers")
        fp32 = ctx.heads_fp32
        rows = _fp32_rows(ctx.heads, fp32)
        values = [inr(ctx.heads.patch_mean[:, layer], fp32.patch_mean[rows, layer])
                  for layer in candidates]
        self.report.update(inr_layers=candidates, inr=values)
        return prune_layers(candidates, values, c.kappa)

    def _fit_heads(self, ctx: FitContext, layers: list[int]) -> None:
        """Train the heads, once per recipe: fits that differ only in gates, thresholds or budget share them."""
        c = self.config

        def train() -> dict:
            torch.manual_seed(ctx.seed)
            heads = {layer: ExitHead(ctx.width, ctx.embed_dim) for layer in layers}
            features = getattr(ctx.heads, c.feature)
            extra = self._distillation_loss(ctx) if c.supervision == "distilled" else None
            train_heads(heads, {layer: features[:, layer] for layer in layers}, ctx.heads.labels, self.classifier,
                        seed=ctx.seed, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr,
                        extra_loss=extra)
            return nn.ModuleDict({str(layer): head for layer, head in heads.items()}).state_dict()

        recipe = json.dumps(["lra-ee-heads", c.feature, c.supervision, c.distill_weight, c.epochs, c.batch_size,
                             c.lr, layers])
        self.heads = load_heads(ctx.cached(recipe, train), layers, ctx.embed_dim)

    def _distillation_loss(self, ctx: FitContext):
        """``train_heads``' extra loss: weight * (1 - cos(head embedding, fp32 final embedding of the same image))."""
        fp32 = ctx.heads_fp32
        rows = _fp32_rows(ctx.heads, fp32)
        weight = self.config.distill_weight

        def loss(layer: int, embedding: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
            target = torch.from_numpy(np.asarray(fp32.embedding[rows[idx]], dtype=np.float32))
            return weight * (1 - F.cosine_similarity(embedding, target, dim=-1)).mean()

        return loss

    def _fit_gates(self, ctx: FitContext, layers: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Fit the gates on the ``gate`` split; returns each layer's gate scores and head correctness there."""
        labels = torch.from_numpy(np.array(ctx.gate.labels, dtype=np.int64))  # copies: traces are read-only maps
        feature = getattr(ctx.gate, self.config.feature)
        raw, correct = [], []
        with torch.no_grad():
            for layer in layers:
                x = torch.from_numpy(np.array(feature[:, layer], dtype=np.float32))
                logits = self.classifier(self.heads[str(layer)](x))
                raw.append(_gate_features(logits, torch.from_numpy(np.array(ctx.gate.sav[:, layer], np.float32))))
                correct.append(logits.argmax(dim=-1) == labels)
        torch.manual_seed(ctx.seed)
        self.gates = _Gates(len(layers))
        if self.config.gate == "heuristic":
            return [f[:, 0].numpy() for f in raw], [y.numpy() for y in correct]
        with torch.no_grad():
            nn.init.normal_(self.gates.weight, std=0.01)
            for i, f in enumerate(raw):
                self.gates.mean[i] = f.mean(dim=0)
                self.gates.std[i] = f.std(dim=0, correction=0).clamp_min(1e-6)
        optimizer = torch.optim.Adam(self.gates.parameters(), lr=self.config.gate_lr)
        for _ in range(self.config.gate_steps):
            loss = sum(F.binary_cross_entropy_with_logits(self.gates(i, f), y.float()) for i, (f, y)
                       in enumerate(zip(raw, correct)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        self.gates.requires_grad_(False)
        with torch.no_grad():
            scores = [torch.sigmoid(self.gates(i, f)).numpy() for i, f in enumerate(raw)]
        return scores, [y.numpy() for y in correct]

    # -- inference -------------------------------------------------------------------------------
    def exit_layers(self) -> list[int]:
        return sorted(int(k) for k in self.heads)

    def decide(self, layer: int, view: LayerView) -> Decision:
        feature = view.cls() if self.config.feature == "cls" else view.patch_mean()
        classifier = on_device(self.classifier, feature.device)
        head = on_device(self.heads[str(layer)], feature.device)
        logits = classifier(head(feature))
        if self.config.routing == "last":
            return Decision(exit=torch.ones(len(view), dtype=torch.bool), logits=logits)
        index = self.exit_layers().index(layer)
        if self.config.gate == "learned":
            score = torch.sigmoid(on_device(self.gates, feature.device)(index, _gate_features(logits, view.sav())))
        else:
            score = confidence_score(logits, "maxprob")
        return Decision(exit=score >= self.thresholds[index], logits=logits)

    def with_knob(self, value: float) -> "LraEE":
        """A copy with one shared threshold ``value`` on every exit layer (fitted heads and gates kept)."""
        other = copy.copy(self)
        other.thresholds = [float(value)] * len(self.thresholds)
        return other

    def budget_config(self, saving: float) -> dict:
        """LCT fits its thresholds under a FLOPs budget itself: at ``saving`` %, the budget is the rest.

        The recalibration control (``routing="last"``) has no budget to fit and is swept like any method.
        """
        return {"max_flops_fraction": 1 - saving / 100} if self.config.routing == "adaptive" else {}

    def head_flops(self, layer: int) -> float:
        if str(layer) not in self.heads:
            return 0.0
        gate = GATE_FLOPS if self.config.gate == "learned" and self.config.routing == "adaptive" else 0.0
        return self.heads[str(layer)].flops() + gate

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        c = self.config
        return {"heads": self.heads.state_dict(), "layers": self.exit_layers(), "gates": self.gates.state_dict(),
                "thresholds": list(self.thresholds), "classifier": self.classifier.state(),
                "switches": [c.feature, c.routing, c.gate], "report": dict(self.report)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a fit. The switches decide() reads (feature, routing, gate) come from the state."""
        feature, routing, gate = state["switches"]
        self.config = replace(self.config, feature=feature, routing=routing, gate=gate)
        self._check_config()
        self.gates = _Gates(len(state["gates"]["bias"]))
        self.gates.load_state_dict(state["gates"])
        self.gates.requires_grad_(False)
        self.thresholds = [float(t) for t in state["thresholds"]]
        self.classifier = Classifier.from_state(state["classifier"])
        self.heads = load_heads(state["heads"], state["layers"], embed_dim=self.classifier.embed_dim)
        self.report = dict(state["report"])
