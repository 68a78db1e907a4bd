from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from harness.check import compare, format_checks, rerun
from harness.config import HarnessConfig
from harness.errors import ConfigError
from harness.results import read_metrics
from harness.run import run, write_results


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A small committed-baseline stand-in: a run folder written by `run`."""
    root = tmp_path_factory.mktemp("check")
    config = HarnessConfig(limit=32, batch_size=16, cache_dir=str(root / "cache"))
    metrics, predictions = run(config, ["cls-ee", "pabee"], seeds=1, latency=False, agreement_images=0)
    write_results(root / "baseline", metrics, predictions)
    return root / "baseline"


def test_rerun_of_the_same_config_reproduces_the_baseline_exactly(baseline, tmp_path):
    saved = read_metrics(baseline)[1]
    current = rerun(saved, cache_dir=str(tmp_path / "fresh-cache"))  # nothing cached: traces and fits redone
    checks = compare(saved, current, tolerance=0.0, flops_tolerance=0.0)
    assert [c.name for c in checks] == list(saved["rows"])
    for c in checks:
        assert (c.current_top1, c.current_flops) == (c.baseline_top1, c.baseline_flops), c


def test_raised_baseline_accuracy_fails_with_a_diff(baseline, tmp_path):
    raised = json.loads((baseline / "metrics.json").read_text())
    raised["rows"]["pabee"]["summary"]["top1"]["mean"] += 1.0
    (tmp_path / "metrics.json").write_text(json.dumps(raised))
    checks = {c.name: c for c in compare(read_metrics(tmp_path)[1], read_metrics(baseline)[1])}
    assert checks["pabee"].verdict == "top-1 drop"
    assert all(c.ok for name, c in checks.items() if name != "pabee")
    table = format_checks(list(checks.values()))
    assert "pabee" in table and "-1.00" in table and "top-1 drop" in table

    flops = copy.deepcopy(raised)
    flops["rows"]["pabee"]["summary"]["top1"]["mean"] -= 1.0
    flops["rows"]["cls-ee"]["summary"]["flops_saving"]["mean"] -= 0.6
    checks = {c.name: c for c in compare(flops, read_metrics(baseline)[1])}
    assert checks["cls-ee"].verdict == "FLOPs change" and checks["pabee"].ok


def test_cli_exit_codes(baseline, tmp_path):
    def check(path):
        return subprocess.run([sys.executable, "-m", "harness", "check", "--baseline", str(path),
                               "--current", str(baseline)], capture_output=True, text=True, timeout=300)

    ok = check(baseline / "metrics.json")
    assert ok.returncode == 0, ok.stderr
    assert "identical to the baseline" in ok.stdout
    raised = json.loads((baseline / "metrics.json").read_text())
    raised["rows"]["cls-ee"]["summary"]["top1"]["mean"] += 1.0
    (tmp_path / "metrics.json").write_text(json.dumps(raised))
    failed = check(tmp_path / "metrics.json")
    assert failed.returncode == 1
    assert "cls-ee" in failed.stdout and "top-1 drop" in failed.stdout and "FAILED" in failed.stdout


def test_other_config_or_schema_is_refused(baseline, tmp_path):
    saved = read_metrics(baseline)[1]
    other = copy.deepcopy(saved)
    other["run"]["config"]["quant"] = "fp32"
    with pytest.raises(ConfigError, match="quant"):
        compare(saved, other)
    other = copy.deepcopy(saved)
    other["run"]["config"]["cache_dir"] = "/elsewhere"  # where the cache lives does not matter
    assert all(c.ok for c in compare(saved, other))
    other["schema_version"] = 99
    (tmp_path / "metrics.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="schema_version 99"):
        read_metrics(tmp_path)[1]
    with pytest.raises(ConfigError, match="no metrics.json at"):
        read_metrics(tmp_path / "nowhere")
