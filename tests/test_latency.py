"""The latency measurement: paired rounds, Student-t CIs, realized savings. No timed assertions."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from harness.config import HarnessConfig
from harness.latency import measure_latency, saving_interval
from harness.session import Session


def test_the_interval_is_the_student_t_interval_of_the_round_savings():
    savings = [10.0, 12.0, 11.0, 9.0, 13.0]
    mean, low, high = saving_interval(savings)
    sd = math.sqrt(sum((s - 11.0) ** 2 for s in savings) / 4)
    half = stats.t.ppf(0.975, 4) * sd / math.sqrt(5)
    assert mean == 11.0 and low == pytest.approx(11.0 - half) and high == pytest.approx(11.0 + half)
    assert math.isnan(saving_interval([5.0])[1])  # one round: no interval


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
    assert set(result["methods"]) == {"full-depth", "cls-ee"}


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
