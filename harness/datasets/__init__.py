"""Datasets: a registry of labelled image datasets with deterministic splits.

Built in: ``embedded`` and ``fashion-mnist`` (:mod:`.fashion_mnist`),
``imagefolder`` (:mod:`.imagefolder`) and ``imagenet`` (:mod:`.imagenet`).
Other packages add datasets through the ``harness.datasets`` entry-point group
or with :func:`register_dataset`.

Example:
    >>> from torchvision.transforms import ToTensor
    >>> ds = create_dataset("embedded")
    >>> splits = ds.splits(seed=0)
    >>> for images, labels, indices in ImageBatches(ds, splits["gate"], ToTensor(), 256):
    ...     ...
"""

from harness._registry import UnknownNameError
from harness.datasets._base import BadImageError, Dataset, Split
from harness.datasets._batches import ImageBatches
from harness.datasets._factory import DATASETS, create_dataset, list_datasets, register_dataset

__all__ = [
    "BadImageError",
    "DATASETS",
    "Dataset",
    "ImageBatches",
    "Split",
    "UnknownNameError",
    "create_dataset",
    "list_datasets",
    "register_dataset",
]
