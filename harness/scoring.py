"""What one outcome is worth: FLOPs per sample and the test metrics of a policy's outcome.

Pure functions of per-sample arrays, shared by every table; the
:class:`~harness.session.Session` decides which driver produced the outcome.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from harness import evaluate
from harness.drivers import ExitOutcome
from harness.policy import ExitPolicy, FitContext


class FullDepth(ExitPolicy):
    """No exits: the full-depth model run through the same driver (the latency reference)."""

    name = "full-depth"

    def fit(self, ctx: FitContext) -> None:
        pass


def drops_nothing(policy: ExitPolicy) -> bool:
    """A token policy at keep ratio 1.0 that exits nobody: its outcome is full depth's, no driver needed
    (tests check that the real driver reproduces it exactly)."""
    return (policy.prunes_tokens and not policy.exit_layers() and policy.knob is not None
            and getattr(policy.config, policy.knob, None) == 1.0)


def outcome_flops(policy: ExitPolicy, outcome: ExitOutcome, block_flops: evaluate.BlockFlops,
                  num_blocks: int) -> np.ndarray:
    """FLOPs per sample of ``outcome``: blocks at their token counts, plus the policy's heads/decisions.

    An exit policy pays its heads at its exit layers; a token policy also pays
    :meth:`ExitPolicy.head_flops` at every block where it reports a cost.
    """
    layers = set(policy.exit_layers()) | (set(range(1, num_blocks + 1)) if policy.prunes_tokens else set())
    head_flops = {layer: policy.head_flops(layer) for layer in sorted(layers)}
    return evaluate.flops_per_sample(outcome.tokens, block_flops, outcome.exit_layer, head_flops,
                                     sorted(layers), outcome.by_policy)


def score(outcome: ExitOutcome, labels: np.ndarray, baseline_correct: np.ndarray, flops: np.ndarray,
          full_flops: float, block_share: np.ndarray, num_blocks: int, seed: int,
          intervals: bool = True) -> dict[str, Any]:
    """The metrics of one outcome on the test split (JSON-safe).

    ``intervals=False`` leaves out the bootstrap CIs (``None``), the costly
    part, for outcomes whose CIs nobody reports (points on a sweep).
    """
    correct = outcome.predictions == labels
    q = evaluate.quadrants(correct, baseline_correct)
    top1_ci = flops_ci = None
    if intervals:
        top1_ci = [100 * bound for bound in evaluate.bootstrap_ci(correct, seed=seed)]
        flops_ci = [100 * bound for bound in evaluate.bootstrap_ci(1 - flops / full_flops, seed=seed)]
    return {
        "top1": float(100 * correct.mean()), "top1_ci": top1_ci,
        "top5": float(100 * (outcome.top5 == labels[:, None]).any(axis=1).mean()),
        "flops_per_sample": float(flops.mean()),
        "flops_saving": float(100 * (1 - flops.mean() / full_flops)),
        "flops_saving_ci": flops_ci,
        "flops_saving_paper_formula": 100 * evaluate.paper_flops_saving(outcome.exit_layer, block_share),
        "exit_distribution": evaluate.exit_distribution(outcome.exit_layer, num_blocks),
        "quadrants": {**dataclasses.asdict(q), "net_rescue": q.net_rescue},
    }


@dataclasses.dataclass
class Evaluation:
    """One fitted policy on the test split: what it did per sample, and its metrics."""

    outcome: ExitOutcome
    flops: np.ndarray  # per sample
    correct: np.ndarray  # per sample
    metrics: dict[str, Any]  # :func:`score`
