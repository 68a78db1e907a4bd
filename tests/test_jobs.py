"""Sweeps split into independent jobs: --shard I/N, --skip-existing, one folder per config."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.errors import ConfigError
from harness.jobs import Shard

QUICK = ["--methods", "cls-ee", "--seeds", "1", "--limit", "64", "--batch-size", "32", "--no-latency",
         "--agreement-images", "0"]


def test_shards_split_the_jobs_and_read_the_launcher(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    jobs = list("abcdefg")
    assert Shard.parse(None) == Shard(0, 1) and Shard(0, 1).mine(jobs) == jobs
    parts = [Shard.parse(f"{i}/3").mine(jobs) for i in range(3)]
    assert parts == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert Shard.parse(None) == Shard(1, 3)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ConfigError, match="expected I/N"):
            Shard.parse(bad)


def test_a_sweep_writes_one_folder_per_config_and_shards_skip_what_is_done(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    root, cache = tmp_path / "sweep", str(tmp_path / "cache")
    args = ["run", *QUICK, "--quant", "fp32,fake-w8a8", "--cache-dir", cache, "--out", str(root)]
    assert main([*args, "--shard", "1/2"]) == 0
    assert [p.name for p in root.iterdir()] == ["embedded-embedded-fake-w8a8"]
    assert main([*args, "--skip-existing"]) == 0  # runs the other config, skips the one done
    out = capsys.readouterr().out
    assert "skip " in out and "embedded-embedded-fake-w8a8: complete" in out
    folders = sorted(p.name for p in root.iterdir())
    assert folders == ["embedded-embedded-fake-w8a8", "embedded-embedded-fp32"]
    quants = {json.loads((root / f / "metrics.json").read_text())["run"]["config"]["quant"] for f in folders}
    assert quants == {"fp32", "fake-w8a8"}
    assert main([*args, "--skip-existing"]) == 0 and capsys.readouterr().out.count("skip ") == 2
    assert main(["leaderboard", str(root), "-o", str(tmp_path / "index.html")]) == 0
    page = (tmp_path / "index.html").read_text()
    assert "fake-w8a8" in page and "fp32" in page


def test_experiments_of_all_are_sharded_and_complete_ones_skipped(tmp_path, capsys):
    from harness.config import HarnessConfig
    from harness.experiments import EXPERIMENTS, _load, run_experiments

    _load()
    names = list(EXPERIMENTS)
    config = HarnessConfig(limit=32, cache_dir=str(tmp_path / "cache")).resolved()
    first = tmp_path / f"{names[0]}-{config.model}-{config.data}-{config.quant}"
    first.mkdir()
    (first / "data.json").write_text("{}")
    folders, failures = run_experiments("all", config, 1, {"factor": [], "no_sweep": True}, tmp_path,
                                        Shard(0, len(names)), skip_existing=True)
    assert (folders, failures) == ([], []) and f"skip {names[0]}" in capsys.readouterr().out
