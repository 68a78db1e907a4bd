"""Options shared by the commands, declared once (torch-free, so ``--help`` stays quick)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from harness import embedded
from harness.options import check_config, option

# The quantizer used when none is given: the paper's scheme for real CLIP
# models; for the embedded model the mildest scheme that shows collapse there
# (see harness/embedded/__init__.py for the measurement behind it).
DEFAULT_QUANT = "int8-dynamic"


def default_quantizer(model: str) -> str:
    """The quantizer a run uses when ``--quant`` is not given."""
    return embedded.DEFAULT_QUANT if model == embedded.NAME else DEFAULT_QUANT


def default_workers() -> int:
    """Image-decoding worker processes when ``--workers`` is not given: one per usable CPU, at most 8."""
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def default_cache_dir() -> Path:
    """``$EXITBENCH_CACHE`` if set, else the user cache dir (e.g. ``~/.cache/exitbench``)."""
    if os.environ.get("EXITBENCH_CACHE"):
        return Path(os.environ["EXITBENCH_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("exitbench"))


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, min: int | None = None) -> Any:
    return option(default, help=help, choices=choices, min=min)


@dataclasses.dataclass
class HarnessConfig:
    """Options shared by the commands; every field is recorded with results."""

    model: str = _opt(embedded.NAME, "backbone: 'embedded' or an open_clip model name (run: a comma-separated "
                                     "list sweeps them)")
    pretrained: str | None = _opt(None, "open_clip tag, local checkpoint path, or 'none' "
                                        "(default: the shipped weights for 'embedded', else 'none')")
    data: str = _opt("embedded", "dataset name (see `python -m harness list`)")
    data_root: str | None = _opt(None, "dataset folder (default: the dataset's own)")
    train_root: str | None = _opt(None, "imagenet: the train folder; heads and gate are then drawn from train and "
                                        "test is all of val (the paper's protocol)")
    heads_fraction: float | None = option(None, above=0, max=1, help="imagenet/imagefolder: share of the images in "
                                          "heads (with --train-root: of train, default 0.1; else default 0.3)")
    gate_size: int | None = _opt(None, "imagenet with --train-root: gate images drawn from train (default 5000)",
                                 min=1)
    templates: str | None = _opt(None, "prompt templates: 'openai' (80), 'simple' (5), or a file with one per "
                                       "line (default: the dataset's own)")
    quant: str | None = _opt(None, "quantizer (default: int8-dynamic; for 'embedded' "
                                   f"{embedded.DEFAULT_QUANT}, see README; run: a comma-separated list sweeps them)")
    seed: int = _opt(0, "split seed, and the seed of a random init", min=0)
    limit: int | None = _opt(None, "cap every split at N samples (quick runs)", min=1)
    batch_size: int = _opt(256, "batch size (matters for batch-dependent quantizers)", min=1)
    device: str = _opt("cpu", "torch device: cpu or cuda")
    text_precision: str = _opt("fp32", "text tower precision for the zero-shot classifier", ("fp32", "fp16"))
    cache_dir: str | None = _opt(None, "trace cache folder (default: $EXITBENCH_CACHE or the user cache dir)")
    on_bad_image: str = _opt("skip", "bad image files: 'skip' (and list them) or 'fail'", ("skip", "fail"))
    allow_empty_classes: bool = _opt(False, "imagefolder/imagenet: keep class folders that hold no images as "
                                            "classes (refused by default)")
    threads: int | None = _opt(None, "torch CPU threads (default: torch's choice)", min=1)
    workers: int | None = _opt(None, "DataLoader processes decoding images, 0: none (default: the CPUs this "
                                     "process may use, at most 8); at idle priority with --device cpu", min=0)

    def dataset_options(self) -> dict[str, Any]:
        """Keywords for :func:`~harness.datasets.create_dataset` beyond name and root (only those set)."""
        options = {"train_root": self.train_root, "heads_fraction": self.heads_fraction, "gate_size": self.gate_size}
        if self.allow_empty_classes:
            options["allow_empty_classes"] = True
        return {key: value for key, value in options.items() if value is not None}

    def resolved(self) -> "HarnessConfig":
        """A checked copy with defaults filled in (quantizer, cache dir).

        Raises:
            ConfigError: a value of the wrong type or out of range, named as its flag.
        """
        return dataclasses.replace(
            check_config(self, as_flags=True),
            quant=self.quant or default_quantizer(self.model),
            cache_dir=str(Path(self.cache_dir) if self.cache_dir else default_cache_dir()),
            workers=default_workers() if self.workers is None else self.workers,
        )
