"""bench: the suites' numbers fit together and land where they say. No timed assertions."""

from __future__ import annotations

import json

import pytest

from harness import bench
from harness.cli import main
from harness.config import HarnessConfig
from harness.policy import METHODS
from harness.session import Session


def test_trace_suite_writes_the_overhead_its_timings_give(tmp_path, capsys):
    out = tmp_path / "trace.json"
    assert main(["bench", "--suite", "trace", "--limit", "64", "--batch-size", "32", "--rounds", "1",
                 "--quant", "fake-w8a8", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["suite"] == "trace" and saved["environment"]["torch_threads"] >= 1
    for quant in ("fp32", "fake-w8a8"):
        result = saved["result"][quant]
        timings = result["timings"]
        expected = 100 * (timings["trace"]["seconds_per_batch"] / timings["encode_image"]["seconds_per_batch"] - 1)
        assert result["trace_overhead_percent"] == pytest.approx(expected)
        assert timings["trace"]["images_per_s"] == pytest.approx(32 / timings["trace"]["seconds_per_batch"])
    assert "trace overhead" in capsys.readouterr().out


def test_latency_suite_times_every_method_against_full_depth(tmp_path):
    session = Session(HarnessConfig(limit=32, batch_size=32, quant="fp32", cache_dir=str(tmp_path)), progress=False)
    result = bench.method_latency(session, images=4, max_seconds=0)
    assert set(result["methods"]) == {"full-depth", *METHODS.names()}
    assert result["rounds"] == 1 and not result["target_reached"]
    table = bench.format_result("latency", result)
    assert all(name in table for name in METHODS.names()) and "realized" in table


def test_an_unknown_suite_is_refused(tmp_path):
    session = Session(HarnessConfig(limit=32, cache_dir=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="unknown bench suite"):
        bench.run_suite("nope", session)
