"""The dataset registry and the public ``create_dataset`` / ``list_datasets``."""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from harness._registry import Registry
from harness.datasets._base import Dataset, check_on_bad_image
from harness.errors import ConfigError

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

    A plugin class is built as ``cls(root=..., on_bad_image=..., **options)``,
    ``options`` being whatever dataset-specific keywords the caller passed to
    :func:`create_dataset` (none by default).
    """

    def decorator(cls: D) -> D:
        cls.name = name
        return DATASETS.register(name, description)(cls)

    return decorator


def create_dataset(name: str, root: str | None = None, on_bad_image: str = "skip", **options: Any) -> Dataset:
    """Build the dataset registered as ``name``.

    Args:
        name: a registered name, see :func:`list_datasets`.
        root: where the data lives (``--data-root``); None means the dataset's default.
        on_bad_image: "skip" (skip and report undecodable images) or "fail";
            the default policy of :class:`ImageBatches` over this dataset.
        options: dataset-specific keywords, passed on to the dataset's
            constructor, e.g. ``allow_empty_classes=True`` or ``test_fraction=0.2``
            for ``imagefolder`` and ``imagenet``.

    Raises:
        UnknownNameError: ``name`` is not registered (lists the known names).
        ConfigError: an option the dataset does not take (lists the ones it takes).
        FileNotFoundError, DataError: the data is missing or malformed; the
            one-line message names the path and the fix.

    Example:
        >>> ds = create_dataset("embedded")
        >>> ds.parts()
        {'holdout': 15000, 'test': 10000}
        >>> ds = create_dataset("imagefolder", "photos/", allow_empty_classes=True)
    """
    factory = DATASETS.get(name)
    _check_options(name, factory, options)
    dataset = factory(root=root, on_bad_image=check_on_bad_image(on_bad_image), **options)
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"dataset plugin {name!r} returned {type(dataset).__name__}, "
            f"not a harness.datasets.Dataset subclass"
        )
    return dataset


def _check_options(name: str, factory: Callable[..., Dataset], options: dict[str, Any]) -> None:
    """Refuse keywords ``factory`` does not take, as a ConfigError instead of a TypeError traceback."""
    if not options:
        return
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [p for p in params if p not in ("root", "on_bad_image")]
    for key in options:
        if key not in known:
            raise ConfigError(
                f"dataset {name!r} has no option {key!r} (--{key.replace('_', '-')}); its options: {', '.join(known) or 'none'}"
            )


def list_datasets() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every registered dataset, sorted by name."""
    return DATASETS.describe()
