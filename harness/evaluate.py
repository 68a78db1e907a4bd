"""The evaluator: accuracy with confidence intervals, FLOPs, exits, and the paired rescue analysis.

Everything here works on per-sample arrays (labels, predictions, exit
layers, tokens per block), so it serves both drivers and any method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from harness.trace import Trace


TOP_K = 5  # top-5 accuracy


def top1(trace: Trace) -> float:
    """Full-depth zero-shot top-1 (%) of a trace."""
    if len(trace) == 0:
        raise ValueError("empty trace: no images were traced")
    return float(100 * np.mean(classify(trace.logits)[0] == np.asarray(trace.labels)))


def top_classes(logits: np.ndarray, k: int) -> np.ndarray:
    """int [N, min(k, C)]: the classes of the k highest scores of each row, in no particular order."""
    k = min(k, logits.shape[1])
    return np.argpartition(-logits, k - 1, axis=1)[:, :k] if k else np.zeros((len(logits), 0), np.int64)


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """bool [N]: is the label among the k highest scores?"""
    return (top_classes(logits, k) == labels[:, None]).any(axis=1)


def classify(logits: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(predictions int [N], the :data:`TOP_K` best classes int [N, k]) of scores [N, C], read ``chunk`` rows
    at a time (``logits`` may be a memory map): what an outcome keeps instead of its [N, C] scores."""
    n, classes = logits.shape
    predictions = np.zeros(n, np.int64)
    top = np.zeros((n, min(TOP_K, classes)), np.int64)
    for start in range(0, n, chunk):
        block = np.asarray(logits[start:start + chunk], dtype=np.float32)
        predictions[start:start + chunk] = block.argmax(axis=1)
        top[start:start + chunk] = top_classes(block, TOP_K)
    return predictions, top


_BOOTSTRAP_CHUNK = 1 << 20


def bootstrap_ci(values: np.ndarray, seed: int = 0, resamples: int = 2000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (seeded, so reproducible)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    # resamples drawn a chunk at a time, about _BOOTSTRAP_CHUNK indices each, so that memory does not grow
    # with the sample count; the draws (and so the CI) are the same for any chunk size
    chunk = max(1, _BOOTSTRAP_CHUNK // len(values))
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, len(values), size=(stop - start, len(values)))
        means[start:stop] = values[idx].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


@dataclass
class Quadrants:
    """Paired outcome of an exit method against the full-depth model of the same quantizer."""

    both_correct: int
    rescued: int  # right with the exit method, wrong at full depth
    lost: int  # wrong with the exit method, right at full depth
    both_wrong: int
    mcnemar_p: float  # exact two-sided McNemar test on the discordant pairs

    @property
    def net_rescue(self) -> int:
        return self.rescued - self.lost


def quadrants(method_correct: np.ndarray, baseline_correct: np.ndarray) -> Quadrants:
    """Four-quadrant decomposition and McNemar's exact test."""
    from scipy.stats import binomtest

    m, b = np.asarray(method_correct, bool), np.asarray(baseline_correct, bool)
    rescued, lost = int(np.sum(m & ~b)), int(np.sum(~m & b))
    p = binomtest(rescued, rescued + lost, 0.5).pvalue if rescued + lost else 1.0
    return Quadrants(int(np.sum(m & b)), rescued, lost, int(np.sum(~m & ~b)), float(p))


def flops_per_sample(tokens: np.ndarray, block_flops: "BlockFlops", exit_layer: np.ndarray,
                     head_flops: dict[int, float], exit_layers: list[int], by_policy: np.ndarray) -> np.ndarray:
    """FLOPs each sample cost: embedding, the blocks it ran (at its token counts),
    the policy heads evaluated on the way (every exit layer it reached), and the
    backbone's own head for samples the policy did not classify."""
    num_blocks = tokens.shape[1]
    total = np.full(len(tokens), float(block_flops.embed))
    for block in range(num_blocks):
        for count in np.unique(tokens[:, block]):  # a handful of token counts per block, not one call per sample
            if count > 0:
                total[tokens[:, block] == count] += block_flops(block, int(count))
    for layer in exit_layers:
        total[exit_layer >= layer] += head_flops.get(layer, 0.0)
    total[~by_policy] += block_flops.head
    return total


class BlockFlops:
    """Per-sample FLOPs of each block at a given token count, counted once and memoised."""

    def __init__(self, backbone, embed: float, head: float):
        self._backbone = backbone
        self.embed, self.head = embed, head
        self._memo: dict[tuple[int, int], float] = {}

    def __call__(self, block: int, patches: int) -> float:
        from harness.flops import block_flops

        key = (block, patches)
        if key not in self._memo:
            self._memo[key] = float(block_flops(self._backbone, patches + self._backbone.num_prefix_tokens, block))
        return self._memo[key]


def paper_flops_saving(exit_layer: np.ndarray, block_share: np.ndarray) -> float:
    """The paper's formula: 1 - E[compute share of the blocks run], block costs only."""
    cumulative = np.concatenate([[0.0], np.cumsum(block_share)])
    return float(1 - cumulative[exit_layer].mean())


def exit_distribution(exit_layer: np.ndarray, num_blocks: int) -> dict[int, float]:
    """Share (%) of samples leaving after each block (``num_blocks`` = full depth); zeros omitted."""
    counts = np.bincount(exit_layer, minlength=num_blocks + 1)
    return {layer: float(100 * c / len(exit_layer)) for layer, c in enumerate(counts) if c}


def pareto_front(points: list[dict[str, Any]], accuracy: str = "top1") -> list[dict[str, Any]]:
    """The points (each with ``flops_saving`` and an ``accuracy`` entry) no other point beats on both,
    by increasing saving."""
    ordered = sorted(points, key=lambda p: (-p["flops_saving"], -p[accuracy]))
    front, best = [], -np.inf
    for p in ordered:
        if p[accuracy] > best:
            front.append(p)
            best = p[accuracy]
    return sorted(front, key=lambda p: p["flops_saving"])
