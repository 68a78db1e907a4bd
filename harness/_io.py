"""Small file helpers: content digests and atomic writes."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks (``sha256`` or ``blake2b``)."""
    digest = hashlib.blake2b(digest_size=16) if algorithm == "blake2b" else hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; if the block succeeds it replaces ``path`` atomically.

    Readers never see a half-written file; on error the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``); a no-op elsewhere.

    A long loop of large tensors leaves glibc holding freed pages: after the
    first large block is freed it raises its mmap threshold and serves later
    blocks from a heap that fragments, so resident memory creeps up with the
    number of batches though nothing is kept.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> "ctypes.CDLL | None":
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (musl and non-Linux libcs lack it)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()
