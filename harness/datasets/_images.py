"""Decode one image file to RGB, turning every failure into a BadImageError."""

from __future__ import annotations

import os

from PIL import Image, UnidentifiedImageError

from harness.datasets._base import BadImageError

# Lower-case suffixes of files treated as samples; anything else in a folder is ignored.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
)


def is_image_name(name: str) -> bool:
    """True for a non-hidden file name with an image extension (any case)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def load_rgb(path: str) -> Image.Image:
    """Fully decode ``path`` and return it as an RGB image.

    The format is detected from the content, not the name (ImageNet has PNGs
    named .JPEG). CMYK, greyscale, palette and RGBA images are converted.
    ``img.load()`` decodes eagerly so that a truncated file fails here (PIL's
    ``LOAD_TRUNCATED_IMAGES`` is left False) instead of yielding a partial image.

    Raises:
        BadImageError: empty, truncated, corrupt or not an image at all.
    """
    try:
        if os.path.getsize(path) == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image PIL can identify") from None
    except FileNotFoundError:
        raise BadImageError(path, "file no longer exists") from None
    # PIL's format plugins raise many exception types on corrupt data (OSError,
    # SyntaxError, ValueError, struct.error, ...): all mean "this file is bad".
    except Exception as exc:
        raise BadImageError(path, f"truncated or corrupt ({type(exc).__name__}: {exc})") from None
