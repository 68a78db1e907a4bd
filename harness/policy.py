"""The ExitPolicy interface: one abstract class for every early-exit method.

A policy looks at the features of a batch after block ``L`` through a
:class:`LayerView` and returns a :class:`Decision`: which samples exit here
and with which logits. The harness runs policies with two drivers: replaying
cached traces (fits and sweeps with no backbone forward), and real early exit
(blocks run one by one; exited samples leave the batch). A policy cannot tell
them apart, which is what makes their results comparable.

Samples still present when the last block has run take the backbone's own
full-depth zero-shot prediction, unless the policy lists the last block among
its exit layers and decides there itself (a recalibration head, say).

Token policies (token pruners) use the same class: they set
``prunes_tokens = True`` and say through :meth:`ExitPolicy.keep_tokens` which
patch tokens survive after a block. They run under the real driver only.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, ClassVar, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from harness._registry import Registry
from harness.errors import ConfigError
from harness.options import check_config

FEATURES = ("cls", "patch_mean", "sav", "patch_tokens", "cls_attention")
# The reference paper's threshold grid (25 points over [0.20, 0.92]); threshold knobs sweep it
THRESHOLD_GRID = tuple(float(t) for t in np.linspace(0.20, 0.92, 25))
# Keep ratios swept by token policies' knobs
KEEP_RATIO_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class LayerView(abc.ABC):
    """Features of the samples still in the batch, after block ``layer``.

    Each feature is computed at most once per view and shared by every policy
    that asks for it. ``cls``, ``patch_mean`` and ``sav`` come back exactly as
    the trace stores them (see :func:`harness.trace.as_stored`), so both
    drivers hand a policy the same numbers.

    Attributes:
        layer: 0 (token embedding) .. num_blocks.
        rows: int64 positions, in the driver's current batch, of the samples in
            this view (a policy that keeps per-sample state indexes it with these).
    """

    def __init__(self, layer: int, rows: np.ndarray):
        self.layer = layer
        self.rows = rows
        self._cache: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _get(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = self._compute(name)
        return self._cache[name]

    @abc.abstractmethod
    def _compute(self, name: str) -> torch.Tensor:
        """Compute one feature of :data:`FEATURES` for the view's samples."""

    def cls(self) -> torch.Tensor:
        """CLS token [B, D]."""
        return self._get("cls")

    def patch_mean(self) -> torch.Tensor:
        """Mean of the patch tokens [B, D] (SSA's input)."""
        return self._get("patch_mean")

    def sav(self) -> torch.Tensor:
        """Spatial-activation variance mean_i ||z_i - mean(z)||^2 over patch tokens [B]."""
        return self._get("sav")

    def patch_tokens(self) -> torch.Tensor:
        """All patch tokens [B, N, D]; only the real driver has them."""
        return self._get("patch_tokens")

    def cls_attention(self) -> torch.Tensor:
        """CLS-to-patch attention [B, N] (mean over heads) of the next block on the current tokens.

        The attention the next block is about to compute (softmax over CLS and
        the patch tokens, the CLS column left out); EViT ranks tokens by it.
        Only the real driver has it, and not after the last block.
        """
        return self._get("cls_attention")


@dataclass
class Decision:
    """What a policy decided for the samples of one :class:`LayerView`.

    Attributes:
        exit: bool [B], True for samples that stop here.
        logits: [B, C] class scores; only the rows of exiting samples are used.
    """

    exit: torch.Tensor
    logits: torch.Tensor

    @classmethod
    def stay(cls, batch: int, num_classes: int) -> "Decision":
        """Nobody exits (for a layer where the policy has nothing to say)."""
        return cls(torch.zeros(batch, dtype=torch.bool), torch.zeros(batch, num_classes))


@runtime_checkable
class SplitFeatures(Protocol):
    """Per-layer features of one split, as policies train on them (a Trace is one).

    ``cls`` and ``patch_mean`` are [N, layers, D] and ``sav`` [N, layers]
    (layer 0 = token embedding); ``embedding`` and ``logits`` are the
    backbone's full-depth outputs; ``labels`` [N].
    """

    cls: np.ndarray
    patch_mean: np.ndarray
    sav: np.ndarray
    embedding: np.ndarray
    logits: np.ndarray
    labels: np.ndarray


@dataclass
class FitContext:
    """Everything a policy may fit on. Never contains the ``test`` split.

    Attributes:
        heads: features of the ``heads`` split under the run's quantizer.
        gate: features of the ``gate`` split under the run's quantizer.
        classifier: the full-depth model's :class:`~harness.heads.Classifier`
            (embedding [B, E] -> class scores [B, C]; CLIP's zero-shot one, or
            a timm classifier's own head).
        num_blocks, width, embed_dim: backbone shape; head sizes scale with it.
        block_flops: FLOPs of each block for one sample (for budgets).
        seed: seeds head init, data order, gate init.
        backbone: the quantized backbone the policy runs on, frozen (for
            policies that train through it, such as a learned token pruner).
        image_batches: ``image_batches(split, batch_size, rows=None)`` yields
            ``(preprocessed images, labels)`` of ``heads`` or ``gate`` in the
            split's order (the rows of :attr:`heads`/:attr:`gate`), or of the
            given rows in the given order (say, an epoch's shuffle): images
            are decoded as they are needed, never all held at once.
        load_heads_fp32: builds :attr:`heads_fp32` on first use (an extra
            backbone pass that only distilling methods pay for).
        store: the harness's on-disk memo behind :meth:`cached` (None: no caching).
    """

    heads: SplitFeatures
    gate: SplitFeatures
    classifier: Any
    num_blocks: int
    width: int
    embed_dim: int
    block_flops: list[float]
    seed: int = 0
    backbone: Any = None
    image_batches: Callable[..., Iterator[tuple[torch.Tensor, torch.Tensor]]] | None = None
    load_heads_fp32: Callable[[], SplitFeatures] | None = None
    store: Callable[[str, Callable[[], dict]], dict] | None = None

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def cached(self, name: str, build: Callable[[], dict]) -> dict:
        """``build()`` (a dict of tensors and plain values), computed once per ``name``, fit data and seed.

        For work that several methods or configs share, such as heads trained
        with one recipe: ``name`` must say everything the result depends on
        beyond the fit data and the seed (config, code version).
        """
        return build() if self.store is None else self.store(name, build)

    @cached_property
    def heads_fp32(self) -> SplitFeatures:
        """The ``heads`` samples through the fp32 backbone (distillation targets)."""
        if self.load_heads_fp32 is None:
            raise ValueError("this fit context has no fp32 features")
        return self.load_heads_fp32()


@dataclass
class NoConfig:
    """For a policy without options."""


class ExitPolicy(abc.ABC):
    """Base class of every method plugin.

    Subclasses set ``Config`` (a dataclass of the method's options, each with a
    default) and ``needs`` (the :data:`FEATURES` they read), and implement
    :meth:`fit`; an exit policy also implements :meth:`exit_layers` and
    :meth:`decide`. Learned parameters
    live in :meth:`state_dict` so that a fitted policy can be cached and
    reloaded without refitting.

    A token policy (a token pruner) sets :attr:`prunes_tokens` and uses the
    same interface: it may exit nobody (``exit_layers()`` returns ``[]``) and
    instead says, through :meth:`keep_tokens`, which patch tokens of each
    sample survive after a block; the real driver drops the others (and
    appends any :meth:`merge_tokens`), so the later blocks really run on
    fewer tokens. It can only run under the real driver: the features of the
    later blocks depend on the dropped tokens, so cached full-token traces
    cannot be replayed for it. A policy may both prune and exit. Its
    per-block decision cost goes in :meth:`head_flops`.

    A method's operating point is set by one inference-time :attr:`knob`
    (an exit threshold, PABEE's patience, a keep ratio) that can be changed
    on a fitted policy without refitting (:meth:`with_knob`); sweeping it
    over :attr:`knob_grid` traces the method's accuracy/FLOPs curve.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    needs: ClassVar[frozenset[str]] = frozenset({"cls"})
    kind: ClassVar[str] = "method"  # "control" for the harness's own controls (harness.controls)
    prunes_tokens: ClassVar[bool] = False  # True: a token policy (real driver only, see the class docstring)
    knob: ClassVar[str | None] = None  # what sets the operating point: a Config field unless with_knob says otherwise
    knob_grid: ClassVar[tuple[float, ...]] = ()  # the knob's values in a sweep
    # True: may fit on the fp32 trace of the heads split too (FitContext.heads_fp32, e.g. a distillation
    # teacher), which a run then traces beside the quantized one, decoding the images once
    reads_heads_fp32: ClassVar[bool] = False

    def __init__(self, config: Any = None, **overrides: Any):
        """
        Raises:
            ConfigError: an override names no option, or a value of the wrong type or out
                of range (:func:`harness.options.check_config`; block bounds are checked
                later, against the backbone: :meth:`check_blocks`).
        """
        base = config if config is not None else self.Config()
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(base)})
        if unknown:
            raise ConfigError(f"{self.name or type(self).__name__} has no option {unknown[0]!r} "
                              f"(options: {', '.join(f.name for f in dataclasses.fields(base))})")
        self.config = check_config(dataclasses.replace(base, **overrides) if overrides else base)

    def check_blocks(self, num_blocks: int) -> None:
        """Raise ConfigError if an option that names blocks or counts them is out of 1..``num_blocks``."""
        check_config(self.config, num_blocks)

    @abc.abstractmethod
    def fit(self, ctx: FitContext) -> None:
        """Train heads/gates/thresholds on ``ctx.heads`` and ``ctx.gate``."""

    def exit_layers(self) -> list[int]:
        """Blocks (1-based, ascending) after which this policy may exit samples; none by default (a token
        policy that only prunes, or full depth)."""
        return []

    def start_batch(self, batch_size: int) -> None:
        """Reset per-sample state before a new batch (e.g. PABEE's patience counters)."""

    def decide(self, layer: int, view: LayerView) -> Decision:
        """Which of ``view``'s samples exit after block ``layer``, with what logits.

        The drivers call it only at :meth:`exit_layers`, so a policy that exits
        nobody needs none; one that declares exit layers must implement it.
        """
        raise NotImplementedError(f"{self.name or type(self).__name__} declares exit layers "
                                  f"{self.exit_layers()} but implements no decide()")

    def keep_tokens(self, layer: int, view: LayerView) -> torch.Tensor | None:
        """Token policies: bool [B, N] patch tokens to keep after ``layer``; None keeps all.

        CLS is not among the N and is always kept. Every sample of the view
        must keep the same number of tokens (the batch stays one tensor).
        """
        return None

    def merge_tokens(self, layer: int, view: LayerView, keep: torch.Tensor) -> torch.Tensor | None:
        """Token policies: tokens [B, M, D] appended after the kept ones (EViT's fused token); None: none."""
        return None

    def with_knob(self, value: float) -> "ExitPolicy":
        """This fitted policy with its :attr:`knob` set to ``value``, sharing the fitted state (no refit).

        Returns ``self`` when ``value`` is the current setting, else a copy.
        A token policy's knob is its keep ratio; at 1.0 it must drop nothing.
        """
        if self.knob is None:
            raise NotImplementedError(f"method {self.name!r} has no knob to sweep")
        if getattr(self.config, self.knob) == value:
            return self
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, **{self.knob: value})
        return other

    def head_flops(self, layer: int) -> float:
        """FLOPs per sample of the policy's own head and gate (or token decision) at ``layer``."""
        return 0.0

    def budget_config(self, saving: float) -> dict[str, Any]:
        """Config overrides under which the method fits its own operating point for a FLOPs saving of at
        least ``saving`` % (LRA-EE's thresholds under a budget), or ``{}``: the harness then picks the
        :attr:`knob` value on the ``gate`` split (:mod:`harness.protocol`)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but got keys {sorted(state)}")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "config": dataclasses.asdict(self.config)}


def keep_top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """bool [B, N]: True for the ``count`` highest ``scores`` [B, N] of each row (ties: the earlier token).

    The mask a token policy returns from :meth:`ExitPolicy.keep_tokens`: every
    row keeps exactly ``count`` tokens.

    Example:
        >>> keep_top(torch.tensor([[0.1, 0.5, 0.2]]), 2)
        tensor([[False,  True,  True]])
    """
    if not 0 <= count <= scores.shape[1]:
        raise ValueError(f"cannot keep {count} of {scores.shape[1]} tokens")
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :count]
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return keep.scatter_(1, order, True)


# Built-in methods come through the same entry-point group as outside ones
# (pyproject.toml), so the harness never imports a method by name.
METHODS: Registry = Registry("method", entry_point_group="harness.methods")


def register_method(name: str, description: str = ""):
    """Class decorator: register an :class:`ExitPolicy` under ``name``.

    Raises:
        TypeError: the class is not an ExitPolicy subclass.
    """

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, ExitPolicy)):
            raise TypeError(f"method {name!r}: {cls!r} is not an ExitPolicy subclass")
        cls.name = name
        return METHODS.register(name, description)(cls)

    return decorator


def create_method(name: str, **config: Any) -> ExitPolicy:
    """Instantiate a registered method with config overrides."""
    cls = METHODS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, ExitPolicy)):
        raise TypeError(f"method {name!r} is not an ExitPolicy subclass ({cls!r})")
    return cls(**config)


def list_methods() -> list[tuple[str, str]]:
    return METHODS.describe()
