"""``imagefolder``: any folder with one sub-folder of images per class.

Class = sub-folder name (sorted order = class index), with "_" shown as " ".
One part, ``all``. Splits: ``test`` is a fixed fraction drawn with a constant
seed (it never changes with the run's seed); ``heads`` and ``gate`` are drawn
from the remaining samples with the run's seed.

Symlinks are followed, but each real image file is counted once (loops and
duplicate paths are skipped, with a note on stderr), so no file can be in two
splits. A class folder without images is refused unless
``allow_empty_classes=True``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from harness.errors import DataError

from harness.datasets._base import Dataset, seeded_draw
from harness.datasets._factory import register_dataset
from harness.datasets._images import IMAGE_EXTENSIONS, is_image_name, load_rgb

PART = "all"
TEST_SEED = 0  # constant: the test split must be the same for every run seed

GENERIC_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
)


def _sub_folders(root: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``root``."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _is_utf8(name: str) -> bool:
    """False for a name whose bytes are not UTF-8 (os.listdir keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class _Scan:
    """Image files of each class folder, every real file counted once.

    Symlinks are followed (datasets are often symlinked in), but a link back into
    one of its own ancestors (a loop) is cut, and a path to a file or folder that
    is already counted is skipped: otherwise copies of one file land in several
    splits. A path into another class folder belongs to that class; a real file
    outside every class folder goes to the first class that reaches it (class
    folders in sorted order, each walked in sorted order).
    """

    def __init__(self, root: Path, folders: list[str]) -> None:
        self.root = root
        self.class_of: dict[str, int] = {}  # real path of a class folder -> its label
        for label, folder in enumerate(folders):
            self.class_of.setdefault(os.path.realpath(root / folder), label)
        self.seen: set[str] = set()  # real paths of the files and folders counted so far
        self.loops: list[str] = []  # skipped links, relative to root
        self.duplicates: list[str] = []
        self.files = [self._class_files(root / folder, label) for label, folder in enumerate(folders)]

    def _owner(self, real: str) -> int | None:
        """Label of the class folder that really holds ``real``, if any."""
        while real not in self.class_of:
            parent = os.path.dirname(real)
            if parent == real:
                return None
            real = parent
        return self.class_of[real]

    def _take(self, path: str, real: str, label: int) -> bool:
        """Count ``path`` in class ``label`` unless its real target is counted or belongs elsewhere."""
        if real in self.seen or self._owner(real) not in (None, label):
            self.duplicates.append(Path(path).relative_to(self.root).as_posix())
            return False
        self.seen.add(real)
        return True

    def _class_files(self, top: Path, label: int) -> list[Path]:
        real_top = os.path.realpath(top)
        if not self._take(str(top), real_top, label):
            return []
        ancestors = {str(top): (real_top, frozenset([real_top]))}  # dirpath -> (its real path, the walk's)
        found = []
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            real_dir, chain = ancestors.pop(dirpath)
            kept = []
            for name in sorted(d for d in dirnames if not d.startswith(".")):
                path = os.path.join(dirpath, name)
                real = os.path.realpath(path)
                if real in chain:
                    self.loops.append(Path(path).relative_to(self.root).as_posix())
                elif self._take(path, real, label):
                    kept.append(name)
                    ancestors[path] = (real, chain | {real})
            dirnames[:] = kept  # os.walk descends into these only, in this order
            for name in sorted(f for f in filenames if is_image_name(f)):
                path = os.path.join(dirpath, name)
                # one lstat instead of a full realpath for the usual plain file
                real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_dir, name)
                if self._take(path, real, label):
                    found.append(Path(path))
        return sorted(found)

    def note(self, dataset: str) -> str | None:
        """One line for stderr saying what was skipped, or None if nothing was."""
        skipped = [
            _plural(len(paths), kind) for paths, kind in
            ((self.loops, "symlink loop"), (self.duplicates, "duplicate path")) if paths
        ]
        if not skipped:
            return None
        examples = ", ".join(paths[0] for paths in (self.loops, self.duplicates) if paths)
        return (
            f"note: {dataset}: skipped {' and '.join(skipped)} under {self.root} (e.g. {examples}); "
            f"each real image file counts once (in the class folder holding it, else the first linking to it)"
        )


@dataclass(frozen=True, eq=False)
class ClassFolder:
    """One scanned folder of class sub-folders: its image files and their labels.

    Attributes:
        root: the folder.
        folders: the class sub-folders, sorted (= label order).
        files: image paths relative to ``root``, class by class.
        labels: the int64 label of each file.
        skipped: what the scan left out, paths relative to root (see :class:`_Scan`).
    """

    root: Path
    folders: list[str]
    files: list[str]
    labels: np.ndarray
    skipped: dict[str, list[str]]

    def path(self, index: int) -> Path:
        return self.root / self.files[index]

    def content_chunks(self) -> Iterator[bytes]:
        """Class folder names, then each file's path, size and mtime."""
        # os.fsencode gives back a name's bytes as on disk, also when they are not UTF-8;
        # for UTF-8 names it equals str.encode(), so existing fingerprints stay the same
        yield b"\n".join(map(os.fsencode, self.folders)) + b"\0"
        for rel in self.files:
            try:
                st = os.stat(self.root / rel)
                yield os.fsencode(rel) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
            except FileNotFoundError:  # removed since the scan; read_image will report it
                yield os.fsencode(rel) + b"\0missing\n"


def existing_folder(root: str | Path | None, dataset: str, flag: str = "--data-root") -> Path:
    """``root`` as a Path, or a one-line error naming ``flag`` when it is missing or not a folder."""
    if root is None:
        raise DataError(f"dataset {dataset!r} needs {flag} DIR (a folder with one sub-folder per class)")
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"{flag.lstrip('-').replace('-', ' ')} {path} for dataset {dataset!r} is not an "
                                f"existing folder; pass {flag} DIR")
    return path


def scan_class_folder(root: Path, folders: list[str], dataset: str, allow_empty_classes: bool,
                      empty_class_fix: str, flag: str = "--data-root") -> ClassFolder:
    """The image files of each of ``folders`` under ``root`` (see :class:`_Scan`), with the checks every
    class folder gets: at least one image, and no empty class folder unless ``allow_empty_classes``."""
    scan = _Scan(root, folders)
    note = scan.note(dataset)
    if note:
        print(note, file=sys.stderr)
    files = [f.relative_to(root).as_posix() for class_files in scan.files for f in class_files]
    if not files:
        raise DataError(
            f"no images found in {root}: expected one sub-folder per class holding "
            f"{'/'.join(sorted(IMAGE_EXTENSIONS))} files; pass {flag} DIR"
        )
    empty = [folder for folder, class_files in zip(folders, scan.files) if not class_files]
    if empty and not allow_empty_classes:
        raise DataError(
            f"{_plural(len(empty), 'class folder')} {'holds' if len(empty) == 1 else 'hold'} no images: "
            f"{', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''} in {root}; each would be a class "
            f"no sample has: {empty_class_fix}, or keep them with --allow-empty-classes (allow_empty_classes=True)"
        )
    labels = np.repeat(np.arange(len(folders), dtype=np.int64), [len(class_files) for class_files in scan.files])
    labels.setflags(write=False)
    return ClassFolder(root, folders, files, labels, {"symlink loops": scan.loops, "duplicate paths": scan.duplicates})


@register_dataset("imagefolder")
class ImageFolder(Dataset):
    """Any folder with one sub-folder of images per class (--data-root DIR)."""

    #: how to fill or drop the class folders without images (the empty-classes error ends with it)
    empty_class_fix = "add images or remove the empty folders"

    def __init__(
        self,
        root: str | Path | None = None,
        on_bad_image: str = "skip",
        test_fraction: float = 0.5,
        heads_fraction: float = 0.3,
        gate_fraction: float = 0.2,
        allow_empty_classes: bool = False,
    ) -> None:
        """
        Args:
            root: the folder holding one sub-folder per class.
            on_bad_image: "skip" or "fail", see :func:`harness.datasets.create_dataset`.
            test_fraction, heads_fraction, gate_fraction: share of all samples in
                each split; each in (0, 1], together at most 1.
            allow_empty_classes: keep class folders without images as classes
                (zero-shot candidates no sample has); refused by default, as in
                torchvision's ImageFolder.

        Raises:
            DataError, FileNotFoundError: bad fractions, no ``root``, no images
                in it, empty class folders, or a class folder name that is not UTF-8.
        """
        super().__init__(on_bad_image)
        self.fractions = {"test": test_fraction, "heads": heads_fraction, "gate": gate_fraction}
        if not all(0 < f <= 1 for f in self.fractions.values()) or sum(self.fractions.values()) > 1 + 1e-9:
            raise DataError(f"split fractions must each be in (0, 1] and sum to at most 1, got {self.fractions}")
        self.root = existing_folder(root, self.name)
        folders = _sub_folders(self.root)
        self.classnames, self.templates = self._class_metadata(folders)
        self.allow_empty_classes = allow_empty_classes
        #: the scanned folder behind each part
        self.folders: dict[str, ClassFolder] = {PART: self._scan(self.root, folders)}
        #: what the scan left out, paths relative to root (see :class:`_Scan`)
        self.skipped = self.folders[PART].skipped

    def _scan(self, root: Path, folders: list[str], flag: str = "--data-root") -> ClassFolder:
        return scan_class_folder(root, folders, self.name, self.allow_empty_classes, self.empty_class_fix, flag)

    def _class_metadata(self, folders: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(class names, templates) for the class ``folders``; subclasses validate here."""
        undecodable = [f for f in folders if not _is_utf8(f)]
        if undecodable:
            shown = os.fsencode(undecodable[0]).decode("utf-8", "backslashreplace")
            raise DataError(
                f"class folder {shown} in {self.root} has a name that is not valid UTF-8, so it cannot be "
                f"a class name in the zero-shot prompts; rename it to UTF-8 (e.g. with convmv)"
            )
        return tuple(f.replace("_", " ") for f in folders), GENERIC_TEMPLATES

    @property
    def protocol(self) -> str:
        shares = ", ".join(f"{name} {100 * share:g}%" for name, share in self.fractions.items())
        return f"one folder, split by share of its images: {shares} (test drawn with a fixed seed)"

    def parts(self) -> dict[str, int]:
        return {part: len(folder.files) for part, folder in self.folders.items()}

    def labels(self, part: str) -> np.ndarray:
        self._check_part(part)
        return self.folders[part].labels

    def read_image(self, part: str, index: int) -> Image.Image:
        return load_rgb(self.describe_sample(part, index))

    def describe_sample(self, part: str, index: int) -> str:
        self._check_part(part)
        return str(self.folders[part].path(index))

    def _content_chunks(self, part: str) -> Iterator[bytes]:
        return self.folders[part].content_chunks()

    def _draws(self, seed: int) -> dict[str, tuple[str, np.ndarray]]:
        n = len(self.folders[PART].files)
        sizes = {name: int(f * n + 1e-9) for name, f in self.fractions.items()}
        if min(sizes.values()) == 0:
            raise DataError(f"{n} images in {self.root} are too few for split sizes {sizes}")
        (test,) = seeded_draw(n, TEST_SEED, (sizes["test"],))
        rest = np.setdiff1d(np.arange(n), test)
        heads, gate = seeded_draw(len(rest), seed, (sizes["heads"], sizes["gate"]))
        return {"heads": (PART, rest[heads]), "gate": (PART, rest[gate]), "test": (PART, test)}
