"""Iterate a split in batches of transformed images, skipping or failing on bad ones."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
from PIL import Image

from harness.errors import DataError

from harness.datasets._base import BadImageError, Dataset, Split, check_on_bad_image

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader


class _Decoded:
    """Map-style dataset for the DataLoader: position in the split -> (index, image tensor or None, error or None)."""

    def __init__(self, batches: "ImageBatches") -> None:
        self.dataset, self.part, self.transform = batches.dataset, batches.split.part, batches.transform
        self.indices = batches.split.indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, "torch.Tensor | None", BadImageError | None]:
        index = int(self.indices[position])
        try:
            return index, self.transform(self.dataset.read_image(self.part, index)), None
        except BadImageError as err:
            return index, None, err


def _idle_priority(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: this worker runs only on CPU time that nothing else wants (Linux's
    ``SCHED_IDLE``; elsewhere, or where a sandbox refuses it, the lowest nice level; else unchanged)."""
    import contextlib
    import os

    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return
    with contextlib.suppress(AttributeError, OSError):
        os.nice(19)


def _stack_chunk(samples: list) -> tuple[list[int], "torch.Tensor | None", list[tuple[int, BadImageError]]]:
    """DataLoader ``collate_fn``: a chunk's good images stacked into one tensor (with their indices, in order)
    and its bad images. One tensor per chunk crosses from a worker to the main process: sent one by one, the
    images cost the main process about 2 ms each (a shared-memory handle per tensor), which bounded a 16-worker
    loader at about 280 images/s."""
    import torch

    good = [(index, image) for index, image, error in samples if error is None]
    bad = [(index, error) for index, _, error in samples if error is not None]
    return [index for index, _ in good], torch.stack([image for _, image in good]) if good else None, bad


class ImageBatches:
    """Batches of a :class:`Split`, in the split's index order, for the trace driver.

    Every batch but the last holds exactly ``batch_size`` good images: a skipped
    image is replaced by the next one in order, so the batch composition (which
    per-tensor dynamic quantization depends on) only depends on the split.

    Images are decoded and transformed by a ``torch.utils.data.DataLoader``
    with ``workers`` processes (``0``: in this process), in chunks of
    ``batch_size`` samples, and batched here in split order: the batches are
    the same for any number of workers.

    Args:
        dataset: the dataset the split belongs to.
        split: which samples, in which order.
        transform: PIL RGB image -> float tensor [3, H, W].
        batch_size: images per batch.
        on_bad_image: "skip" (record in :attr:`bad_images`) or "fail" (raise
            :class:`BadImageError`); None uses ``dataset.on_bad_image``.
        workers: DataLoader worker processes; a split of one batch is decoded in this process.
        pin_memory: return batches in pinned memory (for copies to a GPU).
        idle_workers: run the workers at idle priority, for a tower that computes on the same
            CPU cores: the workers then decode while its threads wait instead of pre-empting them
            (a pre-empted thread stalls the others at the next barrier); ``bench --suite data``
            measures the difference.
        keep_workers: start the workers on the first iteration and keep them for the next ones
            (the DataLoader's ``persistent_workers``), for passes repeated over the same split. Each
            iteration otherwise starts its own: a fixed cost a long pass does not notice (forking a
            process that holds a model, then re-copying the pages it writes; ``bench --suite data``
            measures it). The workers hold the dataset, split and transform of the first iteration
            and live until the reader is garbage-collected; one iteration may run at a time (a second
            one started before the first ends raises ``RuntimeError``; they share the workers).

    Attributes:
        bad_images: ``{"sample", "index", "reason"}`` of each image skipped so far
            in the current iteration.

    Example:
        >>> batches = ImageBatches(ds, ds.splits(0)["test"], ToTensor(), batch_size=256, workers=2)
        >>> for images, labels, indices in batches: ...
    """

    def __init__(
        self,
        dataset: Dataset,
        split: Split,
        transform: Callable[[Image.Image], "torch.Tensor"],
        batch_size: int,
        on_bad_image: str | None = None,
        workers: int = 0,
        pin_memory: bool = False,
        idle_workers: bool = False,
        keep_workers: bool = False,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, not {batch_size}")
        if workers < 0:
            raise DataError(f"workers must be at least 0, not {workers}")
        dataset._check_part(split.part)
        self.dataset = dataset
        self.split = split
        self.transform = transform
        self.batch_size = batch_size
        self.on_bad_image = check_on_bad_image(on_bad_image or dataset.on_bad_image)
        self.workers = workers
        self.pin_memory = pin_memory
        self.idle_workers = idle_workers
        self.keep_workers = keep_workers
        self.bad_images: list[dict] = []
        self._kept_loader: "DataLoader | None" = None
        self._kept_loader_busy = False

    def __len__(self) -> int:
        """Number of batches when no image is skipped (an upper bound otherwise)."""
        return -(-len(self.split) // self.batch_size)

    def subset(self, start: int, stop: int) -> "ImageBatches":
        """The same reader over rows ``start:stop`` of the split."""
        rows = Split(self.split.part, self.split.indices[start:stop])
        return ImageBatches(self.dataset, rows, self.transform, self.batch_size, self.on_bad_image, self.workers,
                            self.pin_memory, self.idle_workers, self.keep_workers)

    def __iter__(self) -> Iterator[tuple["torch.Tensor", "torch.Tensor", np.ndarray]]:
        """Yield ``(images [B, 3, H, W], int64 labels [B], int64 indices [B])``."""
        if self._kept_loader_busy:
            raise RuntimeError("this reader keeps its workers, and another iteration over it is still running; "
                               "finish or close that one first")
        self.bad_images = []
        labels = self.dataset.labels(self.split.part)
        loader = self._loader() if self._kept_loader is None else self._kept_loader
        self._kept_loader_busy = self.keep_workers
        try:
            yield from self._batches(loader, labels)
        finally:
            self._kept_loader_busy = False

    def _batches(self, loader: "DataLoader", labels: np.ndarray) -> Iterator[tuple["torch.Tensor", "torch.Tensor", np.ndarray]]:
        """Exact batches in split order from ``loader``'s chunks (see the class docstring)."""
        import torch

        pending: list[torch.Tensor] = []  # good images decoded and not yet batched, in split order
        kept: list[int] = []
        for chunk_indices, chunk_images, bad in loader:
            for index, error in bad:
                if self.on_bad_image == "fail":
                    raise error
                self.bad_images.append({
                    "sample": self.dataset.describe_sample(self.split.part, index),
                    "index": index,
                    "reason": error.reason,
                })
            if chunk_images is None:
                continue
            pending.append(chunk_images)
            kept.extend(chunk_indices)
            while len(kept) >= self.batch_size:
                images = pending[0] if len(pending) == 1 else torch.cat(pending)
                yield self._batch(images[:self.batch_size], labels, kept[:self.batch_size])
                pending = [images[self.batch_size:]] if len(kept) > self.batch_size else []
                kept = kept[self.batch_size:]
        if kept:
            yield self._batch(pending[0] if len(pending) == 1 else torch.cat(pending), labels, kept)

    def _loader(self) -> "DataLoader":
        """A DataLoader of :class:`_Decoded` chunks (kept for the next iteration with ``keep_workers``)."""
        from torch.utils.data import DataLoader

        workers = self.workers if len(self) > 1 else 0
        loader = DataLoader(_Decoded(self), batch_size=self.batch_size, collate_fn=_stack_chunk, num_workers=workers,
                            worker_init_fn=_idle_priority if self.idle_workers else None,
                            persistent_workers=self.keep_workers and workers > 0)
        if self.keep_workers:
            self._kept_loader = loader
        return loader

    def _batch(
        self, batch: "torch.Tensor", labels: np.ndarray, kept: list[int]
    ) -> tuple["torch.Tensor", "torch.Tensor", np.ndarray]:
        import torch

        indices = np.array(kept, dtype=np.int64)
        return batch.pin_memory() if self.pin_memory else batch, torch.from_numpy(labels[indices].astype(np.int64)), indices
