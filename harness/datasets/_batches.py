"""Iterate a split in batches of transformed images, skipping or failing on bad ones."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
from PIL import Image

from harness.errors import DataError

from harness.datasets._base import BadImageError, Dataset, Split, check_on_bad_image

if TYPE_CHECKING:
    import torch


class ImageBatches:
    """Batches of a :class:`Split`, in the split's index order, for the trace driver.

    Every batch but the last holds exactly ``batch_size`` good images: a skipped
    image is replaced by the next one in order, so the batch composition (which
    per-tensor dynamic quantization depends on) only depends on the split.

    Args:
        dataset: the dataset the split belongs to.
        split: which samples, in which order.
        transform: PIL RGB image -> float tensor [3, H, W].
        batch_size: images per batch.
        on_bad_image: "skip" (record in :attr:`bad_images`) or "fail" (raise
            :class:`BadImageError`); None uses ``dataset.on_bad_image``.

    Attributes:
        bad_images: ``{"sample", "index", "reason"}`` of each image skipped so far
            in the current iteration.

    Example:
        >>> batches = ImageBatches(ds, ds.splits(0)["test"], ToTensor(), batch_size=256)
        >>> for images, labels, indices in batches: ...
    """

    def __init__(
        self,
        dataset: Dataset,
        split: Split,
        transform: Callable[[Image.Image], "torch.Tensor"],
        batch_size: int,
        on_bad_image: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, not {batch_size}")
        dataset._check_part(split.part)
        self.dataset = dataset
        self.split = split
        self.transform = transform
        self.batch_size = batch_size
        self.on_bad_image = check_on_bad_image(on_bad_image or dataset.on_bad_image)
        self.bad_images: list[dict] = []

    def __len__(self) -> int:
        """Number of batches when no image is skipped (an upper bound otherwise)."""
        return -(-len(self.split) // self.batch_size)

    def __iter__(self) -> Iterator[tuple["torch.Tensor", "torch.Tensor", np.ndarray]]:
        """Yield ``(images [B, 3, H, W], int64 labels [B], int64 indices [B])``."""
        import torch

        self.bad_images = []
        labels = self.dataset.labels(self.split.part)
        images: list[torch.Tensor] = []
        kept: list[int] = []
        for index in self.split.indices.tolist():
            try:
                image = self.dataset.read_image(self.split.part, index)
            except BadImageError as err:
                if self.on_bad_image == "fail":
                    raise
                self.bad_images.append({
                    "sample": self.dataset.describe_sample(self.split.part, index),
                    "index": index,
                    "reason": err.reason,
                })
                continue
            images.append(self.transform(image))
            kept.append(index)
            if len(kept) == self.batch_size:
                yield self._batch(images, labels, kept)
                images, kept = [], []
        if kept:
            yield self._batch(images, labels, kept)

    @staticmethod
    def _batch(
        images: list["torch.Tensor"], labels: np.ndarray, kept: list[int]
    ) -> tuple["torch.Tensor", "torch.Tensor", np.ndarray]:
        import torch

        indices = np.array(kept, dtype=np.int64)
        return torch.stack(images), torch.from_numpy(labels[indices].astype(np.int64)), indices
