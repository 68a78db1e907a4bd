"""What every experiment evaluates against: the test trace, full-depth baselines and FLOPs, for one config."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np

from harness import evaluate
from harness.config import HarnessConfig
from harness.context import Context
from harness.drivers import ExitOutcome, replay
from harness.policy import ExitPolicy


class TestBed:
    """Fits methods (cached) and scores them on the ``test`` trace of one config by replay."""

    __test__ = False  # not a pytest class

    def __init__(self, config: HarnessConfig, progress: bool = True):
        self.ctx = Context(config, progress=progress)
        self.config = self.ctx.config
        self.test = self.ctx.trace(None, "test")
        self.labels = np.asarray(self.test.labels)
        self.num_blocks = self.ctx.backbone.num_blocks
        self.baseline_correct = np.asarray(self.test.logits).argmax(1) == self.labels

    @cached_property
    def _flops(self) -> tuple[float, np.ndarray, evaluate.BlockFlops]:
        from harness.flops import tower_flops

        tower = tower_flops(self.ctx.backbone)
        share = np.asarray(tower["blocks"], dtype=np.float64) / sum(tower["blocks"])
        return float(tower["total"]), share, evaluate.BlockFlops(self.ctx.backbone, tower["embed"], tower["head"])

    def fit(self, method: str, seed: int, **config: Any) -> ExitPolicy:
        """``method`` with ``config`` overrides, fitted on the splits of ``seed`` (cached on disk)."""
        from harness.run import fit_policy

        return fit_policy(self.ctx.with_seed(seed), method, seed, **config)

    def outcome(self, policy: ExitPolicy) -> ExitOutcome:
        return replay(policy, self.test, self.num_blocks, self.ctx.num_tokens - 1)

    def score(self, policy: ExitPolicy, seed: int, outcome: ExitOutcome | None = None) -> dict[str, Any]:
        """:func:`harness.run.score` of ``policy`` on the test trace (its outcome is replayed if not given)."""
        from harness.run import score

        outcome = outcome or self.outcome(policy)
        full_flops, share, block_flops = self._flops
        heads = {layer: policy.head_flops(layer) for layer in policy.exit_layers()}
        flops = evaluate.flops_per_sample(outcome.tokens, block_flops, outcome.exit_layer, heads,
                                          policy.exit_layers(), outcome.by_policy)
        metrics = score(outcome, self.labels, self.baseline_correct, flops, full_flops, share, self.num_blocks, seed)
        metrics["correct"] = outcome.predictions == self.labels
        metrics["exit_layer"] = outcome.exit_layer
        return metrics

    def baseline_top1(self, quant: str | None = None) -> float:
        """Full-depth top-1 (%) on the test split under ``quant`` (default: the run's quantizer)."""
        trace = self.test if quant is None else self.ctx.trace(quant, "test")
        return float(100 * np.mean(np.asarray(trace.logits).argmax(1) == self.labels))
