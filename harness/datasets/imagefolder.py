"""``imagefolder``: any folder with one sub-folder of images per class.

Class = sub-folder name (sorted order = class index), with "_" shown as " ".
One part, ``all``. Splits: ``test`` is a fixed fraction drawn with a constant
seed (it never changes with the run's seed); ``heads`` and ``gate`` are drawn
from the remaining samples with the run's seed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from harness.errors import DataError

from harness.datasets._base import Dataset, seeded_draw
from harness.datasets._factory import register_dataset
from harness.datasets._images import IMAGE_EXTENSIONS, is_image_name, load_rgb

PART = "all"
TEST_SEED = 0  # constant: the test split must be the same for every run seed

GENERIC_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
)


def _sub_folders(root: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``root``."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden entries skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if is_image_name(f)]
    return sorted(found)


@register_dataset("imagefolder")
class ImageFolder(Dataset):
    """Any folder with one sub-folder of images per class (--data-root DIR)."""

    def __init__(
        self,
        root: str | Path | None = None,
        on_bad_image: str = "skip",
        test_fraction: float = 0.5,
        heads_fraction: float = 0.3,
        gate_fraction: float = 0.2,
    ) -> None:
        """
        Args:
            root: the folder holding one sub-folder per class.
            on_bad_image: "skip" or "fail", see :func:`harness.datasets.create_dataset`.
            test_fraction, heads_fraction, gate_fraction: share of all samples in
                each split; each in (0, 1], together at most 1.

        Raises:
            ValueError, FileNotFoundError: bad fractions, no ``root``, or no images in it.
        """
        super().__init__(on_bad_image)
        self.fractions = {"test": test_fraction, "heads": heads_fraction, "gate": gate_fraction}
        if not all(0 < f <= 1 for f in self.fractions.values()) or sum(self.fractions.values()) > 1 + 1e-9:
            raise DataError(f"split fractions must each be in (0, 1] and sum to at most 1, got {self.fractions}")
        if root is None:
            raise DataError(f"dataset {self.name!r} needs --data-root DIR (a folder with one sub-folder per class)")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data root {self.root} for dataset {self.name!r} is not an existing folder; pass --data-root DIR"
            )
        folders = _sub_folders(self.root)
        self.classnames, self.templates = self._class_metadata(folders)
        self._files: list[str] = []  # paths relative to root, posix style
        labels: list[int] = []
        for label, folder in enumerate(folders):
            files = _image_files(self.root / folder)
            self._files += [f.relative_to(self.root).as_posix() for f in files]
            labels += [label] * len(files)
        if not self._files:
            raise DataError(
                f"no images found in {self.root}: expected one sub-folder per class holding "
                f"{'/'.join(sorted(IMAGE_EXTENSIONS))} files; pass --data-root DIR"
            )
        self._labels = np.array(labels, dtype=np.int64)
        self._labels.setflags(write=False)
        self._folders = folders

    def _class_metadata(self, folders: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(class names, templates) for the class ``folders``; subclasses validate here."""
        return tuple(f.replace("_", " ") for f in folders), GENERIC_TEMPLATES

    def parts(self) -> dict[str, int]:
        return {PART: len(self._files)}

    def labels(self, part: str) -> np.ndarray:
        self._check_part(part)
        return self._labels

    def read_image(self, part: str, index: int) -> Image.Image:
        return load_rgb(self.describe_sample(part, index))

    def describe_sample(self, part: str, index: int) -> str:
        self._check_part(part)
        return str(self.root / self._files[index])

    def _content_chunks(self, part: str) -> Iterator[bytes]:
        yield "\n".join(self._folders).encode() + b"\0"
        for rel in self._files:
            try:
                st = os.stat(self.root / rel)
                yield f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
            except FileNotFoundError:  # removed since the scan; read_image will report it
                yield f"{rel}\0missing\n".encode()

    def _draws(self, seed: int) -> dict[str, tuple[str, np.ndarray]]:
        n = len(self._files)
        sizes = {name: int(f * n + 1e-9) for name, f in self.fractions.items()}
        if min(sizes.values()) == 0:
            raise DataError(f"{n} images in {self.root} are too few for split sizes {sizes}")
        (test,) = seeded_draw(n, TEST_SEED, (sizes["test"],))
        rest = np.setdiff1d(np.arange(n), test)
        heads, gate = seeded_draw(len(rest), seed, (sizes["heads"], sizes["gate"]))
        return {"heads": (PART, rest[heads]), "gate": (PART, rest[gate]), "test": (PART, test)}
