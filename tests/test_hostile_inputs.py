"""Hostile inputs: symlink loops, odd file names, empty classes, malicious or broken checkpoints."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from harness.backbones import CheckpointError, create_backbone
from harness.datasets import create_dataset
from harness.errors import ConfigError, DataError


def _png(path: Path, seed: int) -> None:
    """A real 8x8 PNG whose pixels depend on ``seed`` (so every file differs)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


def _class_folder(root: Path, name: str, count: int, first_seed: int = 0) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(count):
        _png(folder / f"{i:03d}.png", first_seed + i)
    return folder


def _real_files(ds, split) -> set[str]:
    return {os.path.realpath(ds.describe_sample(split.part, int(i))) for i in split.indices}


# --- imagefolder: symlinks --------------------------------------------------


def test_symlink_loop_counts_each_real_file_once_and_splits_share_none(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    cats = _class_folder(root, "cats", 14)
    _class_folder(root, "dogs", 6, first_seed=100)
    os.symlink(cats, cats / "loop")
    ds = create_dataset("imagefolder", root=str(root))
    assert ds.parts() == {"all": 20}
    np.testing.assert_array_equal(ds.labels("all"), [0] * 14 + [1] * 6)
    samples = [os.path.realpath(ds.describe_sample("all", i)) for i in range(20)]
    assert len(set(samples)) == 20
    splits = ds.splits(seed=0)
    assert [len(s) for s in splits.values()] == [6, 4, 10]
    heads, gate, test = (_real_files(ds, splits[k]) for k in ("heads", "gate", "test"))
    assert len(heads) + len(gate) + len(test) == 20
    assert not heads & test and not gate & test and not heads & gate
    err = capsys.readouterr().err
    assert f"note: imagefolder: skipped 1 symlink loop under {root}" in err and err.count("\n") == 1


def test_file_reachable_from_two_classes_is_kept_once_in_the_first(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    cats = _class_folder(root, "cats", 3)
    dogs = _class_folder(root, "dogs", 2, first_seed=100)
    os.symlink(cats / "001.png", dogs / "stolen.png")  # the same real file in a second class
    os.symlink(cats, dogs / "all_cats")  # a whole folder of cats inside dogs
    ds = create_dataset("imagefolder", root=str(root))
    assert ds.parts() == {"all": 5}
    np.testing.assert_array_equal(ds.labels("all"), [0, 0, 0, 1, 1])
    assert ds.skipped == {"symlink loops": [], "duplicate paths": ["dogs/all_cats", "dogs/stolen.png"]}
    err = capsys.readouterr().err
    assert "skipped 2 duplicate paths" in err and "e.g. dogs/all_cats" in err


def test_symlinked_dataset_folders_are_still_followed(tmp_path: Path, capsys) -> None:
    elsewhere = tmp_path / "elsewhere"
    _class_folder(elsewhere, "birds", 4)
    root = tmp_path / "data"
    _class_folder(root, "cats", 2)
    os.symlink(elsewhere / "birds", root / "birds")
    os.symlink(elsewhere / "birds", root / "cats" / "more")  # not a loop, but birds is a class already
    ds = create_dataset("imagefolder", root=str(root))
    assert ds.classnames == ("birds", "cats")
    np.testing.assert_array_equal(ds.labels("all"), [0, 0, 0, 0, 1, 1])
    assert "skipped 1 duplicate path" in capsys.readouterr().err


def test_clean_folder_prints_no_note(tmp_path: Path, capsys) -> None:
    _class_folder(tmp_path, "a", 3)
    _class_folder(tmp_path, "b", 3, first_seed=10)
    assert create_dataset("imagefolder", root=str(tmp_path)).parts() == {"all": 6}
    assert capsys.readouterr().err == ""


# --- imagefolder: file names ------------------------------------------------


def test_non_utf8_file_name_fingerprints_and_reads(tmp_path: Path) -> None:
    _class_folder(tmp_path, "a", 2)
    _class_folder(tmp_path, "b", 2, first_seed=10)
    bad = os.path.join(os.fsencode(tmp_path), b"b", b"bad\xff.png")
    try:
        os.close(os.open(bad, os.O_CREAT | os.O_WRONLY, 0o644))
    except (OSError, UnicodeError):
        pytest.skip("this filesystem refuses non-UTF-8 file names")
    _png(Path(os.fsdecode(bad)), seed=7)
    ds = create_dataset("imagefolder", root=str(tmp_path))
    assert ds.parts() == {"all": 5}
    assert len(ds.fingerprint("all")) == 64
    index = next(i for i in range(5) if "bad" in ds.describe_sample("all", i))
    assert ds.labels("all")[index] == 1
    image = ds.read_image("all", index)
    assert image.size == (8, 8)
    expected = np.random.default_rng(7).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(image), expected)
    # a different undecodable name is a different dataset
    os.rename(bad, bad.replace(b"\xff", b"\xfe"))
    assert create_dataset("imagefolder", root=str(tmp_path)).fingerprint("all") != ds.fingerprint("all")


def test_non_utf8_class_folder_is_refused(tmp_path: Path) -> None:
    _class_folder(tmp_path, "a", 2)
    bad = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    try:
        os.mkdir(bad)
    except (OSError, UnicodeError):
        pytest.skip("this filesystem refuses non-UTF-8 file names")
    _png(Path(os.fsdecode(bad)) / "0.png", seed=3)
    with pytest.raises(DataError) as info:
        create_dataset("imagefolder", root=str(tmp_path))
    message = str(info.value)
    assert "caf\\xe9" in message and "UTF-8" in message and "\n" not in message


# --- imagefolder: empty classes ---------------------------------------------


def test_empty_class_folders_are_refused_by_default(tmp_path: Path) -> None:
    _class_folder(tmp_path, "cats", 3)
    for name in ("dogs", "eels", "foxes", "gnus"):
        (tmp_path / name).mkdir()
    (tmp_path / "gnus" / "readme.txt").write_text("no images")
    with pytest.raises(DataError) as info:
        create_dataset("imagefolder", root=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "4 class folders hold no images: dogs, eels, foxes, ..." in message
    assert "allow_empty_classes=True" in message


def test_empty_class_folders_allowed_on_request(tmp_path: Path) -> None:
    _class_folder(tmp_path, "cats", 4)
    (tmp_path / "dogs").mkdir()
    _class_folder(tmp_path, "eels", 2, first_seed=10)
    ds = create_dataset("imagefolder", root=str(tmp_path), allow_empty_classes=True)
    assert ds.classnames == ("cats", "dogs", "eels")
    np.testing.assert_array_equal(ds.labels("all"), [0, 0, 0, 0, 2, 2])


def test_unknown_dataset_option_is_a_config_error(tmp_path: Path) -> None:
    _class_folder(tmp_path, "cats", 2)
    with pytest.raises(ConfigError, match="dataset 'embedded' has no option 'allow_empty_classes'"):
        create_dataset("embedded", allow_empty_classes=True)
    with pytest.raises(ConfigError, match="no option 'alow_empty_classes'.*allow_empty_classes"):
        create_dataset("imagefolder", root=str(tmp_path), alow_empty_classes=True)


def test_imagenet_refuses_empty_wnid_folders_unless_allowed(tmp_path: Path) -> None:
    wnids = [f"n{i:08d}" for i in range(1000)]
    for i, wnid in enumerate(wnids):
        (tmp_path / wnid).mkdir()
        if i < 2:
            _png(tmp_path / wnid / "ILSVRC2012_val_0.JPEG", seed=i)
    with pytest.raises(DataError, match="998 class folders hold no images: n00000002, n00000003"):
        create_dataset("imagenet", root=str(tmp_path))
    ds = create_dataset("imagenet", root=str(tmp_path), allow_empty_classes=True)
    np.testing.assert_array_equal(ds.labels("all"), [0, 1])


# --- checkpoints ------------------------------------------------------------


def _pickle_that_fools_the_retry(marker: Path) -> bytes:
    """A pickle that raises TypeError in torch's weights-only unpickler, then creates ``marker`` in plain pickle.

    BUILD with a ``(None, slots)`` state on an OrderedDict: plain pickle sets the
    slots, the weights-only unpickler calls ``__dict__.update((None, slots))`` and
    raises TypeError, which is what made open_clip retry ``torch.load`` unsafely.
    """
    ordered_dict = b"ccollections\nOrderedDict\n)R"
    build_fails_weights_only = b"N}X\x01\x00\x00\x00aK\x01s\x86b0"
    name = os.fsencode(marker)
    opens_marker = b"cbuiltins\nopen\nX" + len(name).to_bytes(4, "little") + name + b"X\x01\x00\x00\x00w\x86R"
    return b"\x80\x02" + ordered_dict + build_fails_weights_only + opens_marker + b"."


def test_crafted_pickle_never_runs_even_with_force_no_weights_only(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    path.write_bytes(_pickle_that_fools_the_retry(marker))
    pickle.loads(path.read_bytes()).close()  # the payload works: plain pickle creates the marker
    assert marker.exists()
    marker.unlink()
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*evil.pt"):
        create_backbone("embedded", pretrained=str(path))
    assert not marker.exists()


SAVERS = {
    "safetensors": lambda state, path: save_file(state, str(path)),
    "torch": torch.save,
    "torch-ddp": lambda state, path: torch.save({f"module.{k}": v for k, v in state.items()}, path),
}


@pytest.fixture(scope="module")
def embedded_state(embedded_backbone) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in embedded_backbone.clip.state_dict().items()}


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
@pytest.mark.parametrize("saver", ["safetensors", "torch"])
def test_non_finite_weights_are_refused(embedded_state, tmp_path: Path, saver: str, value: float) -> None:
    key = "visual.transformer.resblocks.3.mlp.c_fc.weight"
    state = {**embedded_state, key: embedded_state[key].clone()}
    state[key][5, 7] = value
    path = tmp_path / ("w.safetensors" if saver == "safetensors" else "w.pt")
    SAVERS[saver](state, path)
    with pytest.raises(CheckpointError) as info:
        create_backbone("embedded", pretrained=str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert f"{key} has 1 NaN/Inf values" in message


@pytest.mark.parametrize("saver", list(SAVERS))
def test_valid_checkpoints_still_load(embedded_backbone, embedded_state, tmp_path: Path, saver: str) -> None:
    path = tmp_path / ("w.safetensors" if saver == "safetensors" else "w.pt")
    SAVERS[saver](embedded_state, path)
    loaded = create_backbone("embedded", pretrained=str(path))
    assert loaded.weights_sha256 == embedded_backbone.weights_sha256
