from __future__ import annotations

import json
import subprocess
import sys

from harness.cli import main


def test_list_shows_every_plugin_kind(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("cls-ee", "int8-dynamic", "int8-torchao", "fake-wNaM[-tensor]", "fp32",
                 "embedded", "fashion-mnist", "imagefolder", "imagenet", "ViT-B-32"):
        assert name in out


def test_unknown_quantizer_is_one_line_error(capsys, cache_dir):
    code = main(["profile", "--quant", "int8-dynamc", "--limit", "8", "--cache-dir", str(cache_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "Did you mean 'int8-dynamic'" in err


def test_missing_data_root_is_one_line_error(capsys, tmp_path):
    code = main(["profile", "--data", "imagefolder", "--data-root", str(tmp_path / "nowhere"), "--limit", "8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "nowhere" in err


def test_profile_command_prints_12_rows_and_writes_figures(tmp_path, cache_dir):
    out = tmp_path / "profile"
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "profile", "--quant", "int8-dynamic", "--limit", "32",
         "--batch-size", "16", "--cache-dir", str(cache_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.strip()[:2].strip().isdigit()]
    assert [int(r.split()[0]) for r in rows] == list(range(1, 13))
    assert (out / "noise_profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "noise_profile.svg").read_text().lstrip().startswith("<?xml")
    data = json.loads((out / "profile.json").read_text())
    assert data["samples"] == 32 and len(data["layers"]) == 12
    assert data["config"]["config"]["quant"] == "int8-dynamic"
    assert data["environment"]["packages"]["torch"]


def test_help_does_not_import_torch():
    code = "import sys; from harness.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_second_process_reuses_the_trace_cache(cache_dir):
    cmd = [sys.executable, "-m", "harness", "zeroshot", "--quant", "fp32", "--limit", "16",
           "--batch-size", "8", "--cache-dir", str(cache_dir)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "trace embedded/fp32" in first.stderr  # the progress bar of a real pass
    assert "trace embedded/fp32" not in second.stderr  # cache hit: no pass at all
    assert first.stdout == second.stdout




def test_results_folder_names_are_safe_for_timm_models():
    from harness.cli import _folder_name
    from harness.config import HarnessConfig

    assert _folder_name(HarnessConfig(model="timm:deit_tiny_patch16_224", quant="fp32")) == \
        "timm_deit_tiny_patch16_224-embedded-fp32"
