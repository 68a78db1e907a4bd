"""Fashion-MNIST: IDX reader, class names, prompt templates and two datasets.

Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017) is released under the MIT
license. Debian's ``dataset-fashion-mnist`` package installs the four IDX
files in :data:`DEFAULT_DIR`.

Registered datasets (same parts, splits, class names and fingerprints):

- ``fashion-mnist`` reads the IDX files;
- ``embedded`` reads the compact copy shipped in :mod:`harness.embedded`.

Parts: ``holdout`` = the 15,000 train images the embedded backbone never saw
(:func:`holdout_indices`), ``test`` = the 10,000 t10k images. Splits: ``heads``
(10,000) and ``gate`` (5,000) are a seeded draw from ``holdout``; ``test`` is
all of ``test`` for every seed.
"""

from __future__ import annotations

import abc
import functools
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from harness.errors import DataError

from harness import embedded
from harness.datasets._base import Dataset, seeded_draw
from harness.datasets._factory import register_dataset

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# Lower-case, CLIP-prompt-friendly names in the dataset's label order.
CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)

TEMPLATES = (
    "a photo of a {}.",
    "a grayscale photo of a {}.",
    "a low resolution photo of a {}.",
    "a product photo of a {}.",
    "a picture of a {}, a fashion item.",
)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array.

    Raises:
        ValueError: when the header is not IDX or the payload is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    payload = raw[4 + 4 * ndim:]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(payload) != expected:
        raise DataError(f"{path}: truncated IDX file ({len(payload)} of {expected} bytes)")
    return np.frombuffer(payload, dtype=dtype).reshape(dims)


def _require_files(root: Path, part: str) -> None:
    for name in FILES[part]:
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {root / name} not found; install Debian's "
                f"'dataset-fashion-mnist' package or pass --data-root DIR"
            )


def load_split(root: str | Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Load ``part`` ("train" or "t10k") as (uint8 images [N, 28, 28], int64 labels).

    Raises:
        FileNotFoundError: one line naming the missing file and how to get it.
    """
    root = Path(root)
    _require_files(root, part)
    images_name, labels_name = FILES[part]
    images = read_idx(root / images_name)
    labels = read_idx(root / labels_name).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels in '{part}'")
    return images, labels


def holdout_indices(num_train: int) -> np.ndarray:
    """Sorted int64 indices of the train images kept away from backbone training.

    Drawn once with :data:`harness.embedded.HOLDOUT_SEED`, independent of any
    run's split seed.
    """
    order = np.random.default_rng(embedded.HOLDOUT_SEED).permutation(num_train)
    return np.sort(order[: embedded.HOLDOUT_SIZE]).astype(np.int64)


HEADS_SIZE = 10_000  # heads split, drawn from the holdout part
GATE_SIZE = 5_000  # gate split, drawn from the rest of the holdout part


@dataclass(frozen=True)
class _Part:
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # int64 [N]
    source: str  # the file the images come from, for reports
    source_index: np.ndarray  # position of each image in that source

    def __post_init__(self) -> None:
        for array in (self.images, self.labels):
            array.setflags(write=False)  # handed out by labels(): callers must not edit them


class _ArrayDataset(Dataset):
    """Fashion-MNIST held in memory; subclasses only say where the arrays come from."""

    classnames = CLASSES
    templates = TEMPLATES

    @abc.abstractmethod
    def _load_parts(self) -> dict[str, _Part]:
        """Read the ``holdout`` and ``test`` parts."""

    @functools.cached_property
    def _data(self) -> dict[str, _Part]:
        return self._load_parts()

    def _part(self, part: str) -> _Part:
        self._check_part(part)
        return self._data[part]

    def parts(self) -> dict[str, int]:
        return {name: len(p.labels) for name, p in self._data.items()}

    def labels(self, part: str) -> np.ndarray:
        return self._part(part).labels

    def read_image(self, part: str, index: int) -> Image.Image:
        return Image.fromarray(self._part(part).images[index]).convert("RGB")  # uint8 2-D: mode L

    def describe_sample(self, part: str, index: int) -> str:
        p = self._part(part)
        return f"{p.source}[{p.source_index[index]}]"

    def _content_chunks(self, part: str) -> Iterator[bytes]:
        # Only the pixels and labels: both sources of the same part hash equal.
        p = self._part(part)
        yield repr(p.images.shape).encode()
        yield np.ascontiguousarray(p.images, dtype=np.uint8).tobytes()
        yield np.ascontiguousarray(p.labels, dtype="<i8").tobytes()

    @property
    def protocol(self) -> str:
        return (f"heads ({HEADS_SIZE:,}) and gate ({GATE_SIZE:,}) drawn with the run's seed from the held-out "
                f"train images; test = the whole test set")

    def _draws(self, seed: int) -> dict[str, tuple[str, np.ndarray]]:
        heads, gate = seeded_draw(self.parts()["holdout"], seed, (HEADS_SIZE, GATE_SIZE))
        return {
            "heads": ("holdout", heads),
            "gate": ("holdout", gate),
            "test": ("test", np.arange(self.parts()["test"])),
        }


@register_dataset("fashion-mnist")
class FashionMNIST(_ArrayDataset):
    """Fashion-MNIST from the IDX files (Debian package dataset-fashion-mnist)."""

    def __init__(self, root: str | Path | None = None, on_bad_image: str = "skip") -> None:
        super().__init__(on_bad_image)
        self.root = Path(root) if root is not None else DEFAULT_DIR
        for part in FILES:
            _require_files(self.root, part)

    def _load_parts(self) -> dict[str, _Part]:
        train_x, train_y = load_split(self.root, "train")
        test_x, test_y = load_split(self.root, "t10k")
        held = holdout_indices(len(train_y))
        return {
            "holdout": _Part(train_x[held], train_y[held], str(self.root / FILES["train"][0]), held),
            "test": _Part(test_x, test_y, str(self.root / FILES["t10k"][0]), np.arange(len(test_y))),
        }


_EMBEDDED_ARRAYS = ("holdout_images", "holdout_labels", "test_images", "test_labels")


@register_dataset("embedded")
class EmbeddedFashionMNIST(_ArrayDataset):
    """Fashion-MNIST holdout + test shipped with the harness (no download needed)."""

    def __init__(self, root: str | Path | None = None, on_bad_image: str = "skip") -> None:
        super().__init__(on_bad_image)
        self.path = Path(root) if root is not None else embedded.DATA_PATH
        if not self.path.is_file():
            raise FileNotFoundError(
                f"embedded data file {self.path} not found; pass --data-root pointing at "
                f"{embedded.DATA_PATH.name}, or regenerate it with 'python -m harness train-embedded'"
            )

    def _load_parts(self) -> dict[str, _Part]:
        with np.load(self.path) as npz:
            missing = sorted(set(_EMBEDDED_ARRAYS) - set(npz.files))
            if missing:
                raise DataError(
                    f"{self.path} is not an embedded data file (no {', '.join(missing)}); "
                    f"regenerate it with 'python -m harness train-embedded'"
                )
            arrays = {key: npz[key] for key in _EMBEDDED_ARRAYS}
        return {
            "holdout": _Part(
                arrays["holdout_images"], arrays["holdout_labels"].astype(np.int64),
                f"{self.path}:holdout_images", np.arange(len(arrays["holdout_labels"])),
            ),
            "test": _Part(
                arrays["test_images"], arrays["test_labels"].astype(np.int64),
                f"{self.path}:test_images", np.arange(len(arrays["test_labels"])),
            ),
        }
