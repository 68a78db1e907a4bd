"""The dataset registry and the public ``create_dataset`` / ``list_datasets``."""

from __future__ import annotations

from typing import Callable, TypeVar

from harness._registry import Registry
from harness.datasets._base import Dataset, check_on_bad_image

D = TypeVar("D", bound=type[Dataset])

DATASETS: Registry[Callable[..., Dataset]] = Registry(
    "dataset",
    entry_point_group="harness.datasets",
    builtin_modules=(
        "harness.datasets.fashion_mnist",
        "harness.datasets.imagefolder",
        "harness.datasets.imagenet",
    ),
)


def register_dataset(name: str, description: str = "") -> Callable[[D], D]:
    """Class decorator: register a :class:`Dataset` subclass as ``name`` and set its ``name``.

    A plugin class is built as ``cls(root=..., on_bad_image=...)``.
    """

    def decorator(cls: D) -> D:
        cls.name = name
        return DATASETS.register(name, description)(cls)

    return decorator


def create_dataset(name: str, root: str | None = None, on_bad_image: str = "skip") -> Dataset:
    """Build the dataset registered as ``name``.

    Args:
        name: a registered name, see :func:`list_datasets`.
        root: where the data lives (``--data-root``); None means the dataset's default.
        on_bad_image: "skip" (skip and report undecodable images) or "fail";
            the default policy of :class:`ImageBatches` over this dataset.

    Raises:
        UnknownNameError: ``name`` is not registered (lists the known names).
        FileNotFoundError, ValueError: the data is missing or malformed; the
            one-line message names the path and the fix.

    Example:
        >>> ds = create_dataset("embedded")
        >>> ds.parts()
        {'holdout': 15000, 'test': 10000}
    """
    factory = DATASETS.get(name)
    dataset = factory(root=root, on_bad_image=check_on_bad_image(on_bad_image))
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"dataset plugin {name!r} returned {type(dataset).__name__}, "
            f"not a harness.datasets.Dataset subclass"
        )
    return dataset


def list_datasets() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every registered dataset, sorted by name."""
    return DATASETS.describe()
