"""The latency measurement: paired rounds, trimmed-mean CIs, the negative control, realized savings.
No timed assertions."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from harness.config import HarnessConfig
from harness.latency import measure_latency
from harness.paired import percent, percent_less, percent_more, round_ratio, trimmed_interval
from harness.results import LATENCY_CONTROL
from harness.session import Session


def test_the_interval_is_the_trimmed_mean_interval_and_two_interrupted_rounds_move_neither():
    savings = [10.0, 12.0, 11.0, 9.0, 13.0, 30.0, -20.0, 11.0, 10.0, 12.0]  # two rounds hit by the machine
    mean, (low, high) = trimmed_interval(savings)
    # 2 rounds cut from each end leave 10, 10, 11, 11, 12, 12; winsorized: 10 x4, 11 x2, 12 x4 (variance 8/9)
    standard_error = math.sqrt(8 / 9) / (0.6 * math.sqrt(10))
    half = stats.t.ppf(0.975, 6 - 1) * standard_error
    assert mean == pytest.approx(11.0) and low == pytest.approx(11.0 - half) and high == pytest.approx(11.0 + half)
    plain_half = stats.t.ppf(0.975, 9) * stats.tstd(savings) / math.sqrt(10)  # Student-t on the plain mean
    assert high - mean < plain_half / 4
    few = [10.0, 12.0, 11.0, 9.0]  # under 5 rounds none is cut: the plain mean and its Student-t CI
    few_half = stats.t.ppf(0.975, 3) * stats.tstd(few) / 2
    mean, interval = trimmed_interval(few)
    assert mean == pytest.approx(10.5) and interval == pytest.approx([10.5 - few_half, 10.5 + few_half])
    assert trimmed_interval([5.0]) == (5.0, None)  # one round: no interval


def test_a_time_ratio_reads_as_a_saving_or_an_overhead_with_its_interval_turned_the_right_way():
    ratio = round_ratio([1.0, 1.5, 2.0], [2.0, 2.0, 2.0])  # three rounds: 0.5, 0.75, 1.0
    half = stats.t.ppf(0.975, 2) * stats.tstd([0.5, 0.75, 1.0]) / math.sqrt(3)
    assert ratio[0] == pytest.approx(0.75) and ratio[1] == pytest.approx([0.75 - half, 0.75 + half])
    saving, (low, high) = percent_less(ratio)
    assert saving == pytest.approx(25.0) and low == pytest.approx(100 * (0.25 - half)) and low < saving < high
    overhead, (low, high) = percent_more(ratio)
    assert overhead == pytest.approx(-25.0) and high == pytest.approx(100 * (half - 0.25)) and low < overhead < high
    share, (low, high) = percent(ratio)  # as a share of the reference's time
    assert share == pytest.approx(75.0) and low == pytest.approx(100 * (0.75 - half)) and low < share < high
    assert round_ratio([3.0], [2.0]) == (1.5, None) and percent_less((1.5, None)) == pytest.approx((-50.0, None))
    with pytest.raises(ValueError):  # rounds are paired: unequal counts are a bug, not a shorter comparison
        round_ratio([1.0, 2.0], [1.0])


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Session:
    cache = tmp_path_factory.mktemp("cache")
    return Session(HarnessConfig(limit=32, batch_size=32, quant="fp32", cache_dir=str(cache)), progress=False)


def test_rounds_stop_at_the_time_limit_and_say_the_target_was_missed(session):
    policy = session.fit("cls-ee", 0, epochs=1)
    images = next(iter(session.image_batches("test", batch_size=4)))[0]
    result = measure_latency(session, {"cls-ee": policy}, images, max_seconds=0)
    assert result["rounds"] == 1 and result["target_reached"] is False and result["images"] == 4
    row = result["methods"]["cls-ee"]
    assert row["batch1_saving_ci"] is None  # one round: no CI, and the table prints none
    assert set(result["methods"]) == {"full-depth", LATENCY_CONTROL, "cls-ee"}


def test_savings_are_paired_by_round_and_the_realized_ratio_uses_the_same_images(session):
    policy = session.fit("cls-ee", 0, epochs=1).with_knob(0.0)  # threshold 0: every image exits at the first head
    images = next(iter(session.image_batches("test", batch_size=4)))[0]
    result = measure_latency(session, {"cls-ee": policy}, images, min_rounds=3, target=1e9, max_seconds=60)
    assert result["rounds"] == 3 and result["target_reached"] is True  # any CI meets an infinite target
    row = result["methods"]["cls-ee"]
    first = min(policy.exit_layers())
    assert row["flops_saving"] > 100 * (1 - (first + 1) / 12)  # exits after block `first` of 12, heads included
    for mode in ("batch1", "throughput"):
        low, high = row[f"{mode}_saving_ci"]
        assert low <= row[f"{mode}_saving"] <= high
        assert row[f"{mode}_realized"] == pytest.approx(row[f"{mode}_saving"] / row["flops_saving"])
    control = result["methods"][LATENCY_CONTROL]  # full depth against itself: no FLOPs saved, so no realized ratio
    assert control["flops_saving"] == 0.0 and control["batch1_realized"] is None
    assert control["batch1_saving_ci"] is not None and control["throughput_saving_ci"] is not None


def test_a_warm_run_reads_the_latency_and_agreement_passes_back(tmp_path, count_calls):
    import harness.run as run_module

    timed = count_calls(run_module, "measure_latency")
    compared = count_calls(run_module, "driver_agreement")
    config = HarnessConfig(limit=32, batch_size=16, quant="fp32", cache_dir=str(tmp_path))
    options = dict(seeds=1, latency=True, latency_images=4, latency_seconds=0, agreement_images=16, budgets=())
    first, _ = run_module.run(config, ["cls-ee"], **options)
    again, _ = run_module.run(config, ["cls-ee"], **options)
    assert (timed["n"], compared["n"]) == (1, 1)
    assert again["latency"] == first["latency"] and again["driver_agreement"] == first["driver_agreement"]
    assert first["latency"]["measured_at"] <= again["environment"]["timestamp"]
    run_module.run(config, ["cls-ee"], **{**options, "latency_images": 5})  # other settings: measured again
    assert timed["n"] == 2
