"""One config's session: everything a command builds, fits and scores, built lazily and built once.

A :class:`Session` holds the backbone, its quantized copies, the dataset and
its splits, the zero-shot classifier and the traces (cached on disk); it
fits methods and controls (cached on disk, and kept in memory for the
session) and scores them on the ``test`` split. ``run``, ``check``,
``profile``, ``bench`` and every experiment use it, so there is one
evaluation path.

:meth:`Session.uses_real_driver` is the one place that decides how a
policy is scored, from what the policy declares
(:attr:`~harness.policy.ExitPolicy.prunes_tokens`) and what the quantizer
declares (``batch_invariant``). Exit policies under a batch-invariant
quantizer are scored by replaying the traces, which is exactly what a
deployment gets (tested). Token policies (whose later features depend on the
tokens they drop), and every policy under a batch-dependent quantizer (where
a sample's features depend on who else is still in its batch), run the
images through the real driver, on ``gate`` and on ``test`` alike, so one
table never mixes drivers. Real-driver outcomes are kept in the cache per
fitted state (:meth:`Session.stored_real_outcomes`), so a seed-independent fit
is evaluated once for all seeds and a warm run replays every real-driver pass.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import sys
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from harness import evaluate, fitting
from harness.backbones import Backbone, backbone_config, create_backbone
from harness.cache import cached_state, cached_states, code_fields, trace_fields
from harness.config import HarnessConfig
from harness.datasets import Dataset, ImageBatches, Split, create_dataset
from harness.drivers import ExitOutcome, replay, run_early_exits
from harness.errors import ConfigError, DataError
from harness.heads import Classifier
from harness.policy import ExitPolicy, FitContext, create_method
from harness.prompts import prompt_templates
from harness.quantizers import Quantizer, block_targets, create_quantizer
from harness.scoring import Evaluation, drops_nothing, outcome_flops, score
from harness.trace import Trace, trace_splits


# cached properties that every derived session shares (the same for any seed, quantizer and limit)
_SHARED = ("backbone", "dataset", "templates", "classifier", "tower")
# cached properties that belong to one quantizer and one draw of the test split
_SCORING = ("test", "labels", "baseline_correct", "full", "batch_invariant")


def _check_device(device: str) -> None:
    """Raise ConfigError for a device torch does not know or cannot use here."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"--device {device}: not a torch device; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: torch sees no CUDA GPU on this machine; use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: the harness runs on cpu or cuda only")


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


def run_traces(methods: list[str]) -> list[tuple[str | None, str]]:
    """What ``run`` of ``methods`` traces, each (quant, split) (None: the config's quantizer): the quantized
    splits the fits and scores read, fp32 test (the full-depth fp32 row), and fp32 heads when a method
    declares it reads them (:attr:`~harness.policy.ExitPolicy.reads_heads_fp32`)."""
    from harness.policy import METHODS

    teacher = any(getattr(METHODS.get(name), "reads_heads_fp32", False) for name in methods)
    return [(None, "heads"), (None, "gate"), (None, "test"), ("fp32", "test"), *([("fp32", "heads")] * teacher)]


class Session:
    """Lazily built, cached objects of one :class:`HarnessConfig`, and the one way to fit and score policies.

    Example:
        >>> session = Session(HarnessConfig(limit=64))  # doctest: +SKIP
        >>> session.evaluate(session.fit("pabee", seed=0), seed=0).metrics["top1"]  # doctest: +SKIP
    """

    def __init__(self, config: HarnessConfig, progress: bool = True):
        self.config = config.resolved()
        _check_device(self.config.device)
        self.progress = progress
        self._backbones: dict[str, tuple[Backbone, Quantizer]] = {}
        self._traces: dict[tuple[str, str, bytes], Trace] = {}  # memory-mapped, per part (or --limit rows)
        self._selections: dict[tuple[str, str, bytes], Trace] = {}  # a split's rows, memory-mapped too
        self._seeded: dict[int, Session] = {}
        self._fits: dict[tuple[str, str, int, str], ExitPolicy] = {}
        if self.config.threads:
            torch.set_num_threads(self.config.threads)

    # -- what the config names: backbone, data, classifier, traces ------------------------------------
    @property
    def cache_dir(self) -> Path:
        return Path(self.config.cache_dir)

    @cached_property
    def backbone(self) -> Backbone:
        """The full-precision backbone."""
        c = self.config
        return create_backbone(c.model, c.pretrained, device=c.device, seed=c.seed)

    @cached_property
    def dataset(self) -> Dataset:
        return create_dataset(self.config.data, self.config.data_root, on_bad_image=self.config.on_bad_image,
                              **self.config.dataset_options())

    @cached_property
    def splits(self) -> dict[str, Split]:
        return self.dataset.splits(self.config.seed, limit=self.config.limit)

    @cached_property
    def templates(self) -> tuple[str, ...]:
        """The prompt templates of the zero-shot classifier (``--templates``, default the dataset's)."""
        return prompt_templates(self.config.templates, self.dataset.templates)

    @cached_property
    def classifier(self) -> Classifier:
        """How the full-depth model scores an embedding: CLIP's zero-shot classifier over the dataset's class
        names, or a timm classifier's own linear head (its own classes)."""
        head = getattr(self.backbone.tower, "classifier", None)
        if head is not None:
            if head.out_features != len(self.dataset.classnames):
                print(f"note: {self.backbone.name} classifies into its own {head.out_features} classes, "
                      f"{self.dataset.name} has {len(self.dataset.classnames)}: accuracy compares class indices, "
                      "meaningful only where the label sets match (ImageNet-1k)", file=sys.stderr)
            return Classifier(head.weight, bias=head.bias)  # on the backbone's device, as the head is
        weights = self.backbone.zero_shot_classifier(
            self.dataset.classnames, self.templates, self.config.text_precision, self.cache_dir
        )
        return Classifier(weights, self.backbone.logit_scale)

    @property
    def num_blocks(self) -> int:
        return self.backbone.num_blocks

    @property
    def num_patches(self) -> int:
        """Patch tokens per image entering block 1 (class and register tokens not counted)."""
        return self.backbone.num_patches

    @cached_property
    def tower(self) -> dict[str, Any]:
        """FLOPs of one image through the full-depth tower: ``embed``, ``blocks`` (a list), ``head``, ``total``."""
        from harness.flops import tower_flops

        return tower_flops(self.backbone)

    @property
    def block_flops(self) -> list[float]:
        """FLOPs of each block for one image with all its tokens."""
        return [float(flops) for flops in self.tower["blocks"]]

    @property
    def full_flops(self) -> float:
        return float(self.tower["total"])

    @property
    def block_share(self) -> np.ndarray:
        """Each block's share of the blocks' FLOPs (the paper's saving formula)."""
        blocks = np.asarray(self.tower["blocks"], dtype=np.float64)
        return blocks / blocks.sum()

    @cached_property
    def token_flops(self) -> evaluate.BlockFlops:
        """FLOPs of a block at any token count (token policies), with the tower's embed and head."""
        return evaluate.BlockFlops(self.backbone, self.tower["embed"], self.tower["head"])

    def quantized(self, quant: str | None = None) -> tuple[Backbone, Quantizer]:
        """The backbone with its vision tower quantized by ``quant`` (default: the config's)."""
        quant = quant or self.config.quant
        if quant not in self._backbones:
            quantizer = create_quantizer(quant)
            quantizer.check_device(self.config.device)
            if quantizer.calibration_split is not None:
                quantizer.calibrate(self.backbone.visual, self._calibration_images(quantizer))
            visual = quantizer.quantize(self.backbone.visual)
            self._backbones[quant] = (self.backbone.with_visual(visual, quant), quantizer)
        return self._backbones[quant]

    def _calibration_images(self, quantizer: Quantizer) -> torch.Tensor:
        """Up to ``quantizer.calibration_images`` preprocessed images of its split, evenly spaced, in split order.

        Evenly spaced rather than the first ones: a part stored class by class
        (an image folder) would otherwise calibrate on a few classes only.
        """
        split = self.splits[quantizer.calibration_split]
        count = min(quantizer.calibration_images, len(split))
        chosen = Split(split.part, split.indices[np.linspace(0, len(split) - 1, count).round().astype(np.int64)])
        return torch.cat([images for images, _, _ in self.image_batches(chosen)] or [torch.empty(0)])

    def image_batches(self, split: Split | str, batch_size: int | None = None,
                      backbone: Backbone | None = None) -> ImageBatches:
        """(images, labels, dataset indices) of ``split`` (a name or a :class:`Split`), preprocessed for
        ``backbone`` (default: the full-precision one), in batches of ``batch_size`` (default: the run's);
        unreadable images are handled by ``--on-bad-image``."""
        split = self.splits[split] if isinstance(split, str) else split
        return ImageBatches(self.dataset, split, (backbone or self.backbone).preprocess,
                            batch_size or self.config.batch_size, on_bad_image=self.config.on_bad_image,
                            workers=self.config.workers, pin_memory=self.config.device.startswith("cuda"),
                            idle_workers=self.config.device == "cpu")

    def test_images(self, count: int) -> tuple[torch.Tensor, np.ndarray]:
        """The readable ones among the first ``count`` test images, preprocessed, and their dataset indices
        (read like every other pass, so ``--on-bad-image`` applies)."""
        split = self.splits["test"]
        batches = list(self.image_batches(Split(split.part, split.indices[:count])))
        if not batches:
            raise DataError(f"none of the first {count} test images can be read (see --on-bad-image)")
        return torch.cat([images for images, _, _ in batches]), np.concatenate([i for _, _, i in batches])

    def trace(self, quant: str | None, split: str) -> Trace:
        """The cached trace of ``split`` under ``quant``.

        Without ``--limit`` the whole part behind the split is traced once and
        the split's rows are selected from it, so splits re-drawn for another
        seed cost no new backbone pass. The selection is a cache entry of its
        own (:meth:`Trace.select`), opened once per session: fits, gate sweeps
        and scoring ask for the same splits hundreds of times in one run.
        """
        quant = quant or self.config.quant
        rows = self.splits[split].indices
        selected = (quant, self.splits[split].part, rows.tobytes())
        if selected not in self._selections:
            self._selections[selected] = self._part_trace(quant, split).select(rows, self.cache_dir)
        return self._selections[selected]

    def traced_rows(self, split: str) -> Split:
        """What is traced for ``split``: the whole part when the splits drawn from it cover at least half
        of it (so another seed's splits cost no new backbone pass), else (``--limit``, or heads and gate
        drawn from a large train folder) the split's own rows."""
        part_split = self.splits[split]
        size = self.dataset.parts()[part_split.part]
        drawn = sum(len(s) for s in self.splits.values() if s.part == part_split.part)
        if self.config.limit is None and 2 * drawn >= size:
            return Split(part_split.part, np.arange(size))
        return part_split

    def _part_trace(self, quant: str, split: str) -> Trace:
        """The trace behind ``split`` (:meth:`traced_rows`)."""
        self.prepare_traces([(quant, split)])
        rows = self.traced_rows(split)
        return self._traces[(quant, rows.part, rows.indices.tobytes())]

    def trace_groups(self, requests: Iterable[tuple[str | None, str]]) -> list[tuple[Split, list[str]]]:
        """The (quant, split) ``requests`` (None: the config's quantizer) as passes over images: each traced
        part (:meth:`traced_rows`) with the quantizers that trace it, in order of first request."""
        groups: dict[tuple[str, bytes], tuple[Split, list[str]]] = {}
        for quant, split in requests:
            rows = self.traced_rows(split)
            _, quants = groups.setdefault((rows.part, rows.indices.tobytes()), (rows, []))
            if (quant or self.config.quant) not in quants:
                quants.append(quant or self.config.quant)
        return list(groups.values())

    def prepare_traces(self, requests: Iterable[tuple[str | None, str]]) -> None:
        """Trace whatever of the (quant, split) ``requests`` is not traced yet, in one pass over each part's
        images for all the quantizers that trace it, so images are decoded and preprocessed once
        (:func:`harness.trace.trace_splits`); a run asks for all of its traces up front."""
        for rows, quants in self.trace_groups(requests):
            keys = {quant: (quant, rows.part, rows.indices.tobytes()) for quant in quants}
            todo = [quant for quant, key in keys.items() if key not in self._traces]
            if not todo:
                continue
            quantized = [self.quantized(quant) for quant in todo]
            batches = self.image_batches(rows, backbone=quantized[0][0])
            traces = trace_splits(quantized, batches, self.classifier, self.cache_dir, self.progress)
            self._traces.update({keys[quant]: trace for quant, trace in zip(todo, traces)})

    def zero_shot_top1(self, quant: str | None = None, split: str = "test") -> float:
        """Full-depth zero-shot top-1 (%) of ``split`` under ``quant`` (default: the config's)."""
        return evaluate.top1(self.trace(quant, split))

    def describe(self, quant: str | None = None) -> dict[str, Any]:
        """Resolved config, backbone identity, quantizer parameters and data fingerprints, for results."""
        _, quantizer = self.quantized(quant)
        return {
            "config": dataclasses.asdict(self.config),
            "backbone": backbone_config(self.backbone),
            "quantizer": {**quantizer.config(),
                          "targets_in_each_block": block_targets(quantizer, self.backbone.visual)},
            "dataset": {"name": self.dataset.name, "protocol": self.dataset.protocol,
                        "split_sizes": {name: len(split) for name, split in self.splits.items()},
                        "templates": {"name": self.config.templates or "dataset", "count": len(self.templates)},
                        "classifier": self.classifier.describe(),
                        "fingerprints": {part: self.dataset.fingerprint(part) for part in self.dataset.parts()}},
        }

    # -- other sessions that share this one's backbone ------------------------------------------------
    def derived(self, **changes: Any) -> "Session":
        """This session with another ``seed``, ``quant`` or ``limit``: the backbone, data and classifier
        are shared, not loaded again.

        A seed or quantizer change shares the quantized towers and traces held
        here too (a calibrated quantizer keeps the calibration of the seed it
        was built for); a limit change draws other splits, so those start
        afresh. A seed change keeps the test split and its scores (``test`` is
        the same for every seed) and the fits; a quantizer or limit change
        does not.
        """
        unknown = set(changes) - {"seed", "quant", "limit"}
        if unknown:
            raise ValueError(f"a derived session changes seed, quant or limit only, not {sorted(unknown)}")
        for shared in _SHARED:
            getattr(self, shared)  # built here first, so that every derived session shares this one's
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, **changes)
        other.__dict__.pop("splits", None)  # cached_property: redrawn on first use
        if other.config.limit != self.config.limit:
            other._backbones, other._traces, other._selections = {}, {}, {}
        if (other.config.quant, other.config.limit) != (self.config.quant, self.config.limit):
            for name in _SCORING:
                other.__dict__.pop(name, None)
            other._seeded, other._fits = {}, {}
        return other

    def seeded(self, seed: int) -> "Session":
        """This session with the ``heads`` and ``gate`` splits of ``seed`` (one per seed, kept)."""
        if seed == self.config.seed:
            return self
        if seed not in self._seeded:
            self._seeded[seed] = self.derived(seed=seed)
        return self._seeded[seed]

    # -- fitting ------------------------------------------------------------------------------------
    def fit_context(self, quant: str | None = None, seed: int | None = None) -> FitContext:
        """What a policy fits on under ``quant`` (:func:`harness.fitting.fit_context`): this session's heads
        and gate traces, never test; ``seed`` seeds the fit (default: the config's)."""
        return fitting.fit_context(self, quant, seed)

    def fit(self, method: str, seed: int, **config: Any) -> ExitPolicy:
        """``method`` with ``config`` overrides, fitted on the splits of ``seed`` (cached on disk:
        :func:`harness.fitting.fit_cached`; and kept here).

        Raises:
            TypeError: the policy's state holds something other than tensors and plain values.
        """
        return self._fitted("method", method, seed, config, lambda: create_method(method, **config))

    def fit_control(self, name: str, seed: int) -> ExitPolicy:
        """The control ``name`` (:mod:`harness.controls`), fitted on the splits of ``seed``."""
        from harness.controls import create_control

        return self._fitted("control", name, seed, {}, lambda: create_control(name))

    def _fitted(self, kind: str, name: str, seed: int, config: dict[str, Any],
                create: Callable[[], ExitPolicy]) -> ExitPolicy:
        key = (kind, name, seed, json.dumps(config, sort_keys=True, default=str))
        if key not in self._fits:
            self._fits[key] = fitting.fit_cached(self.seeded(seed), create())
        return self._fits[key]

    # -- scoring ------------------------------------------------------------------------------------
    @cached_property
    def test(self) -> Trace:
        """The test split's trace under the config's quantizer (the same for every seed)."""
        return self.trace(None, "test")

    @cached_property
    def labels(self) -> np.ndarray:
        return np.asarray(self.test.labels)

    @cached_property
    def baseline_correct(self) -> np.ndarray:
        """bool per test sample: the zero-shot full-depth model under the config's quantizer is right."""
        return self.full.predictions == self.labels

    @cached_property
    def full(self) -> ExitOutcome:
        """Full depth's outcome on the test split."""
        return self.full_outcome(self.test)

    @cached_property
    def batch_invariant(self) -> bool:
        return self.quantized()[1].batch_invariant

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
        return self.outcomes([policy], desc, split, seed)[0]

    def outcomes(self, policies: list[ExitPolicy], desc: str | None = None, split: str = "test",
                 seed: int | None = None) -> list[ExitOutcome]:
        """:meth:`outcome` of each of ``policies`` (e.g. one method at each value of its knob); those the real
        driver scores share one pass over the images (:meth:`stored_real_outcomes`)."""
        session = self if split == "test" else self.seeded(seed)
        trace = self.test if split == "test" else session.trace(None, split)
        outcomes: dict[int, ExitOutcome] = {}
        real: list[int] = []
        for i, policy in enumerate(policies):
            if not self.uses_real_driver(policy):
                outcomes[i] = replay(policy, trace, self.num_blocks, self.num_patches)
            elif drops_nothing(policy) or not (policy.prunes_tokens or policy.exit_layers()):
                outcomes[i] = self.full_outcome(trace)  # what the real driver gives on the trace's own batches (tested)
            else:
                real.append(i)
        if real:
            stored = session.stored_real_outcomes([policies[i] for i in real], trace, desc, split)
            outcomes.update(zip(real, stored))
        return [outcomes[i] for i in range(len(policies))]

    def real_outcomes(self, policies: list[ExitPolicy], trace: Trace, desc: str | None = None,
                      split: str = "test") -> list[ExitOutcome]:
        """Each of ``policies`` on the whole ``split`` (``trace``'s) under the real driver, in batches of the
        run's batch size, in one pass over the images (:func:`~harness.drivers.run_early_exits`).

        The batches are the trace's (split order, bad images skipped alike), so
        the rows line up with ``trace`` and, for a batch-dependent quantizer, a
        policy that drops nothing reproduces the traced full-depth logits exactly.
        ``desc`` labels a progress bar (None: none).
        """
        from tqdm import tqdm

        backbone, _ = self.quantized()
        parts, indices = [], []
        for images, _, batch_indices in tqdm(self.image_batches(split, backbone=backbone), desc=desc, unit="batch",
                                             leave=False, disable=desc is None or not self.progress):
            parts.append(run_early_exits(policies, backbone, images, self.classifier))
            indices.append(batch_indices)
        if not np.array_equal(np.concatenate(indices) if indices else np.zeros(0, np.int64), np.asarray(trace.indices)):
            raise RuntimeError(f"the real driver's {split} images do not match the {split} trace's rows")
        return [ExitOutcome(*(np.concatenate([getattr(batch[i], f.name) for batch in parts])
                              for f in dataclasses.fields(ExitOutcome)))
                for i in range(len(policies))]

    def stored_real_outcomes(self, policies: list[ExitPolicy], trace: Trace, desc: str | None = None,
                             split: str = "test") -> list[ExitOutcome]:
        """:meth:`real_outcomes`, each kept in the cache: a warm run, another seed of a seed-independent fit,
        or a sweep point seen before replays it instead of running the backbone again; the missing ones
        share one pass.

        Keyed by :meth:`_real_driver_key`, one policy each.
        """
        def run(missing: list[int]) -> list[dict[str, torch.Tensor]]:
            outcomes = self.real_outcomes([policies[i] for i in missing], trace, desc=desc, split=split)
            return [{f.name: torch.from_numpy(np.ascontiguousarray(getattr(outcome, f.name)))
                     for f in dataclasses.fields(ExitOutcome)} for outcome in outcomes]

        keys = [self._real_driver_key({policy.name: policy}, trace) for policy in policies]
        owner = " and ".join(dict.fromkeys(f"method {policy.name!r}" for policy in policies))
        states = cached_states(self.cache_dir, "outcomes", keys, run, owner)
        return [ExitOutcome(**{name: value.numpy() for name, value in state.items()}) for state in states]

    def stored_pass(self, kind: str, policies: dict[str, ExitPolicy], build: Callable[[], dict[str, Any]],
                    fields: dict[str, Any], modules: tuple[str, ...]) -> dict[str, Any]:
        """``build()``: what ``policies`` do under the real driver on test images (``run``'s latency and
        driver-agreement passes), kept in the cache under ``kind`` so that a warm run reads it back.

        Keyed like :meth:`stored_real_outcomes`, plus ``fields`` (the pass's settings; for timings, the
        machine) and the code of ``modules``.
        """
        key = {**self._real_driver_key(policies, self.test, modules), **fields}
        return cached_state(self.cache_dir, kind, key, build, f"the {kind} pass")

    def _real_driver_key(self, policies: dict[str, ExitPolicy], trace: Trace,
                         modules: tuple[str, ...] = ()) -> dict[str, Any]:
        """Cache key fields of real-driver work: each fitted state (:func:`fit_digest`), the trace's key and rows
        (backbone, weights, quantizer, data), the batch size, and the code of the policies' class hierarchies,
        the real driver and ``modules``."""
        classes = [cls.__module__ for policy in policies.values() for cls in type(policy).__mro__]
        return {"fit": {name: fit_digest(policy) for name, policy in policies.items()},
                "trace": trace_fields(trace), "batch_size": self.config.batch_size,
                "code": code_fields([*classes, "harness.drivers", "harness.session", *modules])}

    def full_outcome(self, trace: Trace) -> ExitOutcome:
        """Every sample of ``trace`` through every block with all its tokens, classified by the backbone."""
        n = len(trace)
        return ExitOutcome(np.full(n, self.num_blocks), *evaluate.classify(trace.logits),
                           np.full((n, self.num_blocks), self.num_patches), np.zeros(n, bool))

    def gate_point(self, policy: ExitPolicy, seed: int, desc: str | None = None) -> dict[str, float]:
        """``policy``'s top-1 and FLOPs saving (%) on the ``gate`` split of ``seed``: what operating points
        are chosen on (never ``test``)."""
        return self.gate_points([policy], seed, desc)[0]

    def gate_points(self, policies: list[ExitPolicy], seed: int, desc: str | None = None) -> list[dict[str, float]]:
        """:meth:`gate_point` of each of ``policies`` (one method's knob grid: its real-driver passes are one)."""
        labels = np.asarray(self.seeded(seed).trace(None, "gate").labels)
        points = []
        for policy, outcome in zip(policies, self.outcomes(policies, desc, split="gate", seed=seed)):
            flops = outcome_flops(policy, outcome, self.token_flops, self.num_blocks)
            points.append({"top1": float(100 * np.mean(outcome.predictions == labels)),
                           "flops_saving": float(100 * (1 - flops.mean() / self.full_flops))})
        return points

    def evaluate(self, policy: ExitPolicy, seed: int, outcome: ExitOutcome | None = None,
                 desc: str | None = None, intervals: bool = True) -> Evaluation:
        """``policy``'s outcome (:meth:`outcome` unless given), FLOPs and metrics; ``seed`` seeds the CIs
        (``intervals=False``: none, see :func:`~harness.scoring.score`)."""
        outcome = outcome if outcome is not None else self.outcome(policy, desc)
        flops = outcome_flops(policy, outcome, self.token_flops, self.num_blocks)
        metrics = score(outcome, self.labels, self.baseline_correct, flops, self.full_flops, self.block_share,
                        self.num_blocks, seed, intervals)
        return Evaluation(outcome, flops, outcome.predictions == self.labels, metrics)

    def sweep(self, policy: ExitPolicy, seed: int) -> list[dict[str, Any]]:
        """``policy``'s accuracy/FLOPs curve on ``test``: one point per value of its
        :attr:`~ExitPolicy.knob_grid`, for drawing only (operating points are chosen on ``gate``).

        Each point has the knob ``value``, ``top1``, ``flops_saving`` and its
        ``source``. No refit (:meth:`ExitPolicy.with_knob`).
        """
        variants = [policy.with_knob(value) for value in policy.knob_grid]
        points = []
        for value, variant, outcome in zip(policy.knob_grid, variants,
                                           self.outcomes(variants, desc=f"{policy.name} {policy.knob} sweep")):
            if drops_nothing(variant):
                source = "full depth (keep 1.0 drops nothing)"
            else:
                source = "real driver" if self.uses_real_driver(policy) else "replay"
            metrics = self.evaluate(variant, seed, outcome, intervals=False).metrics
            points.append({"value": value, "top1": metrics["top1"], "flops_saving": metrics["flops_saving"],
                           "source": source})
        return points
