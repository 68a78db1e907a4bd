"""What the harness ships and writes: its data files are package data, and pages record no machine paths."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from harness import leaderboard

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "results" / "baseline"


def test_leaderboard_template_is_package_data():
    template = resources.files("harness") / "templates" / "leaderboard.html.j2"
    assert template.is_file()
    assert "<!DOCTYPE html>" in template.read_text(encoding="utf-8")


def test_every_data_file_of_the_packages_is_package_data():
    # a file missing here is missing from wheels (a regular `pip install`), while tests of a checkout pass
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {file for package, globs in patterns.items() for glob in globs
               for file in (ROOT / package.replace(".", "/")).glob(glob)}
    data = {file for package in ("harness", "methods") for file in (ROOT / package).rglob("*")
            if file.is_file() and file.suffix not in (".py", ".pyc") and "__pycache__" not in file.parts
            and not file.name.startswith(".")}
    assert sorted(map(str, data - shipped)) == []


def test_page_records_no_machine_paths(tmp_path):
    """A results file written before paths were cut (or by hand) still gives a page without them."""
    metrics = json.loads((BASELINE / "metrics.json").read_text())
    run = tmp_path / "home" / "someone" / "runs" / "baseline"
    run.mkdir(parents=True)
    metrics["run"]["config"]["cache_dir"] = "/home/someone/.cache/exitbench"
    metrics["run"]["backbone"]["pretrained"] = "/home/someone/weights/open_clip_model.safetensors"
    (run / "metrics.json").write_text(json.dumps(metrics))
    machine_paths = [str(ROOT), str(tmp_path), "/home/someone/.cache/exitbench", "/home/someone/weights"]
    html = leaderboard.render(leaderboard.load_results([run]))
    for path in machine_paths:
        assert path not in html
    assert "baseline/metrics.json" in html  # still says which file the run came from
