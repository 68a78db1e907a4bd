"""What every command sets up: backbone, quantized copies, dataset, splits, classifier, traces.

:class:`HarnessConfig` holds the options shared by the commands (one
declaration, used by the CLI and recorded in results); :class:`Context`
builds the objects lazily and caches them, so a command asks for
``ctx.trace("int8-dynamic", "test")`` and gets a cached trace.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from harness import embedded
from harness.backbones import EMBEDDED, Backbone, backbone_config, create_backbone
from harness.datasets import Dataset, Split, create_dataset
from harness.quantizers import Quantizer, create_quantizer
from harness.trace import Trace, default_cache_dir, trace_split

# The quantizer used when none is given: the paper's scheme for real CLIP
# models; for the embedded model the mildest scheme that shows collapse there
# (see harness/embedded/__init__.py for the measurement behind it).
DEFAULT_QUANT = "int8-dynamic"


def default_quantizer(model: str) -> str:
    return embedded.DEFAULT_QUANT if model == EMBEDDED else DEFAULT_QUANT


def _opt(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class HarnessConfig:
    """Options shared by the commands; every field is recorded with results."""

    model: str = _opt(EMBEDDED, "backbone: 'embedded' or an open_clip model name")
    pretrained: str | None = _opt(None, "open_clip tag, local checkpoint path, or 'none' "
                                        "(default: the shipped weights for 'embedded', else 'none')")
    data: str = _opt("embedded", "dataset name (see `python -m harness list`)")
    data_root: str | None = _opt(None, "dataset folder (default: the dataset's own)")
    quant: str | None = _opt(None, "quantizer (default: int8-dynamic; for 'embedded' "
                                   f"{embedded.DEFAULT_QUANT}, see README)")
    seed: int = _opt(0, "split seed, and the seed of a random init")
    limit: int | None = _opt(None, "cap every split at N samples (quick runs)")
    batch_size: int = _opt(256, "batch size (matters for batch-dependent quantizers)")
    device: str = _opt("cpu", "torch device: cpu or cuda")
    text_precision: str = _opt("fp32", "text tower precision for the zero-shot classifier: fp32 or fp16")
    cache_dir: str | None = _opt(None, "trace cache folder (default: $EXITBENCH_CACHE or the user cache dir)")
    on_bad_image: str = _opt("skip", "bad image files: 'skip' (and list them) or 'fail'")
    threads: int | None = _opt(None, "torch CPU threads (default: torch's choice)")

    def resolved(self) -> "HarnessConfig":
        """A copy with defaults filled in (quantizer, cache dir)."""
        return dataclasses.replace(
            self,
            quant=self.quant or default_quantizer(self.model),
            cache_dir=str(Path(self.cache_dir) if self.cache_dir else default_cache_dir()),
        )


class Context:
    """Lazily built, cached objects for one :class:`HarnessConfig`."""

    def __init__(self, config: HarnessConfig, progress: bool = True):
        self.config = config.resolved()
        self.progress = progress
        self._backbones: dict[str, tuple[Backbone, Quantizer]] = {}
        self._traces: dict[tuple[str, str], Trace] = {}
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
        return create_dataset(self.config.data, self.config.data_root, on_bad_image=self.config.on_bad_image)

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
            visual = quantizer.quantize(self.backbone.visual)
            self._backbones[quant] = (self.backbone.with_visual(visual, quant), quantizer)
        return self._backbones[quant]

    def trace(self, quant: str | None, split: str) -> Trace:
        """The cached trace of ``split`` under ``quant``."""
        quant = quant or self.config.quant
        if (quant, split) not in self._traces:
            backbone, quantizer = self.quantized(quant)
            self._traces[quant, split] = trace_split(
                backbone, quantizer, self.dataset, self.splits[split], self.classifier,
                batch_size=self.config.batch_size, cache_dir=self.cache_dir,
                on_bad_image=self.config.on_bad_image, progress=self.progress,
            )
        return self._traces[quant, split]

    def describe(self) -> dict[str, Any]:
        """The resolved config plus backbone identity, for results files."""
        return {"config": dataclasses.asdict(self.config), "backbone": backbone_config(self.backbone)}
