"""What every command sets up: backbone, quantized copies, dataset, splits, classifier, traces.

:class:`HarnessConfig` holds the options shared by the commands (one
declaration, used by the CLI and recorded in results); :class:`Context`
builds the objects lazily and caches them, so a command asks for
``ctx.trace("int8-dynamic", "test")`` and gets a cached trace.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from harness.backbones import Backbone, backbone_config, create_backbone
from harness.cache import cached_state, fit_fields
from harness.config import HarnessConfig
from harness.datasets import Dataset, Split, create_dataset
from harness.errors import ConfigError
from harness.policy import FitContext
from harness.quantizers import Quantizer, create_quantizer
from harness.trace import Trace, trace_split

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


class Context:
    """Lazily built, cached objects for one :class:`HarnessConfig`."""

    def __init__(self, config: HarnessConfig, progress: bool = True):
        self.config = config.resolved()
        _check_device(self.config.device)
        self.progress = progress
        self._backbones: dict[str, tuple[Backbone, Quantizer]] = {}
        self._traces: dict[tuple[str, str, bytes], Trace] = {}
        if self.config.threads:
            torch.set_num_threads(self.config.threads)

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
    def classifier(self) -> torch.Tensor:
        return self.backbone.zero_shot_classifier(
            self.dataset.classnames, self.dataset.templates, self.config.text_precision, self.cache_dir
        )

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
        from harness.datasets import ImageBatches

        split = self.splits[quantizer.calibration_split]
        count = min(quantizer.calibration_images, len(split))
        chosen = Split(split.part, split.indices[np.linspace(0, len(split) - 1, count).round().astype(np.int64)])
        batches = ImageBatches(self.dataset, chosen, self.backbone.preprocess, self.config.batch_size,
                               on_bad_image=self.config.on_bad_image)
        return torch.cat([images for images, _, _ in batches] or [torch.empty(0)])

    def trace(self, quant: str | None, split: str) -> Trace:
        """The cached trace of ``split`` under ``quant``.

        Without ``--limit`` the whole part behind the split is traced once and
        the split's rows are selected from it, so splits re-drawn for another
        seed cost no new backbone pass.
        """
        quant = quant or self.config.quant
        part_split = self.splits[split]
        if self.config.limit is None:
            part_split = Split(part_split.part, np.arange(self.dataset.parts()[part_split.part]))
        key = (quant, part_split.part, part_split.indices.tobytes())
        if key not in self._traces:
            backbone, quantizer = self.quantized(quant)
            self._traces[key] = trace_split(
                backbone, quantizer, self.dataset, part_split, self.classifier,
                batch_size=self.config.batch_size, cache_dir=self.cache_dir,
                on_bad_image=self.config.on_bad_image, progress=self.progress,
            )
        return self._traces[key].select(self.splits[split].indices)

    def with_seed(self, seed: int) -> "Context":
        """The same backbone, data and caches with splits drawn for another seed."""
        return self.derived(seed=seed)

    def derived(self, **changes: Any) -> "Context":
        """This context with another ``seed``, ``quant`` or ``limit``: the backbone, data and classifier
        are shared, not loaded again.

        A seed or quantizer change shares the quantized towers and traces held
        here too (a calibrated quantizer keeps the calibration of the seed it
        was built for); a limit change draws other splits, so those start afresh.
        """
        unknown = set(changes) - {"seed", "quant", "limit"}
        if unknown:
            raise ValueError(f"a derived context changes seed, quant or limit only, not {sorted(unknown)}")
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, **changes)
        other.__dict__.pop("splits", None)  # cached_property: redrawn on first use
        if changes.get("limit", self.config.limit) != self.config.limit:
            other._backbones, other._traces = {}, {}
        return other

    @cached_property
    def block_flops(self) -> list[float]:
        """FLOPs of each block for one image with all its tokens (counted once per context)."""
        from harness.flops import block_flops

        return [float(block_flops(self.backbone, self.num_tokens, i)) for i in range(self.backbone.num_blocks)]

    def fit_context(self, quant: str | None = None, seed: int | None = None) -> FitContext:
        """What a policy fits on under ``quant``: heads and gate traces (never test)."""
        backbone, _ = self.quantized(quant)
        return FitContext(
            heads=self.trace(quant, "heads"),
            gate=self.trace(quant, "gate"),
            load_heads_fp32=lambda: self.trace("fp32", "heads"),
            classifier=self.classifier,
            logit_scale=self.backbone.logit_scale,
            num_blocks=backbone.num_blocks,
            width=backbone.width,
            embed_dim=backbone.embed_dim,
            block_flops=self.block_flops,
            seed=self.config.seed if seed is None else seed,
            backbone=backbone,
            image_batches=functools.partial(self._fit_images, backbone),
            store=functools.partial(self._stored_fit, quant, self.config.seed if seed is None else seed),
        )

    def _fit_images(self, backbone: Backbone, split: str, batch_size: int):
        """:attr:`FitContext.image_batches`: (images, labels) of ``heads`` or ``gate``, in the split's order."""
        from harness.datasets import ImageBatches

        if split not in ("heads", "gate"):
            raise ValueError(f"policies fit on the heads and gate splits only, not {split!r}")
        batches = ImageBatches(self.dataset, self.splits[split], backbone.preprocess, batch_size,
                               on_bad_image=self.config.on_bad_image)
        for images, labels, _ in batches:
            yield images, labels

    def _stored_fit(self, quant: str | None, seed: int, name: str, build: Callable[[], dict]) -> dict:
        """:meth:`FitContext.cached` on disk: keyed by ``name``, the code that defines ``build``, the fit
        splits' traces and rows, and the seed."""
        traces = (self.trace(quant, "heads"), self.trace(quant, "gate"))
        fields = {"name": name, **fit_fields(traces, seed, [build.__module__])}
        return cached_state(self.cache_dir, "fits", fields, build, f"fit {name!r}")

    @cached_property
    def num_tokens(self) -> int:
        """Tokens per image entering block 1 (CLS included)."""
        grid = self.backbone.visual.grid_size
        return grid[0] * grid[1] + 1

    def describe(self, quant: str | None = None) -> dict[str, Any]:
        """Resolved config, backbone identity, quantizer parameters and data fingerprints, for results."""
        _, quantizer = self.quantized(quant)
        return {
            "config": dataclasses.asdict(self.config),
            "backbone": backbone_config(self.backbone),
            "quantizer": quantizer.config(),
            "dataset": {"name": self.dataset.name,
                        "fingerprints": {part: self.dataset.fingerprint(part) for part in self.dataset.parts()}},
        }
