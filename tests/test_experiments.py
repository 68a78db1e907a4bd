from __future__ import annotations

import json

import numpy as np
import pytest

from harness.config import HarnessConfig
from harness.errors import ConfigError
from harness.experiments import names, run_experiments
from harness.evaluate import pareto_front
from harness.experiments.tables import PAPER_ABLATION, design, effects, parse_factors


def test_factorial_design_is_complete_and_the_preset_is_the_papers_five():
    factors = parse_factors(["head=cls,ssa", "supervision=hard,distilled", "routing=last,adaptive"])
    assert factors == {"feature": ["cls", "patch_mean"], "supervision": ["hard", "distilled"],
                       "routing": ["last", "adaptive"]}
    cells = design(factors)
    assert len(cells) == 8 and len({tuple(c.items()) for c in cells}) == 8
    assert {c["feature"] for c in cells} == {"cls", "patch_mean"}
    assert [label for label, _ in PAPER_ABLATION][0].startswith("(i)") and PAPER_ABLATION[0][1] is None
    assert [c for _, c in PAPER_ABLATION[1:]] == [
        {"feature": "patch_mean", "supervision": s, "routing": r}
        for r, s in [("last", "hard"), ("last", "distilled"), ("adaptive", "hard"), ("adaptive", "distilled")]]
    with pytest.raises(ConfigError, match="lra-ee option"):
        parse_factors(["colour=red,blue"])


def test_main_effect_and_interaction_by_hand():
    factors = {"a": ["lo", "hi"], "b": ["lo", "hi"]}
    cells = design(factors)  # (lo,lo) (lo,hi) (hi,lo) (hi,hi)
    # 4 samples; cell accuracies 0.25, 0.5, 0.5, 1.0
    correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=float)
    rows = {r[0]: float(r[1]) for r in effects(cells, correct, factors)}
    # main effect of a: mean(hi) - mean(lo) = (0.5 + 1.0)/2 - (0.25 + 0.5)/2 = 0.375
    assert rows["a: hi vs lo"] == pytest.approx(37.5)
    assert rows["b: hi vs lo"] == pytest.approx(37.5)
    # interaction: ((1.0 - 0.5) - (0.5 - 0.25)) / 2 = 0.125
    assert rows["a x b"] == pytest.approx(12.5)


def test_pareto_front_keeps_only_undominated_points():
    points = [{"flops_saving": s, "top1": t} for s, t in [(10, 80), (20, 79), (15, 78), (30, 70), (5, 79)]]
    assert [(p["flops_saving"], p["top1"]) for p in pareto_front(points)] == [(10, 80), (20, 79), (30, 70)]


@pytest.fixture(scope="module")
def experiments_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    config = HarnessConfig(limit=64, batch_size=32, cache_dir=str(root / "cache"))
    folders = {}
    for name in ("main", "pareto", "rescue", "compare"):
        (folder,), _ = run_experiments(name, config.resolved(), 2 if name == "main" else 1, {"factor": []},
                                    root / "out")
        folders[name] = folder
    return folders


def test_figures_are_valid_pngs_and_svgs(experiments_out):
    png = (experiments_out["pareto"] / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    import matplotlib.image

    pixels = matplotlib.image.imread(experiments_out["pareto"] / "pareto.png")
    assert pixels.std() > 0.01  # not a blank canvas
    assert (experiments_out["pareto"] / "pareto.svg").read_text().lstrip().startswith(("<?xml", "<svg"))


def test_table_numbers_equal_the_data_they_came_from(experiments_out):
    data = json.loads((experiments_out["main"] / "data.json").read_text())
    table = (experiments_out["main"] / "tables.md").read_text()
    for label, m in data["data"]["measured"].items():
        top1 = m["top1"]
        cell = f"{np.mean(top1):.2f} ± {np.std(top1, ddof=1):.2f}"
        row = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
        assert cell in row
    assert data["seeds"] == 2 and data["config"]["limit"] == 64 and data["environment"]["packages"]["torch"]
    rescue = json.loads((experiments_out["rescue"] / "data.json").read_text())["data"]["quadrants"]
    assert sum(rescue[k] for k in ("both_correct", "rescued", "lost", "both_wrong")) == 64
    assert "| net rescue" in (experiments_out["rescue"] / "tables.md").read_text()
    assert "paper top-1 %" in table and "58.72" in table  # the paper's number, in its own column


def test_unknown_experiment_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="known: all, main"):
        run_experiments("table9", HarnessConfig(limit=8, cache_dir=str(tmp_path)).resolved(), 1, {}, tmp_path)
    assert {"main", "ablation", "rescue", "profile", "pareto", "gates", "pathology"} <= set(names())


def test_compare_chooses_on_gate_at_lra_ees_gate_saving(experiments_out):
    from harness.policy import METHODS, create_method

    saved = json.loads((experiments_out["compare"] / "data.json").read_text())["data"]
    assert set(saved["rows"]) == set(METHODS.names()) | {"static-cls", "static-ssa"}
    table = (experiments_out["compare"] / "tables.md").read_text()
    target = saved["target_saving"]
    assert saved["target_source"] == "lra-ee's default fit, gate split"
    for name, d in saved["rows"].items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} "))
        if d["chosen"] is None:
            assert "out of reach" in row
            continue
        assert d["chosen"]["gate_saving"] >= target  # never a point below the budget
        assert f"{d['chosen']['test_top1']:.2f}" in row
        if d.get("kind") == "control":
            continue
        policy = create_method(name)
        assert d["knob"] == policy.knob and [p["value"] for p in d["test_curve"]] == list(policy.knob_grid)
        # a higher threshold / patience / keep ratio never exits or drops more: saving cannot grow
        savings = [p["flops_saving"] for p in d["test_curve"]]
        assert all(a >= b - 1e-9 for a, b in zip(savings, savings[1:])), (name, savings)
        assert savings[0] > savings[-1]
    assert saved["rows"]["lra-ee"]["chosen"]["knob"] is None  # lra-ee fits itself to the budget
    assert (experiments_out["compare"] / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_with_knob_copies_the_fitted_policy_and_leaves_it_alone(tmp_path):
    from harness.session import Session

    bed = Session(HarnessConfig(limit=64, batch_size=32, cache_dir=str(tmp_path)).resolved(), progress=False)
    for name, value in (("cls-ee", 0.5), ("pabee", 1), ("lra-ee", 0.3)):
        policy = bed.fit(name, 0)
        before = bed.evaluate(policy, 0).metrics
        variant = policy.with_knob(value)
        assert variant is not policy and bed.evaluate(policy, 0).metrics == before
        assert bed.evaluate(variant, 0).metrics["flops_saving"] >= before["flops_saving"] - 1e-9  # a lower setting exits more
        if name != "lra-ee":
            assert getattr(variant.config, policy.knob) == value
            assert policy.with_knob(getattr(policy.config, policy.knob)) is policy
    assert bed.fit("lra-ee", 0).with_knob(0.3).thresholds == [0.3] * len(bed.fit("lra-ee", 0).thresholds)
