"""Values a user can get wrong fail before any work, in one line; a failing method loses only its own row."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harness.cli import main
from harness.config import HarnessConfig
from harness.errors import ConfigError
from harness.policy import METHODS, ExitPolicy
from harness.results import LATENCY_CONTROL, results_json
from harness.run import check_methods, parse_overrides, run, write_results


@pytest.mark.parametrize("item, message", [
    ("pabee.patience=abc", "--set pabee.patience='abc': expected an integer"),
    ("pabee.patience=2.5", "--set pabee.patience=2.5: expected an integer"),
    ('cls-ee.threshold="0.5"', "--set cls-ee.threshold='0.5': expected a number"),
    ("cls-ee.threshold=-0.5", "--set cls-ee.threshold=-0.5: must be at least 0"),
    ("cls-ee.threshold=1.5", "--set cls-ee.threshold=1.5: must be at most 1"),
    ("cls-ee.threshold=NaN", "--set cls-ee.threshold=nan: expected a finite number"),
    ("pabee.exit_layers=[]", "--set pabee.exit_layers=[]: give at least one block"),
    ("pabee.exit_layers=[4, 4]", "--set pabee.exit_layers=[4, 4]: names a block twice"),
    ("cls-ee.batch_size=0", "--set cls-ee.batch_size=0: must be at least 1"),
    ("lra-ee.lr=NaN", "--set lra-ee.lr=nan: expected a finite number"),
    ("lra-ee.feature=bogus", "--set lra-ee.feature='bogus': must be one of 'patch_mean', 'cls'"),
    ("evit.fuse=1", "--set evit.fuse=1: expected true or false"),
])
def test_bad_set_values_are_refused_with_the_flag_named(item, message):
    method = item.split(".")[0]
    with pytest.raises(ConfigError) as err:
        parse_overrides([item], [method])
    assert str(err.value) == message


def test_good_set_values_are_normalised():
    overrides = parse_overrides(["cls-ee.threshold=1", "lra-ee.exit_layers=[8, 10]", "pabee.patience=8"],
                                ["cls-ee", "lra-ee", "pabee"])
    assert overrides == {"cls-ee": {"threshold": 1}, "lra-ee": {"exit_layers": (8, 10)}, "pabee": {"patience": 8}}
    from harness.policy import create_method

    assert create_method("cls-ee", threshold=1).config.threshold == 1.0  # an int where a float is declared
    check_methods(["cls-ee", "lra-ee", "pabee"], overrides, num_blocks=12)  # fits a 12-block backbone


@pytest.mark.parametrize("method, config, message", [
    ("pabee", {"patience": 1_000_000}, "--set pabee.patience=1000000: must be at most 12"),
    ("lra-ee", {"exit_layers": (13,)}, "--set lra-ee.exit_layers=[13]: must be blocks in 1..12"),
    ("evit", {"prune_after": (3, 12)}, "--set evit.prune_after=[3, 12]: must be blocks in 1..11"),
])
def test_block_options_are_checked_against_the_backbone(method, config, message):
    with pytest.raises(ConfigError) as err:
        check_methods([method], {method: config}, num_blocks=12)
    assert str(err.value) == message + " (the backbone has 12 blocks)"
    check_methods([method], {}, num_blocks=12)  # the defaults fit


def test_defaults_that_do_not_fit_a_small_backbone_are_named():
    with pytest.raises(ConfigError, match=r"^default option evit.prune_after=\[3, 6, 9\]: must be blocks in 1..3"):
        check_methods(["evit"], {}, num_blocks=4)


def _cli(capsys, *args: str) -> tuple[int, str]:
    """Exit code and stderr of ``python -m harness ARGS`` run in-process (argparse errors exit)."""
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("args, message", [
    (("--seeds", "0"), "argument --seeds: must be at least 1, got 0"),
    (("--latency-images", "0"), "argument --latency-images: must be at least 1, got 0"),
    (("--agreement-images", "-5"), "argument --agreement-images: must be at least 0, got -5"),
    (("--threads", "-1"), "error: --threads -1: must be at least 1"),
    (("--batch-size", "0"), "error: --batch-size 0: must be at least 1"),
    (("--limit", "0"), "error: --limit 0: must be at least 1"),
    (("--device", "mps"), "error: --device mps: the harness runs on cpu or cuda only"),
    (("--device", "gpu"), "error: --device gpu: not a torch device; use cpu, cuda or cuda:N"),
    (("--set", "pabee.patience=abc"), "error: --set pabee.patience='abc': expected an integer"),
    (("--set", "pabee.patience=99"), "error: --set pabee.patience=99: must be at most 12 (the backbone has 12 blocks)"),
])
def test_bad_flags_end_in_one_line_before_any_work(tmp_path, capsys, args, message):
    cache = tmp_path / "cache"
    code, err = _cli(capsys, "run", "--methods", "pabee", "--cache-dir", str(cache), "--out", str(tmp_path / "out"),
                     *args)
    assert code == 2
    assert err.splitlines()[-1].endswith(message)
    assert not (cache / "traces").exists()  # nothing was traced


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    code, err = _cli(capsys, "run", "--device", "cuda", "--cache-dir", str(tmp_path))
    assert (code, err) == (2, "error: --device cuda: torch sees no CUDA GPU on this machine; use --device cpu")


def test_out_is_checked_before_any_work(tmp_path, capsys):
    cache = tmp_path / "cache"
    (tmp_path / "taken").mkdir()
    (tmp_path / "a-file").write_text("")
    for out, message in ((tmp_path / "taken", "exists already; pass another --out"),
                         (tmp_path / "a-file" / "run", f"cannot write there ({tmp_path / 'a-file'} is a file, not a folder)")):
        code, err = _cli(capsys, "run", "--methods", "cls-ee", "--cache-dir", str(cache), "--out", str(out))
        assert code == 2 and err.startswith(f"error: --out {out}: ") and message in err
    assert not cache.exists()


def test_results_json_is_strict():
    text = results_json({"top1": float("nan"), "saving": np.float32(0.5), "inf": [float("inf"), 1],
                         "curve": np.array([0.5, np.nan]), "cache_dir": "/tmp/x", "pretrained": "/home/me/w.pt"})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {
        "top1": None, "saving": 0.5, "inf": [None, 1], "curve": [0.5, None], "pretrained": ".../w.pt"}


class _FailsToFit(ExitPolicy):
    """A plugin whose fit raises."""

    def fit(self, ctx):
        raise RuntimeError("head training diverged")

    def exit_layers(self):
        return [1]

    def decide(self, layer, view):
        raise AssertionError("never fitted")


def test_a_failing_method_loses_only_its_row(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS._entries, "fails-to-fit", _FailsToFit)
    monkeypatch.setattr(_FailsToFit, "name", "fails-to-fit")
    config = HarnessConfig(limit=32, batch_size=16, cache_dir=str(tmp_path / "cache"))
    metrics, predictions = run(config, ["fails-to-fit", "cls-ee"], seeds=1, latency=True, latency_images=4,
                               latency_seconds=0, agreement_images=32)
    assert metrics["failures"] == {"fails-to-fit": "RuntimeError: head training diverged"}
    assert "cls-ee" in metrics["rows"] and "fails-to-fit" not in metrics["rows"]
    assert set(metrics["latency"]["methods"]) == {"full-depth", LATENCY_CONTROL, "cls-ee"}
    assert set(predictions.method) == {"full-depth fp32", f"full-depth {config.resolved().quant}", "static-cls",
                                       "static-ssa", "cls-ee"}
    write_results(tmp_path / "out", metrics, predictions)
    assert "fails-to-fit: FAILED, no row (RuntimeError: head training diverged)" in (
        tmp_path / "out" / "tables.md").read_text()
    saved = (tmp_path / "out" / "metrics.json").read_text()
    assert str(tmp_path) not in saved and "cache_dir" not in saved  # no machine paths


def test_cli_run_with_a_failing_method_writes_the_others_and_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(METHODS._entries, "fails-to-fit", _FailsToFit)
    monkeypatch.setattr(_FailsToFit, "name", "fails-to-fit")
    out = tmp_path / "out"
    code, err = _cli(capsys, "run", "--methods", "fails-to-fit,pabee", "--seeds", "1", "--limit", "16",
                     "--batch-size", "16", "--no-latency", "--agreement-images", "0",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert code == 1
    assert "error: method fails-to-fit failed, its row is left out: RuntimeError: head training diverged" in err
    assert err.splitlines()[-1] == ("error: 1 method(s) failed: fails-to-fit (the others' results are written)")
    assert "pabee" in json.loads((out / "metrics.json").read_text())["rows"]


def test_empty_class_folders_are_refused_unless_the_flag_allows_them(tmp_path, capsys, fmnist_images):
    from harness.session import Session

    root = tmp_path / "folder"
    for name in ("bag", "coat"):
        (root / name).mkdir(parents=True)
    for i, image in enumerate(fmnist_images[0][:6]):
        image.save(root / "bag" / f"{i}.png")
    (root / "sandal").mkdir()  # empty
    code, err = _cli(capsys, "run", "--data", "imagefolder", "--data-root", str(root), "--methods", "cls-ee",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"))
    assert code == 2 and len(err.splitlines()) == 1
    assert "2 class folders hold no images: coat, sandal" in err and "--allow-empty-classes" in err
    config = HarnessConfig(data="imagefolder", data_root=str(root), allow_empty_classes=True,
                           cache_dir=str(tmp_path / "cache"))
    assert Session(config).dataset.classnames == ("bag", "coat", "sandal")


def test_results_from_before_an_option_existed_compare_as_its_default():
    from harness.check import config_differences

    old = {"run": {"config": {"model": "embedded", "quant": "fp32"}, "seeds": 3, "test_samples": 10}}
    new = {"run": {"config": {"model": "embedded", "quant": "fp32", "allow_empty_classes": False}, "seeds": 3,
                   "test_samples": 10}}
    assert config_differences(old, new) == []
    new["run"]["config"]["allow_empty_classes"] = True
    assert config_differences(old, new) == ["allow_empty_classes"]
