"""harness.datasets: registry, splits, fingerprints, bad images, batching (real files)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torchvision.transforms import Compose, Resize, ToTensor

from harness import embedded
from harness._registry import UnknownNameError
from harness.datasets import (
    BadImageError,
    Dataset,
    ImageBatches,
    Split,
    create_dataset,
    list_datasets,
)
from harness.datasets import fashion_mnist
from harness.errors import DataError

TINY = Compose([Resize((8, 8)), ToTensor()])
HAVE_IDX = all((fashion_mnist.DEFAULT_DIR / n).is_file() for p in fashion_mnist.FILES.values() for n in p)


def _noise(size: int = 64, seed: int = 0) -> Image.Image:
    """Random RGB noise: compresses badly, so a half-cut file loses real image data."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _write_folder(root: Path, per_class: dict[str, int]) -> Path:
    for cls, count in per_class.items():
        (root / cls).mkdir(parents=True)
        for i in range(count):
            _noise(16, seed=i).save(root / cls / f"{i:03d}.png")
    return root


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def emb() -> Dataset:
    return create_dataset("embedded")


@pytest.fixture(scope="module")
def npz() -> dict[str, np.ndarray]:
    with np.load(embedded.DATA_PATH) as data:
        return {k: data[k] for k in data.files}


def _assert_disjoint(splits: dict[str, Split]) -> None:
    seen: set[tuple[str, int]] = set()
    for split in splits.values():
        keys = {(split.part, int(i)) for i in split.indices}
        assert len(keys) == len(split)  # no duplicates inside a split either
        assert not keys & seen
        seen |= keys


def _assert_seed_behaviour(ds: Dataset) -> None:
    a, again, other = ds.splits(0), ds.splits(0), ds.splits(1)
    for name in ("heads", "gate", "test"):
        assert a[name].part == again[name].part
        np.testing.assert_array_equal(a[name].indices, again[name].indices)
    assert not np.array_equal(a["heads"].indices, other["heads"].indices)
    assert not np.array_equal(a["gate"].indices, other["gate"].indices)
    np.testing.assert_array_equal(a["test"].indices, other["test"].indices)


# --- registry -------------------------------------------------------------


def test_list_datasets_has_builtins_with_descriptions() -> None:
    listed = dict(list_datasets())
    assert {"embedded", "fashion-mnist", "imagefolder", "imagenet"} <= set(listed)
    assert all(listed[n] for n in ("embedded", "fashion-mnist", "imagefolder", "imagenet"))


def test_unknown_dataset_suggests_and_lists_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        create_dataset("imagenett")
    message = str(info.value)
    assert "Did you mean 'imagenet'" in message
    assert "Available: embedded, fashion-mnist, imagefolder, imagenet" in message


def test_bad_on_bad_image_value_is_rejected() -> None:
    with pytest.raises(ValueError, match="on_bad_image must be one of skip, fail"):
        create_dataset("embedded", on_bad_image="ignore")


# --- Fashion-MNIST (embedded and IDX) -------------------------------------


def test_embedded_parts_labels_images_match_npz(emb: Dataset, npz: dict[str, np.ndarray]) -> None:
    assert emb.parts() == {"holdout": embedded.HOLDOUT_SIZE, "test": 10_000}
    assert emb.classnames == fashion_mnist.CLASSES and len(emb.classnames) == 10
    assert all("{}" in t for t in emb.templates)
    for part in ("holdout", "test"):
        labels = emb.labels(part)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(labels, npz[f"{part}_labels"])
        img = emb.read_image(part, 7)
        assert img.mode == "RGB" and img.size == (28, 28)
        rgb = np.asarray(img)
        for channel in range(3):
            np.testing.assert_array_equal(rgb[..., channel], npz[f"{part}_images"][7])
    np.testing.assert_array_equal(npz["holdout_train_index"], fashion_mnist.holdout_indices(60_000))
    assert "holdout_images[7]" in emb.describe_sample("holdout", 7)


def test_fashion_splits_sizes_disjoint_and_seeded(emb: Dataset) -> None:
    splits = emb.splits(seed=0)
    assert {k: (s.part, len(s)) for k, s in splits.items()} == {
        "heads": ("holdout", 10_000), "gate": ("holdout", 5_000), "test": ("test", 10_000),
    }
    _assert_disjoint(splits)
    _assert_seed_behaviour(emb)
    np.testing.assert_array_equal(splits["test"].indices, np.arange(10_000))
    assert all(s.indices.dtype == np.int64 and np.all(np.diff(s.indices) > 0) for s in splits.values())
    with pytest.raises(ValueError):
        splits["heads"].indices[0] = 1  # read-only


def test_limit_caps_each_split_and_stays_deterministic(emb: Dataset) -> None:
    limited = emb.splits(seed=3, limit=50)
    assert [len(s) for s in limited.values()] == [50, 50, 50]
    full = emb.splits(seed=3)
    for name, split in limited.items():
        assert set(split.indices) <= set(full[name].indices)
        np.testing.assert_array_equal(split.indices, emb.splits(seed=3, limit=50)[name].indices)
    np.testing.assert_array_equal(limited["test"].indices, emb.splits(seed=4, limit=50)["test"].indices)
    with pytest.raises(ValueError, match="limit"):
        emb.splits(seed=0, limit=0)


def test_unknown_part_error_lists_parts(emb: Dataset) -> None:
    with pytest.raises(ValueError, match="parts: holdout, test"):
        emb.fingerprint("train")


@pytest.mark.skipif(not HAVE_IDX, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_idx_matches_embedded(emb: Dataset) -> None:
    fm = create_dataset("fashion-mnist")
    assert fm.parts() == emb.parts()
    for part in ("holdout", "test"):
        assert fm.fingerprint(part) == emb.fingerprint(part)
        np.testing.assert_array_equal(fm.labels(part), emb.labels(part))
    assert fm.fingerprint("holdout") != fm.fingerprint("test")
    assert np.array_equal(np.asarray(fm.read_image("holdout", 11)), np.asarray(emb.read_image("holdout", 11)))
    for name, split in fm.splits(5).items():
        np.testing.assert_array_equal(split.indices, emb.splits(5)[name].indices)
    assert fm.describe_sample("holdout", 0).endswith(
        f"train-images-idx3-ubyte.gz[{fashion_mnist.holdout_indices(60_000)[0]}]"
    )


def test_fashion_mnist_missing_root_names_path_and_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        create_dataset("fashion-mnist", root=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and "dataset-fashion-mnist" in message
    assert "--data-root" in message and "\n" not in message


def test_embedded_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        create_dataset("embedded", root=str(tmp_path / "missing.npz"))


# --- imagefolder ------------------------------------------------------------


def test_imagefolder_classes_labels_and_ignored_files(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "data", {"golden_retriever": 3, "cat": 2})
    (root / "cat" / ".hidden.png").write_bytes(b"")  # hidden: not a sample
    (root / "cat" / "notes.txt").write_text("not an image")  # unknown extension: ignored
    (root / ".cache").mkdir()  # hidden folder: not a class
    (root / "cat" / "nested").mkdir()
    _noise(16).save(root / "cat" / "nested" / "UPPER.PNG")  # recursive, any case
    ds = create_dataset("imagefolder", root=str(root))
    assert ds.classnames == ("cat", "golden retriever")
    assert ds.parts() == {"all": 6}
    np.testing.assert_array_equal(ds.labels("all"), [0, 0, 0, 1, 1, 1])
    assert ds.describe_sample("all", 2).endswith(os.path.join("cat", "nested", "UPPER.PNG"))
    assert "a photo of a {}." in ds.templates


def test_imagefolder_splits_fractions_disjoint_seeded(tmp_path: Path) -> None:
    ds = create_dataset("imagefolder", root=str(_write_folder(tmp_path, {"a": 20, "b": 20})))
    splits = ds.splits(seed=0)
    assert {k: (s.part, len(s)) for k, s in splits.items()} == {
        "heads": ("all", 12), "gate": ("all", 8), "test": ("all", 20),
    }
    _assert_disjoint(splits)
    _assert_seed_behaviour(ds)
    assert [len(s) for s in ds.splits(seed=0, limit=5).values()] == [5, 5, 5]


def test_imagefolder_custom_fractions(tmp_path: Path) -> None:
    from harness.datasets.imagefolder import ImageFolder

    root = _write_folder(tmp_path, {"a": 10})
    ds = ImageFolder(root, test_fraction=0.2, heads_fraction=0.5, gate_fraction=0.1)
    assert [len(s) for s in ds.splits(0).values()] == [5, 1, 2]
    with pytest.raises(ValueError, match="fractions"):
        ImageFolder(root, test_fraction=0.6, heads_fraction=0.3, gate_fraction=0.2)


def test_imagefolder_missing_or_empty_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--data-root"):
        create_dataset("imagefolder")
    with pytest.raises(FileNotFoundError) as info:
        create_dataset("imagefolder", root=str(tmp_path / "absent"))
    assert str(tmp_path / "absent") in str(info.value) and "--data-root" in str(info.value)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images found in .*empty"):
        create_dataset("imagefolder", root=str(tmp_path / "empty"))


def test_fingerprint_changes_when_a_file_is_added_and_is_cached(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, {"a": 2, "b": 2})
    first = create_dataset("imagefolder", root=str(root))
    before = first.fingerprint("all")
    assert len(before) == 64 and before == create_dataset("imagefolder", root=str(root)).fingerprint("all")
    _noise(16, seed=9).save(root / "b" / "new.png")
    assert create_dataset("imagefolder", root=str(root)).fingerprint("all") != before
    os.utime(root / "a" / "000.png", ns=(1, 1))
    assert first.fingerprint("all") == before  # cached on the instance


# --- bad images -------------------------------------------------------------


@pytest.fixture()
def mixed_folder(tmp_path: Path) -> Path:
    """Class "bad": four undecodable files; class "good": odd but valid images."""
    bad, good = tmp_path / "bad", tmp_path / "good"
    bad.mkdir()
    good.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    _noise(seed=1).save(bad / "trunc.jpg", quality=95)
    _truncate(bad / "trunc.jpg")
    _noise(seed=2).save(bad / "trunc.png")
    _truncate(bad / "trunc.png")
    (bad / "text.jpg").write_text("this is not a JPEG\n" * 20)
    Image.new("CMYK", (20, 12), (0, 255, 255, 0)).save(good / "cmyk.jpg")
    Image.new("L", (20, 12), 128).save(good / "grey.png")
    Image.new("RGB", (20, 12), (255, 0, 0)).convert("P").save(good / "palette.png")
    Image.new("RGBA", (20, 12), (0, 0, 255, 100)).save(good / "rgba.png")
    Image.new("RGB", (20, 12), (0, 255, 0)).save(good / "png_named.JPEG", format="PNG")
    return tmp_path


def test_odd_but_valid_images_load_as_rgb(mixed_folder: Path) -> None:
    ds = create_dataset("imagefolder", root=str(mixed_folder))
    good = [i for i in range(ds.parts()["all"]) if ds.labels("all")[i] == 1]
    assert len(good) == 5
    for i in good:
        img = ds.read_image("all", i)
        assert img.mode == "RGB" and img.size == (20, 12), ds.describe_sample("all", i)
    red = ds.read_image("all", next(i for i in good if "palette" in ds.describe_sample("all", i)))
    assert red.getpixel((0, 0)) == (255, 0, 0)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_images_are_skipped_and_reported(mixed_folder: Path, workers: int) -> None:
    ds = create_dataset("imagefolder", root=str(mixed_folder))
    split = Split("all", np.arange(ds.parts()["all"]))
    batches = ImageBatches(ds, split, TINY, batch_size=2, workers=workers)
    out = list(batches)
    assert [len(idx) for _, _, idx in out] == [2, 2, 1]  # skipped images are refilled
    kept = np.concatenate([idx for _, _, idx in out])
    np.testing.assert_array_equal(kept, np.arange(4, 9))  # sorted: bad/* (0-3) come first
    reasons = {Path(b["sample"]).name: b["reason"] for b in batches.bad_images}
    assert set(reasons) == {"empty.jpg", "trunc.jpg", "trunc.png", "text.jpg"}
    assert "0 bytes" in reasons["empty.jpg"]
    # PIL's own message: the truncation was detected by decoding, not guessed
    assert "image file is truncated" in reasons["trunc.jpg"]
    assert "image file is truncated" in reasons["trunc.png"]
    assert "not an image" in reasons["text.jpg"]
    assert [b["index"] for b in batches.bad_images] == [0, 1, 2, 3]
    list(batches)  # a second pass does not duplicate the report
    assert len(batches.bad_images) == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_is_refilled_across_decoded_chunks(mixed_folder: Path, workers: int) -> None:
    """Bad images inside chunks: each batch takes the next good images of the following chunks, in order."""
    ds = create_dataset("imagefolder", root=str(mixed_folder))
    whole = {int(i): image for images, _, idx in ImageBatches(ds, Split("all", np.arange(4, 9)), TINY, batch_size=5)
             for i, image in zip(idx, images)}
    batches = ImageBatches(ds, Split("all", np.array([4, 0, 5, 6, 1, 7, 8])), TINY, batch_size=2, workers=workers)
    out = list(batches)
    assert [idx.tolist() for _, _, idx in out] == [[4, 5], [6, 7], [8]]
    for images, _, idx in out:
        assert torch.equal(images, torch.stack([whole[int(i)] for i in idx]))
    assert [b["index"] for b in batches.bad_images] == [0, 1]
    # a chunk with no good image at all, between chunks that have some
    batches = ImageBatches(ds, Split("all", np.array([4, 0, 2, 3, 5, 6])), TINY, batch_size=2, workers=workers)
    assert [idx.tolist() for _, _, idx in batches] == [[4, 5], [6]]
    assert [b["index"] for b in batches.bad_images] == [0, 2, 3]


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_image_fails_when_asked(mixed_folder: Path, workers: int) -> None:
    ds = create_dataset("imagefolder", root=str(mixed_folder), on_bad_image="fail")
    split = Split("all", np.arange(ds.parts()["all"]))
    with pytest.raises(BadImageError) as info:
        list(ImageBatches(ds, split, TINY, batch_size=2, workers=workers))
    assert info.value.path.endswith("empty.jpg") and "empty.jpg" in str(info.value)
    assert info.value.reason == "empty file (0 bytes)"
    # the per-iterator flag overrides the dataset's default
    assert len(list(ImageBatches(ds, split, TINY, batch_size=8, on_bad_image="skip"))) == 1
    for i in range(1, 4):
        with pytest.raises(BadImageError, match=r"trunc\.jpg|trunc\.png|text\.jpg"):
            ds.read_image("all", i)


# --- imagenet ---------------------------------------------------------------


def test_imagenet_rejects_a_wrong_folder(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"n01440764": 1, "cats": 1})
    with pytest.raises(ValueError) as info:
        create_dataset("imagenet", root=str(tmp_path))
    message = str(info.value)
    assert "expected 1000" in message and "found 2 sub-folders" in message and "cats" in message
    assert "\n" not in message


def test_imagenet_layout_uses_open_clip_names(tmp_path: Path) -> None:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    wnids = [f"n{i:08d}" for i in range(1000)]
    for wnid in wnids:
        (tmp_path / wnid).mkdir()
    for wnid in wnids[:4]:
        for i in range(3):
            _noise(8, seed=i).save(tmp_path / wnid / f"ILSVRC2012_val_{i}.JPEG", format="JPEG")
    ds = create_dataset("imagenet", root=str(tmp_path), allow_empty_classes=True)
    assert ds.classnames == tuple(IMAGENET_CLASSNAMES)
    assert len(ds.templates) == 80 and all(t.count("{}") == 1 for t in ds.templates)
    assert ds.templates[0].format("x") == "a bad photo of a x."
    np.testing.assert_array_equal(ds.labels("all"), np.repeat(np.arange(4), 3))
    assert [len(s) for s in ds.splits(0).values()] == [3, 2, 6]


@pytest.fixture(scope="module")
def imagenet_layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A generated ImageNet train + val layout: 1,000 WordNet-id folders each, 3 train and 1 val tiny images."""
    root = tmp_path_factory.mktemp("imagenet")
    pixels = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    for kind, count in (("train", 3), ("val", 1)):
        for c in range(1000):
            folder = root / kind / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels[0, 0] = (c % 256, i, c // 256)  # every file distinct
                Image.fromarray(pixels).save(folder / f"{kind}_{c}_{i}.png")
    return root / "train", root / "val"


def test_imagenet_paper_protocol_draws_heads_and_gate_from_train(imagenet_layout: tuple[Path, Path]) -> None:
    train, val = imagenet_layout
    ds = create_dataset("imagenet", root=str(val), train_root=str(train), heads_fraction=0.1, gate_size=500)
    assert ds.parts() == {"train": 3000, "val": 1000}
    splits = ds.splits(seed=0)
    assert {name: (s.part, len(s)) for name, s in splits.items()} == {
        "heads": ("train", 300), "gate": ("train", 500), "test": ("val", 1000)}
    _assert_disjoint(splits)
    np.testing.assert_array_equal(splits["test"].indices, np.arange(1000))  # test is all of val
    assert ds.describe_sample("train", 0).endswith("train/n00000000/train_0_0.png")
    np.testing.assert_array_equal(ds.labels("val"), np.arange(1000))
    np.testing.assert_array_equal(ds.labels("train"), np.repeat(np.arange(1000), 3))
    other = ds.splits(seed=1)
    assert not np.array_equal(other["heads"].indices, splits["heads"].indices)  # heads and gate follow the seed
    np.testing.assert_array_equal(other["test"].indices, splits["test"].indices)  # test does not
    limited = ds.splits(seed=0, limit=50)
    assert [len(s) for s in limited.values()] == [50, 50, 50]
    assert set(limited["heads"].indices) <= set(splits["heads"].indices)
    assert "paper: heads = 10% of train (300 images), gate = 500" in ds.protocol
    assert "all 1,000 val images" in ds.protocol
    # the train part's fingerprint is its own, and val's stays what val alone gives
    val_only = create_dataset("imagenet", root=str(val))
    assert ds.fingerprint("val") == val_only.fingerprint("all") != ds.fingerprint("train")
    assert val_only.protocol.startswith("val only: ") and [len(s) for s in val_only.splits(0).values()] == [300, 200, 500]


def test_imagenet_paper_protocol_refuses_what_cannot_work(imagenet_layout: tuple[Path, Path], tmp_path: Path) -> None:
    train, val = imagenet_layout
    with pytest.raises(DataError, match="too few for 300 heads \\+ 5000 gate images; lower --heads-fraction"):
        create_dataset("imagenet", root=str(val), train_root=str(train)).splits(0)
    with pytest.raises(DataError, match="needs --train-root"):
        create_dataset("imagenet", root=str(val), gate_size=10)
    with pytest.raises(FileNotFoundError, match="train root .*missing.* is not an existing folder; pass --train-root"):
        create_dataset("imagenet", root=str(val), train_root=str(tmp_path / "missing"))
    (tmp_path / "n01440764").mkdir()
    with pytest.raises(DataError, match="is not an ImageNet train folder.*pass --train-root"):
        create_dataset("imagenet", root=str(val), train_root=str(tmp_path))


# --- batching ---------------------------------------------------------------


def test_image_batches_follow_split_order(emb: Dataset, npz: dict[str, np.ndarray]) -> None:
    split = emb.splits(seed=2, limit=10)["gate"]
    batches = ImageBatches(emb, split, ToTensor(), batch_size=4)
    assert len(batches) == 3
    out = list(batches)
    assert [tuple(x.shape) for x, _, _ in out] == [(4, 3, 28, 28), (4, 3, 28, 28), (2, 3, 28, 28)]
    np.testing.assert_array_equal(np.concatenate([i for _, _, i in out]), split.indices)
    for images, labels, indices in out:
        assert labels.dtype == torch.int64 and indices.dtype == np.int64
        np.testing.assert_array_equal(labels.numpy(), npz["holdout_labels"][indices])
        expected = torch.from_numpy(npz["holdout_images"][indices]).float() / 255
        torch.testing.assert_close(images[:, 0], expected)
    assert batches.bad_images == []


def test_worker_processes_give_the_same_batches(imagenet_layout: tuple[Path, Path], embedded_backbone) -> None:
    """DataLoader workers decode; the batches (composition, order, every value) are those of one process."""
    _, val = imagenet_layout
    ds = create_dataset("imagenet", root=str(val))
    split = ds.splits(seed=0)["test"]
    one, many, idle = (list(ImageBatches(ds, split, embedded_backbone.preprocess, batch_size=64, workers=w,
                                         idle_workers=i)) for w, i in ((0, False), (2, False), (2, True)))
    assert len(one) == len(many) == len(idle) == 8
    for (a, la, ia), (b, lb, ib), (c, lc, ic) in zip(one, many, idle):
        assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(a, c) and torch.equal(la, lc)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ia, ic)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policy")
def test_idle_workers_decode_at_idle_priority(emb: Dataset) -> None:
    """Each image records the scheduling policy of the process that transformed it."""
    def policy(image) -> torch.Tensor:
        return torch.tensor([os.sched_getscheduler(0), os.getpid()])

    split = emb.splits(0, limit=8)["test"]
    for idle, expected in ((True, os.SCHED_IDLE), (False, os.sched_getscheduler(0))):
        (images, _, _), *_ = ImageBatches(emb, split, policy, batch_size=4, workers=2, idle_workers=idle)
        assert images[:, 0].tolist() == [expected] * 4
        assert os.getpid() not in images[:, 1].tolist()  # decoded in worker processes
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # this process keeps its priority


def _decoding_pid(image) -> torch.Tensor:
    return torch.tensor([os.getpid()])


@pytest.mark.parametrize("keep", [False, True])
def test_kept_workers_serve_every_pass_with_the_same_batches(emb: Dataset, keep: bool) -> None:
    """Each image records the process that decoded it: kept workers decode every pass, new ones each pass."""
    split = emb.splits(0, limit=16)["test"]
    batches = ImageBatches(emb, split, _decoding_pid, batch_size=4, workers=2, keep_workers=keep)
    passes = [list(batches) for _ in range(2)]
    pids = [{int(pid) for images, _, _ in one_pass for pid in images[:, 0]} for one_pass in passes]
    assert len(pids[0]) == len(pids[1]) == 2 and os.getpid() not in pids[0] | pids[1]
    assert (pids[0] == pids[1]) is keep
    assert [idx.tolist() for _, _, idx in passes[0]] == [idx.tolist() for _, _, idx in passes[1]]
    assert [idx.tolist() for _, _, idx in batches.subset(4, 12)] == [split.indices[4:8].tolist(),
                                                                     split.indices[8:12].tolist()]
    first = iter(batches)
    next(first)  # one iteration half done
    if keep:  # a second one would share its workers and take batches from it: refused
        with pytest.raises(RuntimeError, match="another iteration over it is still running"):
            next(iter(batches))
        first.close()
    assert [idx.tolist() for _, _, idx in batches] == [idx.tolist() for _, _, idx in passes[0]]


def test_image_batches_reject_wrong_part_and_batch_size(emb: Dataset) -> None:
    with pytest.raises(ValueError, match="no part 'all'"):
        ImageBatches(emb, Split("all", np.arange(3)), ToTensor(), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        ImageBatches(emb, emb.splits(0, limit=3)["test"], ToTensor(), batch_size=0)


def test_a_session_on_the_paper_protocol_traces_test_from_val(imagenet_layout: tuple[Path, Path], tmp_path: Path) -> None:
    """End to end through the session: heads and gate come from train, test is val, the run's record says so."""
    from harness.config import HarnessConfig
    from harness.session import Session

    train, val = imagenet_layout
    session = Session(HarnessConfig(data="imagenet", data_root=str(val), train_root=str(train), heads_fraction=0.01,
                                    gate_size=40, templates="simple", quant="fp32", batch_size=64,
                                    cache_dir=str(tmp_path)), progress=False)
    heads, test = session.trace(None, "heads"), session.trace(None, "test")
    assert (len(heads), len(session.trace(None, "gate")), len(test)) == (30, 40, 1000)
    np.testing.assert_array_equal(test.labels, np.arange(1000))
    assert set(heads.indices) == set(session.splits["heads"].indices)
    described = session.describe()["dataset"]
    assert described["protocol"].startswith("paper: heads = 1% of train (30 images), gate = 40")
    assert set(described["fingerprints"]) == {"train", "val"} and described["templates"]["count"] == 5
