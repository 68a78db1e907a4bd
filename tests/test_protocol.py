"""The protocol: operating points chosen on the gate split only, controls beside every method."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from harness.config import HarnessConfig
from harness.session import Session
from harness.errors import ConfigError
from harness.protocol import choose, parse_budgets
from harness.run import format_tables, run


def test_choose_takes_the_best_gate_top1_among_points_that_save_the_budget():
    curve = [{"knob": 0.9, "top1": 80.0, "flops_saving": 5.0}, {"knob": 0.8, "top1": 79.0, "flops_saving": 12.0},
             {"knob": 0.7, "top1": 79.0, "flops_saving": 20.0}, {"knob": 0.6, "top1": 75.0, "flops_saving": 30.0}]
    assert choose(curve, 0)["knob"] == 0.9
    assert choose(curve, 10)["knob"] == 0.7  # a tie on top-1 goes to the larger saving
    assert choose(curve, 25)["knob"] == 0.6
    assert choose(curve, 31) is None  # out of reach: never a point below the budget


def test_budgets_are_parsed_and_checked():
    assert parse_budgets("40, 10,25,10") == (10.0, 25.0, 40.0)
    for bad in ("", "ten", "100", "-5"):
        with pytest.raises(ConfigError, match="--budgets"):
            parse_budgets(bad)


def _chosen(metrics: dict) -> dict:
    """Every choice the run made: per row, seed and budget, the knob (and for methods the control compared)."""
    out = {}
    for name, row in metrics["rows"].items():
        for s, points in enumerate(row.get("operating_points", {}).get("per_seed", [])):
            for p in points:
                out[name, s] = out.get((name, s), []) + [None if p is None else
                                                         (p["budget"], p["knob"], p.get("control"),
                                                          p.get("control_knob"), p["gate_top1"])]
    return out


def test_permuting_the_test_labels_changes_no_choice(tmp_path, monkeypatch):
    """Scores on test move when its labels are shuffled; every knob, block and control chosen stays put."""
    config = HarnessConfig(limit=120, batch_size=40, cache_dir=str(tmp_path))
    methods = ["cls-ee", "confidence", "pabee", "lra-ee", "evit"]
    budgets = (10.0, 25.0, 40.0)
    plain, _ = run(config, methods, seeds=2, latency=False, agreement_images=0, budgets=budgets)

    original = Session.trace
    shuffle = np.random.default_rng(0).permutation

    def shuffled_test_labels(self, quant, split):
        trace = original(self, quant, split)
        return dataclasses.replace(trace, labels=shuffle(np.asarray(trace.labels))) if split == "test" else trace

    monkeypatch.setattr(Session, "trace", shuffled_test_labels)
    permuted, _ = run(config, methods, seeds=2, latency=False, agreement_images=0, budgets=budgets)

    assert plain["failures"] == {} and permuted["failures"] == {}
    assert set(plain["rows"]) == {"full-depth fp32", f"full-depth {config.resolved().quant}", "static-cls",
                                  "static-ssa", *methods}
    choices = _chosen(plain)
    assert len(choices) == 2 * (2 + len(methods))  # every control and method, both seeds
    assert sum(p is not None for points in choices.values() for p in points) >= 20  # most budgets reached
    assert _chosen(permuted) == choices
    test_top1 = [p["test_top1"] for row in plain["rows"].values() for seed in row.get("operating_points", {})
                 .get("per_seed", []) for p in seed if p]
    permuted_top1 = [p["test_top1"] for row in permuted["rows"].values() for seed in row.get("operating_points", {})
                     .get("per_seed", []) for p in seed if p]
    assert test_top1 != permuted_top1  # the shuffle reached the scores


def test_every_method_row_has_operating_points_with_routing_gain(tmp_path):
    metrics, _ = run(HarnessConfig(limit=64, batch_size=32, cache_dir=str(tmp_path)), ["cls-ee", "lra-ee"],
                     seeds=1, latency=False, agreement_images=0, budgets=(0.0, 20.0))
    kinds = {name: row["kind"] for name, row in metrics["rows"].items()}
    assert sorted(kinds.values()) == ["baseline", "baseline", "control", "control", "method", "method"]
    lra = metrics["rows"]["lra-ee"]["operating_points"]["per_seed"][0]
    assert lra[0]["knob"] is None  # lra-ee fits its thresholds to each budget itself
    for name in ("cls-ee", "lra-ee"):
        for point in metrics["rows"][name]["operating_points"]["per_seed"][0]:
            if point is None:
                continue
            assert point["gate_saving"] >= point["budget"]
            # the best control on gate at this budget, scored on test
            control = metrics["rows"][point["control"]]["operating_points"]["per_seed"][0]
            reference = next(c for c in control if c and c["budget"] == point["budget"])
            assert reference["knob"] == point["control_knob"]
            assert point["routing_gain"] == pytest.approx(point["test_top1"] - reference["test_top1"])
            assert 0 <= point["routing_p"] <= 1
    static = metrics["rows"]["static-cls"]
    assert static["per_seed"][0]["exit_distribution"] == {12: 100.0}  # default: the last block (recalibration)
    assert static["operating_points"]["per_seed"][0][1]["knob"] < 12  # 20% saving needs an earlier block
    table = format_tables(metrics)
    assert "routing gain" in table and "static-ssa (last block: recalibration)" in table


def test_one_driver_per_table_the_real_one_under_a_batch_dependent_quantizer(tmp_path):
    from harness.drivers import replay
    from harness.session import Session

    config = HarnessConfig(limit=96, batch_size=32, quant="fake-w8a3-tensor", cache_dir=str(tmp_path)).resolved()
    bed = Session(config, progress=False)
    policy = bed.fit("cls-ee", 0).with_knob(0.3)  # a low threshold: many exits, so batches change
    assert bed.uses_real_driver(policy)
    scored, real = bed.outcome(policy), bed.real_outcomes([policy], bed.test)[0]
    replayed = replay(policy, bed.test, bed.num_blocks, bed.num_patches)
    assert np.array_equal(scored.exit_layer, real.exit_layer) and np.array_equal(scored.predictions, real.predictions)
    assert not np.array_equal(replayed.exit_layer, real.exit_layer), "no disagreement: the test cannot tell"
    # gate points (what operating points are chosen on) come from the same driver
    gate = bed.seeded(0).trace(None, "gate")
    gate_real = bed.seeded(0).real_outcomes([policy], gate, split="gate")[0]
    flops_saving = bed.gate_point(policy, 0)["flops_saving"]
    assert bed.gate_point(policy, 0)["top1"] == pytest.approx(
        100 * np.mean(gate_real.predictions == np.asarray(gate.labels)))
    assert flops_saving > 0
    # a batch-invariant quantizer replays
    invariant = bed.derived(quant="fake-w8a8")
    assert not invariant.uses_real_driver(invariant.fit("cls-ee", 0))
