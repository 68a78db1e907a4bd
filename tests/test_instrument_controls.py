"""``experiment validate``: the positive control finds a rescue, the negative control none, and a
scenario without damage makes the command fail."""

from __future__ import annotations

import json

from harness.cli import main
from harness.experiments import validate


def _run(tmp_path, out: str) -> tuple[int, dict]:
    code = main(["experiment", "validate", "--limit", "600", "--batch-size", "100", "--seeds", "1", "--no-sweep",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / out)])
    (folder,) = (tmp_path / out).iterdir()
    return code, json.loads((folder / "data.json").read_text())["data"]


def test_validate_passes_on_the_embedded_default_and_fails_without_damage(tmp_path, monkeypatch, capsys):
    code, data = _run(tmp_path, "ok")
    assert code == 0, data["failures"]
    positive = data["controls"]["positive"][0]
    assert data["scenarios"]["positive"] == "noise-b10-s1"
    # the damage costs the zero-shot model points, recalibration cannot undo it, and exiting before block 10 can
    assert positive["full_depth_top1"] < data["controls"]["negative"][0]["full_depth_top1"] - 5
    passing = [positive["methods"][m] for m in data["passing_methods"]]
    assert passing and all(p["gain_vs_recalibration"] > 2 and p["p_vs_recalibration"] < 0.01 and p["net_rescue"] > 0
                           and p["p_vs_full_depth"] < 0.01 and p["earliest_exit"] < 10 for p in passing)
    for row in data["controls"]["negative"][0]["methods"].values():
        assert row is None or not (row["gain_vs_recalibration"] > 0 and row["p_vs_recalibration"] < 0.01
                                   and row["net_rescue"] > 0 and row["p_vs_full_depth"] < 0.01)
    table = (tmp_path / "ok").glob("*/tables.md").__next__().read_text()
    assert "positive control passed" in table and "negative control passed" in table

    # no damage at all: the "positive" scenario is fp32 too, so nothing can pass it
    monkeypatch.setattr(validate, "NOISE_SIZE", 0.0)
    code, data = _run(tmp_path, "undamaged")
    assert code == 1 and data["passing_methods"] == []
    assert "FAILED validate: positive control (noise-b10-s0)" in capsys.readouterr().out
