"""``imagenet``: ImageNet-1k folders with open_clip's class names and templates.

The standard layout: ``val/n01440764/*.JPEG`` ..., one sub-folder per WordNet
id, whose sorted order is the standard class order (``train/`` alike).

Two protocols:

- **val only** (``--data-root VAL``): one part, ``all``, split as
  ``imagefolder`` does (test 50%, heads 30%, gate 20% of val).
- **the paper's** (``--data-root VAL --train-root TRAIN``): ``heads`` is a
  seeded ``heads_fraction`` of train (default 10%, 128,117 of ImageNet's
  1,281,167 images), ``gate`` a seeded set of ``gate_size`` further train
  images (default 5,000, disjoint from ``heads``), and ``test`` all of val.
  Parts ``train`` and ``val``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from harness.errors import DataError

from harness.datasets._base import seeded_draw
from harness.datasets._factory import register_dataset
from harness.datasets.imagefolder import PART, TEST_SEED, ImageFolder, _sub_folders, existing_folder

NUM_CLASSES = 1000
WNID = re.compile(r"n\d{8}")
PAPER_HEADS_FRACTION = 0.1
PAPER_GATE_SIZE = 5_000


@register_dataset("imagenet")
class ImageNet(ImageFolder):
    """ImageNet-1k val folder (--data-root DIR); with --train-root, heads and gate from train, test all of val."""

    empty_class_fix = "extract the missing images into them"

    def __init__(
        self,
        root: str | Path | None = None,
        on_bad_image: str = "skip",
        train_root: str | Path | None = None,
        heads_fraction: float | None = None,
        gate_size: int | None = None,
        test_fraction: float = 0.5,
        gate_fraction: float = 0.2,
        allow_empty_classes: bool = False,
    ) -> None:
        """
        Args:
            root: the val folder.
            train_root: the train folder; given, the splits follow the paper's protocol (module docstring).
            heads_fraction: share of the heads split: of train with ``train_root`` (default 0.1, the
                paper's), else of val (default 0.3).
            gate_size: gate images drawn from train (``train_root`` only; default 5,000, the paper's).
            test_fraction, gate_fraction: the val-only splits' other shares (see ``imagefolder``).
            on_bad_image, allow_empty_classes: as ``imagefolder``.

        Raises:
            DataError, FileNotFoundError: a folder that is missing or not in the ImageNet layout, train and
                val with different classes, or split sizes that do not fit.
        """
        if train_root is None:
            if gate_size is not None:
                raise DataError("gate_size (--gate-size) draws gate images from train: it needs --train-root")
            super().__init__(root, on_bad_image, test_fraction, 0.3 if heads_fraction is None else heads_fraction,
                             gate_fraction, allow_empty_classes)
            self.train = None
            return
        super().__init__(root, on_bad_image, allow_empty_classes=allow_empty_classes)
        self.heads_fraction = PAPER_HEADS_FRACTION if heads_fraction is None else heads_fraction
        self.gate_size = PAPER_GATE_SIZE if gate_size is None else gate_size
        if not 0 < self.heads_fraction < 1 or self.gate_size < 1:
            raise DataError(f"--heads-fraction must be in (0, 1) and --gate-size at least 1, "
                            f"not {self.heads_fraction} and {self.gate_size}")
        train = existing_folder(train_root, self.name, "--train-root")
        folders = _sub_folders(train)
        self._check_layout(train, folders, "train")
        if folders != self.folders[PART].folders:
            missing = sorted(set(self.folders[PART].folders) - set(folders))
            raise DataError(f"{train} and {self.root} hold different classes (e.g. {missing[:1] or folders[:1]}): "
                            f"pass the train and val folders of the same ImageNet copy")
        self.folders = {"train": self._scan(train, folders, "--train-root"), "val": self.folders.pop(PART)}
        self.train = train

    def _class_metadata(self, folders: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        self._check_layout(self.root, folders, "val")
        # Heavy import (torch): only when an ImageNet dataset is actually built.
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

        return tuple(IMAGENET_CLASSNAMES), tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)

    @staticmethod
    def _check_layout(root: Path, folders: list[str], kind: str) -> None:
        others = [f for f in folders if not WNID.fullmatch(f)]
        if len(folders) != NUM_CLASSES or others:
            loose = sum(1 for p in root.iterdir() if p.is_file())
            raise DataError(
                f"{root} is not an ImageNet {kind} folder: expected {NUM_CLASSES} sub-folders named "
                f"like n01440764, found {len(folders)} sub-folders ({len(folders) - len(others)} "
                f"WordNet ids{', others: ' + ', '.join(others[:3]) if others else ''}) and {loose} "
                f"files directly inside; sort {kind} images into one folder per class and pass "
                f"{'--data-root' if kind == 'val' else '--train-root'}"
            )

    @property
    def protocol(self) -> str:
        if self.train is None:
            return "val only: " + super().protocol
        heads, gate = self._train_sizes()
        return (f"paper: heads = {100 * self.heads_fraction:g}% of train ({heads:,} images), gate = {gate:,} "
                f"further train images, both drawn with the run's seed; test = all {self.parts()['val']:,} val images")

    def _train_sizes(self) -> tuple[int, int]:
        n = self.parts()["train"]
        heads = round(self.heads_fraction * n)
        if heads < 1 or heads + self.gate_size > n:
            raise DataError(f"{n} train images in {self.train} are too few for {heads} heads + "
                            f"{self.gate_size} gate images; lower --heads-fraction or --gate-size")
        return heads, self.gate_size

    def _draws(self, seed: int) -> dict[str, tuple[str, np.ndarray]]:
        if self.train is None:
            return super()._draws(seed)
        heads, gate = seeded_draw(self.parts()["train"], seed, self._train_sizes())
        (test,) = seeded_draw(self.parts()["val"], TEST_SEED, (self.parts()["val"],))  # all, in a random order
        return {"heads": ("train", heads), "gate": ("train", gate), "test": ("val", test)}
