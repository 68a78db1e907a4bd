"""``imagenet``: the ImageNet-1k val folder with open_clip's class names and templates.

The standard layout: ``val/n01440764/*.JPEG`` ..., one sub-folder per WordNet
id, whose sorted order is the standard class order. Splits as ``imagefolder``.
"""

from __future__ import annotations

import re

from harness.errors import DataError

from harness.datasets._factory import register_dataset
from harness.datasets.imagefolder import ImageFolder

NUM_CLASSES = 1000
WNID = re.compile(r"n\d{8}")


@register_dataset("imagenet")
class ImageNet(ImageFolder):
    """ImageNet-1k val folder, one sub-folder per WordNet id (--data-root DIR)."""

    empty_class_fix = "extract the missing val images (50 per class) into them"

    def _class_metadata(self, folders: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        others = [f for f in folders if not WNID.fullmatch(f)]
        if len(folders) != NUM_CLASSES or others:
            loose = sum(1 for p in self.root.iterdir() if p.is_file())
            raise DataError(
                f"{self.root} is not an ImageNet val folder: expected {NUM_CLASSES} sub-folders named "
                f"like n01440764, found {len(folders)} sub-folders ({len(folders) - len(others)} "
                f"WordNet ids{', others: ' + ', '.join(others[:3]) if others else ''}) and {loose} "
                f"files directly inside; sort val images into one folder per class and pass --data-root"
            )
        # Heavy import (torch): only when an ImageNet dataset is actually built.
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

        return tuple(IMAGENET_CLASSNAMES), tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
