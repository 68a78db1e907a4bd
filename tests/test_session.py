"""The one session object: what derived sessions share, fits kept once, and policies without exits."""

from __future__ import annotations

import numpy as np
import pytest

import harness.session as session_module
from harness.config import HarnessConfig
from harness.policy import ExitPolicy
from harness.protocol import at_budget
from harness.scoring import FullDepth
from harness.session import Session


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Session:
    cache = tmp_path_factory.mktemp("cache")
    return Session(HarnessConfig(limit=64, batch_size=32, quant="fake-w8a8", cache_dir=str(cache)), progress=False)


def test_a_fit_is_made_once_per_session_and_seed(session):
    assert session.fit("cls-ee", 0) is session.fit("cls-ee", 0)
    assert session.fit("cls-ee", 1) is not session.fit("cls-ee", 0)
    assert session.fit("cls-ee", 0, epochs=1) is not session.fit("cls-ee", 0)
    # another seed's fit is made on that seed's own heads split
    assert not np.array_equal(session.seeded(1).trace(None, "heads").indices, session.trace(None, "heads").indices)
    assert session.fit_control("static-cls", 0) is session.fit_control("static-cls", 0)


def test_derived_sessions_share_the_backbone_and_keep_only_what_still_holds(session, count_calls):
    test = session.test  # the backbone is loaded now
    loads = count_calls(session_module, "create_backbone")
    seeded = session.seeded(1)
    assert seeded is session.seeded(1) and session.seeded(0) is session
    assert seeded.backbone is session.backbone and seeded.test is test  # test is the same for every seed
    assert seeded.splits["heads"].indices.tolist() != session.splits["heads"].indices.tolist()
    fp32 = session.derived(quant="fp32")
    assert fp32.backbone is session.backbone
    assert fp32.test is not test and fp32.test.path != test.path  # another quantizer's trace
    assert fp32.fit("cls-ee", 0) is not session.fit("cls-ee", 0)  # fits on another quantizer's features
    smaller = session.derived(limit=32)
    assert smaller.backbone is session.backbone and len(smaller.test) == 32
    assert loads["n"] == 0  # every derived session used the loaded backbone
    with pytest.raises(ValueError, match="seed, quant or limit only"):
        session.derived(batch_size=8)


def test_at_budget_across_quantizers_loads_the_backbone_once(tmp_path, count_calls):
    loads = count_calls(session_module, "create_backbone")
    root = Session(HarnessConfig(limit=32, batch_size=32, cache_dir=str(tmp_path)), progress=False)
    for quant in ("fp32", "fake-w8a8"):
        row = at_budget(root.derived(quant=quant), 0, 25.0, ("cls-ee",))
        assert row["recalibration"]["control"] in ("static-cls", "static-ssa")
    assert loads["n"] == 1


class ExitsWithoutDecide(ExitPolicy):
    name = "exits-without-decide"

    def fit(self, ctx) -> None:
        pass

    def exit_layers(self) -> list[int]:
        return [3]


def test_a_policy_needs_decide_only_when_it_declares_exit_layers(session):
    outcome = session.real_outcomes([FullDepth()], session.test)[0]  # no exit layers, no decide: full depth
    np.testing.assert_array_equal(outcome.predictions, np.asarray(session.test.logits).argmax(1))
    with pytest.raises(NotImplementedError, match=r"exits-without-decide declares exit layers \[3\] but implements no"):
        session.real_outcomes([ExitsWithoutDecide()], session.test)[0]


def test_leaving_out_the_intervals_changes_nothing_else(session):
    policy = session.fit("pabee", 0)
    full, quick = session.evaluate(policy, 0).metrics, session.evaluate(policy, 0, intervals=False).metrics
    assert quick["top1_ci"] is None and quick["flops_saving_ci"] is None
    assert full["top1_ci"][0] <= full["top1"] <= full["top1_ci"][1]
    assert {k: v for k, v in quick.items() if not k.endswith("_ci")} == {
        k: v for k, v in full.items() if not k.endswith("_ci")}
