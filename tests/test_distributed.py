"""Sharded tracing under torchrun: results bit-identical to one process, whole shards only, reuse after a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from harness.distributed import Ranks, process_group
from harness.errors import ConfigError
from harness.trace import shard_bounds

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# sharding changes how traces are made, nothing after them: one quick method is enough here (the slow test runs all)
QUICK = ["--methods", "cls-ee", "--seeds", "1", "--limit", "128", "--batch-size", "32", "--no-latency",
         "--agreement-images", "32"]


def test_shards_are_contiguous_and_cut_at_batch_boundaries():
    assert shard_bounds(1000, 256, 2) == [(0, 512), (512, 1000)]
    assert shard_bounds(1000, 256, 3) == [(0, 512), (512, 768), (768, 1000)]
    assert shard_bounds(100, 256, 3) == [(0, 100), (100, 100), (100, 100)]  # ranks past the last batch: nothing
    for rows, batch, world in ((10_000, 256, 4), (7, 2, 2), (1, 1, 1)):
        bounds = shard_bounds(rows, batch, world)
        assert bounds[0][0] == 0 and bounds[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(start % batch == 0 for start, _ in bounds)


def test_launcher_variables_are_checked(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert Ranks.from_env() == Ranks(0, 1, 0) and not Ranks.from_env().sharded
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK=2 is outside WORLD_SIZE=2"):
        Ranks.from_env()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match="must be integers"):
        Ranks.from_env()
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT not set: launch with torchrun"):
        with process_group(Ranks(0, 2, 0), "cpu"):
            pass


def _run(prefix: list[str], cache: Path, out: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, "run", *QUICK, "--out", str(out)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "EXITBENCH_CACHE": str(cache), **(env or {})})


def _without_timings(metrics: dict) -> dict:
    metrics["run"].pop("wall_time_s")
    metrics["environment"].pop("timestamp")
    return metrics


def test_torchrun_with_two_processes_gives_the_one_process_results(tmp_path):
    one = _run([sys.executable, "-m", "harness"], tmp_path / "cache-one", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run([*TORCHRUN, "-m", "harness"], tmp_path / "cache-two", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-2000:]
    assert "rank 1 of 2: traced its shards" in two.stdout
    metrics = [_without_timings(json.loads((tmp_path / d / "metrics.json").read_text())) for d in ("one", "two")]
    assert metrics[0] == metrics[1]
    pd.testing.assert_frame_equal(*(pd.read_parquet(tmp_path / d / "predictions.parquet") for d in ("one", "two")))
    assert not any((tmp_path / "cache-two" / "trace-shards").iterdir())  # merged and removed


# Runs the CLI under torchrun with two test hooks: every backbone pass is logged, and with CRASH set,
# rank 0 dies just before merging the first trace's shards.
_WRAPPER = textwrap.dedent("""
    import os, sys
    import harness.trace as trace
    traced = trace._run_backbones
    def logged(backbones, batches, *args):
        with open(os.environ["PASSES"], "a") as log:
            split, quants = batches.split, "+".join(b.quantizer for b in backbones)
            log.write(f"{os.environ['RANK']} {quants} {split.part} {split.indices[0]} {len(split)}\\n")
        return traced(backbones, batches, *args)
    trace._run_backbones = logged
    if os.environ.get("CRASH"):
        def crash(*args):
            os._exit(3)
        trace._merge = crash
    from harness.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_rank_that_dies_leaves_whole_shards_and_a_rerun_reuses_them(tmp_path):
    from harness.cache import read_entry

    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(_WRAPPER)
    cache, passes = tmp_path / "cache", tmp_path / "passes.log"
    crashed = _run([*TORCHRUN, str(wrapper)], cache, tmp_path / "crashed", {"CRASH": "1", "PASSES": str(passes)})
    assert crashed.returncode != 0
    # rank 0 died before merging the first traces: their shards are whole entries (a rank killed while
    # tracing leaves only a hidden temporary folder, never an entry)
    shards = [s for s in (cache / "trace-shards").iterdir() if not s.name.startswith(".")]
    assert len(shards) >= 2
    for shard in shards:
        read_entry(shard)  # every file present, with its recorded size and digest
    assert not (cache / "traces").exists() or not any(p for p in (cache / "traces").iterdir() if p.name[0] != ".")
    first_trace = {}
    for line in passes.read_text().splitlines():
        first_trace.setdefault(line.split()[0], line)  # each rank's first backbone pass: its shard of the first traces
    assert sorted(first_trace) == ["0", "1"]
    passes.unlink()
    rerun = _run([*TORCHRUN, str(wrapper)], cache, tmp_path / "rerun", {"PASSES": str(passes)})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not set(first_trace.values()) & set(passes.read_text().splitlines())  # not traced again
    assert not [s for s in (cache / "trace-shards").iterdir() if not s.name.startswith(".")]


@pytest.mark.slow
def test_torchrun_matches_one_process_for_every_method(tmp_path):
    """The issue's acceptance command: run --methods all --seeds 1 on the embedded default, 2 processes vs 1."""
    results = {}
    for name, command in (("one", [sys.executable, "-m", "harness"]), ("two", [*TORCHRUN, "-m", "harness"])):
        done = subprocess.run([*command, "run", "--methods", "all", "--seeds", "1", "--no-latency",
                               "--out", str(tmp_path / name)],
                              env={**os.environ, "EXITBENCH_CACHE": str(tmp_path / f"cache-{name}")},
                              capture_output=True, text=True, timeout=3600)
        assert done.returncode == 0, done.stderr[-2000:]
        results[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert _without_timings(results["one"]) == _without_timings(results["two"])
