"""Where methods are fitted and scored: one config's test trace, full-depth baselines and FLOPs.

:class:`TestBed` is the one code path behind ``run``, ``check`` and every
experiment, and :meth:`TestBed.uses_real_driver` the one place that decides
how a policy is scored. Exit policies under a batch-invariant quantizer are
scored by replaying the traces, which is exactly what a deployment gets
(tested). Token policies (whose later features depend on the tokens they
drop), and every policy under a batch-dependent quantizer (where a sample's
features depend on who else is still in its batch), run the images through
the real driver, on ``gate`` and on ``test`` alike, so one table never mixes
drivers. Real-driver outcomes are kept in the cache per fitted state
(:func:`stored_real_outcome`), so a seed-independent fit is evaluated once
for all seeds and a warm run replays every real-driver pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np
import torch

from harness import evaluate
from harness.cache import cached_state, code_fields, fit_fields, trace_fields
from harness.config import HarnessConfig
from harness.context import Context
from harness.drivers import ExitOutcome, replay, run_early_exit
from harness.policy import Decision, ExitPolicy, FitContext, LayerView, create_method


class FullDepth(ExitPolicy):
    """No exits: the full-depth model run through the same driver (the latency reference)."""

    name = "full-depth"

    def fit(self, ctx: FitContext) -> None:
        pass

    def exit_layers(self) -> list[int]:
        return []

    def decide(self, layer: int, view: LayerView) -> Decision:  # never called: no exit layers
        raise AssertionError("FullDepth has no exit layers")


def _policy_key(policy: ExitPolicy, fit_ctx: FitContext) -> dict[str, Any]:
    """Cache key fields of a fitted policy: its config, the code of its class hierarchy (outside plugins and
    the shared bases they build on) and of the harness, the FLOPs, the data it fits on, the seed."""
    # the fp32 twin of the heads split is fixed by the heads trace's key, so it needs no entry here
    return {"policy": policy.describe(), "block_flops": fit_ctx.block_flops,
            **fit_fields((fit_ctx.heads, fit_ctx.gate), fit_ctx.seed, [cls.__module__ for cls in type(policy).__mro__])}


def fit_policy(ctx: Context, name: str, seed: int, **config: Any) -> ExitPolicy:
    """A fitted ``name`` (with ``config`` overrides) for ``seed``, from the cache when an identical fit exists.

    Raises:
        TypeError: the policy's state holds something other than tensors and plain values.
    """
    return fit_instance(ctx, create_method(name, **config), seed)


def fit_instance(ctx: Context, policy: ExitPolicy, seed: int) -> ExitPolicy:
    """``policy`` (a method or a control) fitted for ``seed``, from the cache when an identical fit exists."""
    fit_ctx = ctx.fit_context(seed=seed)
    fitted: list[bool] = []  # set by a fresh fit, which needs no reload from its own state

    def fit() -> dict[str, Any]:
        policy.fit(fit_ctx)
        fitted.append(True)
        return policy.state_dict()

    state = cached_state(ctx.cache_dir, "policies", _policy_key(policy, fit_ctx), fit, f"{policy.kind} {policy.name!r}")
    if not fitted:
        policy.load_state_dict(state)
    return policy


def fit_digest(policy: ExitPolicy) -> str:
    """Identity of a fitted policy: its description and every value of its state."""
    digest = hashlib.sha256(json.dumps(policy.describe(), sort_keys=True, default=str).encode())

    def update(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(str(key).encode())
                update(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                update(item)
        else:
            digest.update(repr(value).encode())

    state = policy.state_dict()
    update({k: v for k, v in state.items() if k != "report"})  # diagnostics (timings) are not the fit
    return digest.hexdigest()


def real_outcome(ctx: Context, policy: ExitPolicy, trace, desc: str | None = None, split: str = "test") -> ExitOutcome:
    """``policy`` on the whole ``split`` (``trace``'s) under the real driver, in batches of the run's batch size.

    The batches are the trace's (split order, bad images skipped alike), so
    the rows line up with ``trace`` and, for a batch-dependent quantizer, a
    policy that drops nothing reproduces the traced full-depth logits exactly.
    ``desc`` labels a progress bar (None: none).
    """
    from tqdm import tqdm

    from harness.datasets import ImageBatches

    backbone, _ = ctx.quantized()
    batches = ImageBatches(ctx.dataset, ctx.splits[split], backbone.preprocess, ctx.config.batch_size,
                           on_bad_image=ctx.config.on_bad_image)
    parts, indices = [], []
    for images, _, batch_indices in tqdm(batches, desc=desc, unit="batch", leave=False,
                                         disable=desc is None or not ctx.progress):
        parts.append(run_early_exit(policy, backbone, images, ctx.classifier))
        indices.append(batch_indices)
    if not np.array_equal(np.concatenate(indices) if indices else np.zeros(0, np.int64), np.asarray(trace.indices)):
        raise RuntimeError(f"the real driver's {split} images do not match the {split} trace's rows")
    return ExitOutcome(*(np.concatenate([getattr(p, f.name) for p in parts])
                         for f in dataclasses.fields(ExitOutcome)))


def stored_real_outcome(ctx: Context, policy: ExitPolicy, trace, desc: str | None = None,
                        split: str = "test") -> ExitOutcome:
    """:func:`real_outcome`, kept in the cache: a warm run, another seed of a seed-independent fit, or a
    sweep point seen before replays it instead of running the backbone again.

    The key is the fitted state (:func:`fit_digest`), the trace's key and rows (backbone, weights,
    quantizer, data), the batch size and the code of the policy's class hierarchy and the real driver.
    """
    fields = {"fit": fit_digest(policy), "trace": trace_fields(trace), "batch_size": ctx.config.batch_size,
              "code": code_fields([*(cls.__module__ for cls in type(policy).__mro__), "harness.drivers",
                                   "harness.testbed"])}

    def run() -> dict[str, torch.Tensor]:
        outcome = real_outcome(ctx, policy, trace, desc=desc, split=split)
        return {f.name: torch.from_numpy(np.ascontiguousarray(getattr(outcome, f.name)))
                for f in dataclasses.fields(ExitOutcome)}

    state = cached_state(ctx.cache_dir, "outcomes", fields, run, f"method {policy.name!r}")
    return ExitOutcome(**{name: value.numpy() for name, value in state.items()})


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
          full_flops: float, block_share: np.ndarray, num_blocks: int, seed: int) -> dict[str, Any]:
    """The metrics of one outcome on the test split (JSON-safe)."""
    correct = outcome.predictions == labels
    q = evaluate.quadrants(correct, baseline_correct)
    low, high = evaluate.bootstrap_ci(correct, seed=seed)
    flops_low, flops_high = evaluate.bootstrap_ci(1 - flops / full_flops, seed=seed)
    return {
        "top1": float(100 * correct.mean()), "top1_ci": [100 * low, 100 * high],
        "top5": float(100 * evaluate.topk_correct(outcome.logits, labels, 5).mean()),
        "flops_per_sample": float(flops.mean()),
        "flops_saving": float(100 * (1 - flops.mean() / full_flops)),
        "flops_saving_ci": [100 * flops_low, 100 * flops_high],
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


class TestBed:
    """Fits methods (cached on disk) and scores them on the ``test`` split of one config."""

    __test__ = False  # not a pytest class

    def __init__(self, config: HarnessConfig, progress: bool = True, context: Context | None = None):
        """``context``: an already built :class:`Context` of ``config`` to reuse (its backbone, caches)."""
        from harness.flops import tower_flops

        self.ctx = context if context is not None else Context(config, progress=progress)
        self.ctx.block_flops  # counted once here, shared by the per-seed contexts copied from this one
        self._seeded: dict[int, Context] = {}
        self._controls: dict[tuple[str, int], ExitPolicy] = {}
        self.config = self.ctx.config
        self.test = self.ctx.trace(None, "test")
        self.labels = np.asarray(self.test.labels)
        self.num_blocks = self.ctx.backbone.num_blocks
        self.baseline_correct = np.asarray(self.test.logits).argmax(1) == self.labels
        tower = tower_flops(self.ctx.backbone)
        self.full_flops = float(tower["total"])
        self.block_share = np.asarray(tower["blocks"], dtype=np.float64) / sum(tower["blocks"])
        self.block_flops = evaluate.BlockFlops(self.ctx.backbone, tower["embed"], tower["head"])
        self.full = self.full_outcome(self.test)
        self.batch_invariant = self.ctx.quantized()[1].batch_invariant

    def derived(self, **changes: Any) -> "TestBed":
        """A test bed for this config with another ``quant`` or ``limit`` (:meth:`Context.derived`: the
        backbone is not loaded again)."""
        return TestBed(self.config, self.ctx.progress, context=self.ctx.derived(**changes))

    def seeded(self, seed: int) -> Context:
        """The context with the ``heads`` and ``gate`` splits of ``seed`` (one per seed, kept)."""
        if seed not in self._seeded:
            self._seeded[seed] = self.ctx.with_seed(seed)
        return self._seeded[seed]

    def fit(self, method: str, seed: int, **config: Any) -> ExitPolicy:
        """``method`` with ``config`` overrides, fitted on the splits of ``seed`` (cached on disk)."""
        return fit_policy(self.seeded(seed), method, seed, **config)

    def fit_control(self, name: str, seed: int) -> ExitPolicy:
        """The control ``name`` (:mod:`harness.controls`), fitted on the splits of ``seed`` (cached on disk,
        and kept here: the protocol and the default row of a run ask for the same fit)."""
        from harness.controls import create_control

        if (name, seed) not in self._controls:
            self._controls[name, seed] = fit_instance(self.seeded(seed), create_control(name), seed)
        return self._controls[name, seed]

    def uses_real_driver(self, policy: ExitPolicy) -> bool:
        """Whether ``policy`` is scored by the real driver instead of replaying the traces.

        A token policy needs it (replay cannot know the features after a drop);
        so does any policy under a batch-dependent quantizer, where replay would
        score features computed in batches a deployment never runs.
        """
        return policy.prunes_tokens or not self.batch_invariant

    def outcome(self, policy: ExitPolicy, desc: str | None = None, split: str = "test",
                seed: int | None = None) -> ExitOutcome:
        """What ``policy`` does on every sample of ``split``, by the driver :meth:`uses_real_driver` names.

        ``split`` is ``test`` (the same for every seed) or ``gate`` of ``seed``.
        ``desc`` labels the real driver's progress bar.
        """
        ctx = self.ctx if split == "test" else self.seeded(seed)
        trace = self.test if split == "test" else ctx.trace(None, split)
        if not self.uses_real_driver(policy):
            return replay(policy, trace, self.num_blocks, self.ctx.num_tokens - 1)
        if drops_nothing(policy) or not (policy.prunes_tokens or policy.exit_layers()):
            return self.full_outcome(trace)  # what the real driver gives on the trace's own batches (tested)
        return stored_real_outcome(ctx, policy, trace, desc, split)

    def full_outcome(self, trace) -> ExitOutcome:
        """Every sample of ``trace`` through every block with all its tokens, classified by the backbone."""
        n = len(trace)
        return ExitOutcome(np.full(n, self.num_blocks), np.asarray(trace.logits),
                           np.full((n, self.num_blocks), self.ctx.num_tokens - 1), np.zeros(n, bool))

    def gate_point(self, policy: ExitPolicy, seed: int, desc: str | None = None) -> dict[str, float]:
        """``policy``'s top-1 and FLOPs saving (%) on the ``gate`` split of ``seed``: what operating points
        are chosen on (never ``test``)."""
        outcome = self.outcome(policy, desc, split="gate", seed=seed)
        labels = np.asarray(self.seeded(seed).trace(None, "gate").labels)
        flops = outcome_flops(policy, outcome, self.block_flops, self.num_blocks)
        return {"top1": float(100 * np.mean(outcome.predictions == labels)),
                "flops_saving": float(100 * (1 - flops.mean() / self.full_flops))}

    def evaluate(self, policy: ExitPolicy, seed: int, outcome: ExitOutcome | None = None,
                 desc: str | None = None) -> Evaluation:
        """``policy``'s outcome (:meth:`outcome` unless given), FLOPs and metrics; ``seed`` seeds the CIs."""
        outcome = outcome if outcome is not None else self.outcome(policy, desc)
        flops = outcome_flops(policy, outcome, self.block_flops, self.num_blocks)
        metrics = score(outcome, self.labels, self.baseline_correct, flops, self.full_flops, self.block_share,
                        self.num_blocks, seed)
        return Evaluation(outcome, flops, outcome.predictions == self.labels, metrics)

    def sweep(self, policy: ExitPolicy, seed: int) -> list[dict[str, Any]]:
        """``policy``'s accuracy/FLOPs curve: one point per value of its :attr:`~ExitPolicy.knob_grid`.

        Each point has the knob ``value``, ``top1``, ``flops_saving`` and its
        ``source``. No refit (:meth:`ExitPolicy.with_knob`).
        """
        points = []
        for value in policy.knob_grid:
            variant = policy.with_knob(value)
            outcome = self.outcome(variant, desc=f"{policy.name} {policy.knob}={value:g}")
            if drops_nothing(variant):
                source = "full depth (keep 1.0 drops nothing)"
            else:
                source = "real driver" if self.uses_real_driver(policy) else "replay"
            metrics = self.evaluate(variant, seed, outcome).metrics
            points.append({"value": value, "top1": metrics["top1"], "flops_saving": metrics["flops_saving"],
                           "source": source})
        return points

    def score(self, policy: ExitPolicy, seed: int) -> dict[str, Any]:
        """The metrics of :meth:`evaluate`."""
        return self.evaluate(policy, seed).metrics

    def baseline_top1(self, quant: str | None = None) -> float:
        """Full-depth top-1 (%) on the test split under ``quant`` (default: the run's quantizer)."""
        trace = self.test if quant is None else self.ctx.trace(quant, "test")
        return float(100 * np.mean(np.asarray(trace.logits).argmax(1) == self.labels))
