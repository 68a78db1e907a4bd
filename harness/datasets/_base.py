"""The dataset interface: parts, labels, fingerprints, images and seeded splits.

A dataset has one or more *parts* (physical sources such as Fashion-MNIST's
held-out train images and its test set). A :class:`Split` is an ordered subset
of one part; ``Dataset.splits(seed)`` returns the three the harness uses:
``heads`` (train exit heads), ``gate`` (fit gates and thresholds) and ``test``
(report only; never fit anything on it).
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

from harness.errors import DataError

ON_BAD_IMAGE = ("skip", "fail")


class BadImageError(DataError):
    """An image file that cannot be decoded (empty, truncated, not an image)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"bad image {path}: {reason} (remove or replace the file, or skip bad images "
            f"with --on-bad-image skip)"
        )
        self.path = path
        self.reason = reason

    def __reduce__(self):  # picklable (e.g. from DataLoader workers) despite the 2-arg __init__
        return type(self), (self.path, self.reason)


def check_on_bad_image(value: str) -> str:
    """Return ``value`` if it is a known bad-image policy, else raise ValueError."""
    if value not in ON_BAD_IMAGE:
        raise DataError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, not {value!r}")
    return value


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare .indices explicitly
class Split:
    """A subset of one part of a dataset.

    Attributes:
        part: the physical source the indices point into, e.g. "holdout", "test", "all".
        indices: int64 indices into that part, ascending, read-only.
    """

    part: str
    indices: np.ndarray

    def __post_init__(self) -> None:
        indices = np.array(self.indices, dtype=np.int64).reshape(-1)
        indices.setflags(write=False)
        object.__setattr__(self, "indices", indices)

    def __len__(self) -> int:
        return len(self.indices)


def seeded_draw(n: int, seed: int, sizes: tuple[int, ...]) -> list[np.ndarray]:
    """Consecutive chunks of ``sizes`` from a seeded permutation of ``range(n)``.

    The chunks are in draw order (not sorted), so a prefix of a chunk is itself
    a random sample: that is how ``limit`` shrinks a split.
    """
    if sum(sizes) > n:
        raise DataError(f"cannot draw {' + '.join(map(str, sizes))} samples from {n}")
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum((0,) + tuple(sizes))
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class Dataset(abc.ABC):
    """A labelled image dataset with deterministic, seeded splits.

    Subclasses set ``classnames`` and ``templates`` (prompt templates with "{}")
    and implement the abstract methods; ``name`` is set by
    :func:`harness.datasets.register_dataset`.
    """

    name: str = ""
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()

    def __init__(self, on_bad_image: str = "skip") -> None:
        self.on_bad_image = check_on_bad_image(on_bad_image)
        self._fingerprints: dict[str, str] = {}

    @abc.abstractmethod
    def parts(self) -> dict[str, int]:
        """Map each part name to its number of samples."""

    @abc.abstractmethod
    def labels(self, part: str) -> np.ndarray:
        """int64 class indices of all samples of ``part``, in index order."""

    @abc.abstractmethod
    def read_image(self, part: str, index: int) -> Image.Image:
        """Sample ``index`` of ``part`` as an RGB image.

        Raises:
            BadImageError: the sample's file cannot be decoded.
        """

    @abc.abstractmethod
    def describe_sample(self, part: str, index: int) -> str:
        """Where sample ``index`` of ``part`` comes from (a file path), for reports."""

    @abc.abstractmethod
    def _content_chunks(self, part: str) -> Iterator[bytes]:
        """Everything that identifies ``part``'s content, as bytes to hash."""

    @abc.abstractmethod
    def _draws(self, seed: int) -> dict[str, tuple[str, np.ndarray]]:
        """Split name -> (part, indices in draw order) before ``limit`` and sorting."""

    @property
    def protocol(self) -> str:
        """One line saying where each split comes from, recorded with results."""
        return "heads, gate and test drawn by the dataset's own rule (see its documentation)"

    def fingerprint(self, part: str) -> str:
        """sha256 hex digest identifying the content of ``part`` (cached)."""
        self._check_part(part)
        if part not in self._fingerprints:
            digest = hashlib.sha256()
            for chunk in self._content_chunks(part):
                digest.update(chunk)
            self._fingerprints[part] = digest.hexdigest()
        return self._fingerprints[part]

    def splits(self, seed: int, limit: int | None = None) -> dict[str, Split]:
        """The ``heads``, ``gate`` and ``test`` splits for ``seed``.

        Args:
            seed: draws ``heads`` and ``gate``; ``test`` is the same for every seed.
            limit: keep at most this many samples per split (a random subset of
                each split, itself deterministic for the seed).

        Returns:
            ``{"heads": Split, "gate": Split, "test": Split}``; no (part, index)
            is in two of them.

        Example:
            >>> s = create_dataset("embedded").splits(seed=0, limit=100)
            >>> len(s["heads"]), s["test"].part
            (100, 'test')
        """
        if limit is not None and limit < 1:
            raise DataError(f"limit must be a positive number of samples or None, not {limit}")
        return {
            name: Split(part, np.sort(order[:limit]))
            for name, (part, order) in self._draws(seed).items()
        }

    def _check_part(self, part: str) -> None:
        if part not in self.parts():
            raise DataError(
                f"dataset {self.name!r} has no part {part!r}; parts: {', '.join(self.parts())}"
            )
