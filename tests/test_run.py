from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.config import HarnessConfig
from harness.results import LATENCY_CONTROL
from harness.run import format_tables, resolve_methods, run, table_rows, write_results


def _config(cache_dir) -> HarnessConfig:
    return HarnessConfig(limit=32, batch_size=16, cache_dir=str(cache_dir))


def test_replaying_more_methods_costs_no_backbone_pass(tmp_path, monkeypatch):
    import harness.trace as trace_module

    passes, real = [], trace_module._run_backbones  # passes over data (trace builds): the quantizers of each

    def counted(backbones, *args):
        passes.append(sorted(backbone.quantizer for backbone in backbones))
        return real(backbones, *args)

    monkeypatch.setattr(trace_module, "_run_backbones", counted)
    quant = _config(tmp_path / "a").resolved().quant
    run(_config(tmp_path / "a"), ["cls-ee"], seeds=1, latency=False)
    # heads and gate under the quantizer, test under it and fp32 in one pass over the images
    assert sorted(passes) == sorted([[quant], [quant], sorted(["fp32", quant])])
    passes.clear()
    run(_config(tmp_path / "b"), resolve_methods("all"), seeds=2, latency=False)
    # a fresh cache: the same, with lra-ee's fp32 heads traced in the heads pass, and seed 1's redrawn heads
    # (fp32 too) and gate (--limit); nothing per method
    both = sorted(["fp32", quant])
    assert sorted(passes) == sorted([both, [quant], both, both, [quant]])
    passes.clear()
    run(_config(tmp_path / "b"), resolve_methods("all"), seeds=2, latency=False)
    assert passes == []  # traces and fitted policies all cached


def test_results_folder_and_tables(tmp_path):
    metrics, predictions = run(_config(tmp_path / "cache"), ["cls-ee", "pabee"], seeds=2, latency=True,
                               latency_images=4, latency_seconds=0)
    out = tmp_path / "results"
    write_results(out, metrics, predictions)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["schema_version"] == 2 and saved["run"]["config"]["quant"] == metrics["run"]["config"]["quant"]
    assert saved["environment"]["packages"]["torch"]
    frame = pd.read_parquet(out / "predictions.parquet")
    assert len(frame) == 32 * (2 + 2 * 2 + 2 * 2)  # 2 baselines + 2 controls x 2 seeds + 2 methods x 2 seeds
    assert set(frame.columns) >= {"method", "seed", "label", "exit_layer", "prediction", "correct", "flops"}
    pabee = saved["rows"]["pabee"]
    seed_top1 = [100 * frame[(frame.method == "pabee") & (frame.seed == s)].correct.mean() for s in (0, 1)]
    assert [m["top1"] for m in pabee["per_seed"]] == pytest.approx(seed_top1)
    table = (out / "tables.md").read_text()
    assert f"{pabee['summary']['top1']['mean']:.2f} ± {pabee['summary']['top1']['std']:.2f}" in table
    assert "full-depth fp32" in table and "cls-ee" in table
    assert set(saved["latency"]["methods"]) == {"full-depth", LATENCY_CONTROL, "cls-ee", "pabee"}
    control = saved["latency"]["methods"][LATENCY_CONTROL]  # the negative control, in the quantized full-depth row
    latency_cells = {row[0]: row[5] for row in table_rows(saved)}
    assert latency_cells[f"full-depth {saved['run']['config']['quant']}"] == \
        f"{control['batch1_saving']:.1f} / {control['throughput_saving']:.1f}"
    assert latency_cells["full-depth fp32"] == "-"
    with pytest.raises(Exception, match="exists already"):
        write_results(out, metrics, predictions)
    assert format_tables(metrics) == table


def test_driver_disagreement_is_reported_and_zero_where_batches_match(tmp_path):
    """A per-tensor quantizer (batch-dependent): replay and the real driver see the same full batches at
    full depth, so only exits can make them differ; a batch-invariant one never differs."""
    config = dataclasses.replace(_config(tmp_path / "cache"), quant="fake-w8a3-tensor")
    metrics, _ = run(config, ["cls-ee", "pabee"], seeds=1, latency=False, agreement_images=32)
    agreement = metrics["driver_agreement"]
    assert agreement["images"] == 32 and agreement["batch_invariant"] is False
    assert agreement["tables_from"] == "real driver"
    assert set(agreement["methods"]) == {"full-depth", "cls-ee", "pabee"}
    assert agreement["methods"]["full-depth"] == {"prediction": 0.0, "exit_layer": 0.0}
    assert "Real driver vs trace replay on the first 32 test images" in format_tables(metrics)

    invariant = dataclasses.replace(config, quant="int8-torchao")
    metrics, _ = run(invariant, ["cls-ee", "pabee"], seeds=1, latency=False, agreement_images=32)
    assert metrics["driver_agreement"]["batch_invariant"] is True
    assert all(d == {"prediction": 0.0, "exit_layer": 0.0} for d in metrics["driver_agreement"]["methods"].values())


PLUGIN = '''
from dataclasses import dataclass

import torch

from harness.policy import Decision, ExitPolicy, register_method


@dataclass
class HalfwayConfig:
    layer: int = 6  # everyone leaves here with the zero-shot-free guess "class 0"


@register_method("halfway")
class Halfway(ExitPolicy):
    """Test plugin: every sample exits after block `layer`."""

    Config = HalfwayConfig

    def fit(self, ctx):
        self.classes = ctx.num_classes

    def exit_layers(self):
        return [self.config.layer]

    def decide(self, layer, view):
        logits = torch.zeros(len(view), self.classes)
        logits[:, 0] = 1
        return Decision(exit=torch.ones(len(view), dtype=torch.bool), logits=logits)

    def state_dict(self):
        return {"classes": self.classes}

    def load_state_dict(self, state):
        self.classes = state["classes"]
'''


def test_plugin_from_another_package_runs_through_run(tmp_path, install_plugin):
    site = tmp_path / "site"
    install_plugin(tmp_path, "halfway-plugin", "halfway_plugin", PLUGIN, site)
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "run", "--methods", "halfway,cls-ee", "--seeds", "1", "--limit", "16",
         "--batch-size", "16", "--no-latency", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert rows["halfway"]["per_seed"][0]["exit_distribution"] == {"6": 100.0}
    assert rows["halfway"]["per_seed"][0]["flops_saving_paper_formula"] == pytest.approx(50.0)
    assert "halfway" in proc.stdout and "cls-ee" in proc.stdout


def test_set_overrides_a_method_config_and_is_recorded(tmp_path):
    from harness.errors import ConfigError
    from harness.run import parse_overrides

    methods = ["pabee", "lra-ee"]
    assert parse_overrides(["pabee.patience=5", "lra-ee.exit_layers=[8, 10]", "lra-ee.gate=heuristic"], methods) == {
        "pabee": {"patience": 5}, "lra-ee": {"exit_layers": (8, 10), "gate": "heuristic"}}
    for bad, message in [("pabee.patience", "METHOD.KEY=VALUE"), ("cls-ee.threshold=0.5", "not among"),
                         ("pabee.patients=5", "options: ")]:
        with pytest.raises(ConfigError, match=message):
            parse_overrides([bad], methods)
    metrics, frame = run(_config(tmp_path), ["pabee"], seeds=1, latency=False, agreement_images=0,
                         overrides={"pabee": {"patience": 11}})
    assert metrics["rows"]["pabee"]["config"]["patience"] == 11 and metrics["run"]["overrides"]
    assert set(frame[frame.method == "pabee"].exit_layer) == {12}  # 11 agreeing layers never happen before 12


def test_a_bad_test_image_is_skipped_by_every_pass_and_rows_stay_aligned(tmp_path, embedded_dataset):
    """--on-bad-image skip holds after the trace: agreement and latency read through the same batching,
    and the agreement pass compares each image with its own trace row."""
    from harness.datasets import create_dataset
    from harness.datasets.fashion_mnist import CLASSES

    root = tmp_path / "folder"
    labels = embedded_dataset.labels("test")
    for i in range(120):
        folder = root / CLASSES[labels[i]].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        embedded_dataset.read_image("test", i).save(folder / f"{i:03d}.png")
    dataset = create_dataset("imagefolder", str(root))
    test = dataset.splits(0)["test"]
    bad = Path(dataset.describe_sample("all", int(test.indices[3])))
    bad.write_bytes(b"")  # the fourth test image: every later row would shift by one if misaligned
    heads_bad = Path(dataset.describe_sample("all", int(dataset.splits(0)["heads"].indices[0])))
    heads_bad.write_bytes(b"not an image")

    config = HarnessConfig(data="imagefolder", data_root=str(root), quant="fp32", batch_size=16,
                           cache_dir=str(tmp_path / "cache"))
    metrics, _ = run(config, ["cls-ee"], seeds=1, latency=True, latency_images=8, latency_seconds=0,
                     agreement_images=60)
    bad_images = metrics["run"]["bad_images"]
    assert [b["sample"] for b in bad_images["test"]] == [str(bad)]
    assert [b["sample"] for b in bad_images["heads"]] == [str(heads_bad)]
    assert bad_images["gate"] == []
    assert metrics["driver_agreement"]["images"] == 59
    # fp32 is batch-invariant: the real driver reproduces every replayed row exactly when rows line up
    assert all(d == {"prediction": 0.0, "exit_layer": 0.0} for d in metrics["driver_agreement"]["methods"].values())
    assert metrics["latency"]["images"] == 7
