"""Synthetic ImageNet-layout folders, for timing and memory checks offline (``python -m harness synth-imagenet``).

The images are seeded random content, not photographs: a coarse random colour
grid, smoothly upsampled, plus pixel noise, saved as JPEG at ImageNet's usual
size (500 x 375), so decoding costs what a real val image costs. Labels mean
nothing; accuracy on such a folder is chance.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from PIL import Image

from harness.errors import DataError

NUM_CLASSES = 1000


def wnids(count: int = NUM_CLASSES) -> list[str]:
    """Folder names in the WordNet-id pattern (not real synsets): n00000000, n00000001, ..."""
    return [f"n{c:08d}" for c in range(count)]


def synthetic_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """One random RGB image of ``size`` (width, height): a smooth colour field with pixel noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-24, 25, (size[1], size[0], 3), dtype=np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def _write_class(root: Path, wnid: str, index: int, per_class: int, size: tuple[int, int], seed: int) -> None:
    """One class folder; its images depend on ``(seed, index)`` alone, so any worker count writes the same files."""
    rng = np.random.default_rng([seed, index])
    folder = root / wnid
    folder.mkdir(parents=True)
    for i in range(per_class):
        synthetic_image(rng, size).save(folder / f"{wnid}_{i}.JPEG", quality=90)


def write_imagenet_layout(root: str | Path, per_class: int, size: tuple[int, int] = (500, 375), seed: int = 0,
                          classes: int = NUM_CLASSES, progress: bool = False, workers: int = 0) -> int:
    """Write ``classes`` WordNet-id folders under ``root`` with ``per_class`` JPEGs each; return the count.

    ``workers`` processes write the class folders (0: this process); the files are the same for any count.

    Raises:
        DataError: ``root`` exists and is not empty (nothing is ever overwritten), or ``classes`` or
            ``per_class`` is below 1.
    """
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    root = Path(root)
    if classes < 1 or per_class < 1:
        raise DataError(f"a synthetic folder needs at least 1 class and 1 image per class, not {classes} and {per_class}")
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root} is not empty; pass a new folder")
    columns = zip(*[(root, wnid, index, per_class, size, seed) for index, wnid in enumerate(wnids(classes))])
    pool = ProcessPoolExecutor(workers) if workers else contextlib.nullcontext()
    # a class that fails ends the map: its iterator cancels the classes not yet started
    with pool, tqdm(total=classes, desc=f"write {root}", unit="class", disable=not progress) as bar:
        for _ in pool.map(_write_class, *columns, chunksize=8) if workers else map(_write_class, *columns):
            bar.update()
    return classes * per_class
