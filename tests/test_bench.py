"""bench: the suites' numbers fit together and land where they say. No timed assertions."""

from __future__ import annotations

import json

import pytest

from harness import bench
from harness.cli import main
from harness.config import HarnessConfig
from harness.results import LATENCY_CONTROL
from harness.policy import METHODS
from harness.session import Session


def _per_round_ratio(timings: dict, name: str, reference: str) -> float:
    """The plain mean of ``name``'s per-round time over ``reference``'s (under 5 rounds nothing is trimmed)."""
    pairs = list(zip(timings[name]["seconds_per_round"], timings[reference]["seconds_per_round"]))
    return sum(t / r for t, r in pairs) / len(pairs)


def test_trace_suite_writes_the_overhead_its_timings_give(tmp_path, capsys):
    out = tmp_path / "trace.json"
    assert main(["bench", "--suite", "trace", "--limit", "64", "--batch-size", "32", "--rounds", "2",
                 "--quant", "fake-w8a8", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["suite"] == "trace" and saved["environment"]["torch_threads"] >= 1
    for quant in ("fp32", "fake-w8a8"):
        result = saved["result"][quant]
        timings = result["timings"]
        assert result["rounds"] == 2 and all(len(t["seconds_per_round"]) == 2 for t in timings.values())
        expected = 100 * (_per_round_ratio(timings, "trace", "encode_image") - 1)
        assert result["trace_overhead_percent"] == pytest.approx(expected)
        low, high = result["trace_overhead_ci"]
        assert low < expected < high
        assert timings["trace"]["images_per_s"] == pytest.approx(32 / timings["trace"]["seconds_per_batch"])
    assert saved["result"]["fp32"]["fusion_speedup"] is None  # nothing to fuse in fp32
    fake = saved["result"]["fake-w8a8"]
    expected = _per_round_ratio(fake["timings"], "trace, fake quantization unfused", "trace")
    assert fake["fusion_speedup"] == pytest.approx(expected)
    out = capsys.readouterr().out
    assert "trace overhead" in out and f"fused fake quantization: trace {fake['fusion_speedup']:.2f}x [" in out
    assert "(means of per-round ratios, 95% CIs)" in out and "trimmed" not in out  # 2 rounds: nothing is cut


def test_compare_rotates_the_order_and_pairs_ratios_by_round():
    calls: list[str] = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    result = bench.compare(contenders, batch_size=4, rounds=3, min_run_time=0.0)
    assert calls[:3] == list("abc")  # the warm-up, then each round one further along
    assert calls[3:] == list("abc") + list("bca") + list("cab")
    assert all(len(t["seconds_per_round"]) == 3 for t in result.values())
    # a slow round of both contenders cancels in the ratio; a 20% trim drops the outlying rounds
    rounds = {"a": [2.0, 2.0, 2.0, 2.0, 20.0, 2.0, 2.0, 2.0, 2.0, 2.0], "b": [1.0, 1.0, 1.0, 1.0, 10.0, 1.0, 1.0, 1.0, 1.0, 3.0]}
    mean, (low, high) = bench.paired_ratio({k: {"seconds_per_round": v} for k, v in rounds.items()}, "a", "b")
    assert mean == pytest.approx(2.0) and low == pytest.approx(2.0) and high == pytest.approx(2.0)
    assert bench.paired_ratio({k: {"seconds_per_round": v[:1]} for k, v in rounds.items()}, "a", "b") == (2.0, None)


def test_latency_suite_times_every_method_against_full_depth(tmp_path):
    session = Session(HarnessConfig(limit=32, batch_size=32, quant="fp32", cache_dir=str(tmp_path)), progress=False)
    result = bench.method_latency(session, images=4, max_seconds=0)
    assert set(result["methods"]) == {"full-depth", LATENCY_CONTROL, *METHODS.names()}
    assert result["rounds"] == 1 and not result["target_reached"]
    table = bench.format_result("latency", result)
    assert all(name in table for name in METHODS.names()) and "realized" in table


def test_an_unknown_suite_is_refused(tmp_path):
    session = Session(HarnessConfig(limit=32, cache_dir=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="unknown bench suite"):
        bench.run_suite("nope", session)


def test_data_suite_times_decoding_and_the_fed_trace_on_a_synthetic_folder(tmp_path, capsys):
    from harness.datasets.synthetic import write_imagenet_layout

    assert write_imagenet_layout(tmp_path / "val", per_class=1, size=(40, 30)) == 1000
    out = tmp_path / "data.json"
    assert main(["bench", "--suite", "data", "--data", "imagenet", "--data-root", str(tmp_path / "val"),
                 "--templates", "simple", "--limit", "96", "--batch-size", "32", "--workers", "2", "--rounds", "2",
                 "--quant", "fake-w8a8", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())["result"]
    assert result["images"] == 96 and result["workers"] == 2
    timings = result["timings"]
    assert set(timings) == {"decode, 0 workers", "decode, 2 workers", "encode_image, pre-decoded",
                            "trace, pre-decoded", "trace + decode, 2 workers",
                            "trace + decode, 2 workers at normal priority", "trace + decode, 2 workers started once",
                            "fp32 + fake-w8a8 traces, decoded once", "fp32 + fake-w8a8 traces, decoded twice"}
    for key, name, reference in (
            ("input_gap_percent", "encode_image, pre-decoded", "trace + decode, 2 workers"),
            ("input_gap_normal_priority_percent", "encode_image, pre-decoded", "trace + decode, 2 workers at normal priority"),
            ("input_gap_started_percent", "encode_image, pre-decoded", "trace + decode, 2 workers started once"),
            ("worker_start_percent", "trace + decode, 2 workers started once", "trace + decode, 2 workers")):
        expected = 100 * (1 - _per_round_ratio(timings, name, reference))
        assert result[key] == pytest.approx(expected)
        assert result[key.replace("_percent", "_ci")][0] < expected < result[key.replace("_percent", "_ci")][1]
    # the floor: the pre-decoded trace plus the decoding workers' CPU seconds spread over the threads
    decode_cpu = timings["decode, 2 workers"]["cpu_seconds_per_round"]
    assert len(decode_cpu) == 2 and all(cpu > 0 for cpu in decode_cpu)  # the workers' CPU time was reaped
    shared = [t + cpu / result["threads"] for t, cpu in zip(timings["trace, pre-decoded"]["seconds_per_round"],
                                                          decode_cpu)]
    expected = 100 * (1 - _per_round_ratio({**timings, "shared": {"seconds_per_round": shared}},
                                           "encode_image, pre-decoded", "shared"))
    assert result["input_gap_floor_percent"] == pytest.approx(expected)
    assert result["input_gap_floor_ci"][0] < expected < result["input_gap_floor_ci"][1]
    encode = timings["encode_image, pre-decoded"]
    busy = [cpu / wall for cpu, wall in zip(encode["cpu_seconds_per_round"], encode["seconds_per_round"])]
    assert result["tower_busy_threads"] == pytest.approx(sum(busy) / 2) and 0 < result["tower_busy_threads"]
    for key, name in (("input_wait_percent", "trace + decode, 2 workers"),
                      ("input_wait_normal_priority_percent", "trace + decode, 2 workers at normal priority"),
                      ("input_wait_started_percent", "trace + decode, 2 workers started once")):
        fed = timings[name]  # waits after the first batch, as a share of the pass, one per round (no warm-up)
        assert len(fed["wait_seconds_per_round"]) == len(fed["first_batch_wait_seconds_per_round"]) == 2
        assert all(first > 0 for first in fed["first_batch_wait_seconds_per_round"])
        shares = [100 * w / t for w, t in zip(fed["wait_seconds_per_round"], fed["seconds_per_round"])]
        assert result[key] == pytest.approx(sum(shares) / 2)
        assert all(0 <= w + first < t for w, first, t in zip(fed["wait_seconds_per_round"],
                                                          fed["first_batch_wait_seconds_per_round"], fed["seconds_per_round"]))
    expected = 100 * (1 - _per_round_ratio(timings, "fp32 + fake-w8a8 traces, decoded once",
                                           "fp32 + fake-w8a8 traces, decoded twice"))
    assert result["decode_once_saving_percent"] == pytest.approx(expected)
    printed = capsys.readouterr().out
    assert "throughput is" in printed and "below encode_image's on pre-decoded images" in printed and "decoding once" in printed
    assert "with its workers started once (starting and joining them took" in printed
    assert "would alone put the fed trace's gap at about" in printed and "the fed trace waited for input for" in printed


def test_a_synthetic_imagenet_folder_is_an_imagenet_layout(tmp_path):
    import numpy as np

    from harness.datasets import create_dataset
    from harness.datasets.synthetic import synthetic_image, write_imagenet_layout
    from harness.errors import DataError

    assert main(["synth-imagenet", str(tmp_path / "in"), "--per-class", "1", "--train-per-class", "2",
                 "--size", "16x12"]) == 0
    ds = create_dataset("imagenet", root=str(tmp_path / "in" / "val"), train_root=str(tmp_path / "in" / "train"),
                        gate_size=100)
    assert ds.parts() == {"train": 2000, "val": 1000}
    assert ds.read_image("val", 0).size == (16, 12)
    rng = [np.random.default_rng(0) for _ in range(2)]
    assert np.array_equal(np.asarray(synthetic_image(rng[0], (16, 12))), np.asarray(synthetic_image(rng[1], (16, 12))))
    with pytest.raises(DataError, match="is not empty; pass a new folder"):
        write_imagenet_layout(tmp_path / "in" / "val", per_class=1)
    for workers in (0, 2):
        with pytest.raises(DataError, match="at least 1 class and 1 image per class, not 0 and 1"):
            write_imagenet_layout(tmp_path / "none", per_class=1, classes=0, workers=workers)
    assert not (tmp_path / "none").exists()


def test_a_synthetic_folder_does_not_depend_on_the_worker_count(tmp_path):
    from harness.datasets.synthetic import write_imagenet_layout

    for workers in (0, 2):
        assert write_imagenet_layout(tmp_path / str(workers), per_class=2, size=(24, 18), classes=20,
                                     workers=workers) == 40
    files = [sorted(p.relative_to(tmp_path / str(w)) for p in (tmp_path / str(w)).rglob("*.JPEG")) for w in (0, 2)]
    assert files[0] == files[1] and len(files[0]) == 40
    assert all((tmp_path / "0" / f).read_bytes() == (tmp_path / "2" / f).read_bytes() for f in files[0])
    contents = {(tmp_path / "0" / f).read_bytes() for f in files[0]}
    assert len(contents) == 40  # every image its own, within and across classes
