"""Operating points chosen on held-out data, and the controls every method is credited against.

For each FLOPs-saving budget (``--budgets``, percent), a method's operating
point is chosen on the ``gate`` split of the seed, never on ``test``:

- a method that fits its own operating point under a budget
  (:meth:`~harness.policy.ExitPolicy.budget_config`, LRA-EE's thresholds) is
  refitted with the budget, and kept if its gate saving meets the budget;
- any other method's :attr:`~harness.policy.ExitPolicy.knob` is swept over
  its grid on ``gate``, and the value with the best gate top-1 among those
  whose gate saving is at least the budget is kept (ties: the larger
  saving).

Either way, a point whose gate saving falls short of the budget does not
count: the budget is out of the method's reach (reported as such).

The chosen point is then scored on ``test``. The controls
(:mod:`harness.controls`: a static exit after one block, with a CLS or a
patch-mean head) are chosen by the same rule, their block being the knob;
a method's **routing gain** at a budget is its test top-1 minus that of the
control with the best gate top-1 at the same budget (a paired McNemar test
on the test samples says whether it is significant).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from harness.controls import CONTROL_FEATURES
from harness.drivers import ExitOutcome
from harness.errors import ConfigError
from harness.evaluate import quadrants
from harness.policy import ExitPolicy
from harness.session import Session

DEFAULT_BUDGETS = (10.0, 25.0, 40.0)


def parse_budgets(spec: str) -> tuple[float, ...]:
    """``"10,25,40"`` -> (10.0, 25.0, 40.0): distinct FLOPs-saving percentages in [0, 100), ascending.

    Raises:
        ConfigError: not numbers, out of range, or none.
    """
    try:
        budgets = sorted({float(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"--budgets {spec!r}: expected comma-separated percentages, e.g. 10,25,40") from None
    if not budgets or not all(0 <= b < 100 for b in budgets):
        raise ConfigError(f"--budgets {spec!r}: each budget is a FLOPs saving in percent, at least 0 and below 100")
    return tuple(budgets)


@dataclass
class OperatingPoint:
    """One policy at one budget and seed: chosen on ``gate``, scored on ``test``."""

    budget: float
    knob: float | None  # the chosen knob value; None for a method that fitted itself to the budget
    gate_top1: float
    gate_saving: float  # at least the budget
    test_top1: float
    test_saving: float
    # bool per test sample: all a point keeps of its evaluation, for the paired tests, so that the
    # points of every control, budget and seed a run holds cost one byte a sample each
    correct: np.ndarray = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "knob": self.knob, "gate_top1": self.gate_top1,
                "gate_saving": self.gate_saving, "test_top1": self.test_top1,
                "test_saving": self.test_saving}


def gate_curve(session: Session, policy: ExitPolicy, seed: int) -> list[dict[str, Any]]:
    """``policy`` at each value of its knob grid on the ``gate`` split: ``knob``, ``top1``, ``flops_saving``.

    A policy without a knob has one point, its own setting (``knob`` None).
    """
    if policy.knob is None:
        return [{"knob": None, **session.gate_point(policy, seed)}]
    variants = [policy.with_knob(value) for value in policy.knob_grid]
    points = session.gate_points(variants, seed, desc=f"{policy.name} gate, {len(variants)} values of {policy.knob}")
    return [{"knob": value, **point} for value, point in zip(policy.knob_grid, points)]


def choose(curve: list[dict[str, Any]], budget: float) -> dict[str, Any] | None:
    """The point of ``curve`` with the best gate top-1 among those saving at least ``budget``; ties go to
    the larger saving, then to the earlier point. None when no point saves that much."""
    eligible = [p for p in curve if p["flops_saving"] >= budget]
    if not eligible:
        return None
    return max(eligible, key=lambda p: (p["top1"], p["flops_saving"]))


def _scored(session: Session, policy: ExitPolicy, seed: int, budget: float, knob: float | None,
            gate: dict[str, Any], outcome: ExitOutcome) -> OperatingPoint:
    """The operating point of ``policy`` as chosen on ``gate``, scored by its ``outcome`` on ``test`` (no
    bootstrap CIs: an operating point reports its seeds' spread instead)."""
    evaluation = session.evaluate(policy, seed, outcome, intervals=False)
    return OperatingPoint(budget, knob, gate["top1"], gate["flops_saving"], evaluation.metrics["top1"],
                          evaluation.metrics["flops_saving"], evaluation.correct)


def policy_points(session: Session, policy: ExitPolicy, seed: int, budgets: tuple[float, ...],
                  refit: Callable[[dict[str, Any]], ExitPolicy] | None = None) -> list[OperatingPoint | None]:
    """Fitted ``policy`` (a method or a control) at each budget for ``seed``; None where out of reach.

    ``refit(overrides)`` fits the policy again with the config overrides of
    :meth:`~harness.policy.ExitPolicy.budget_config`, for a method that fits
    itself to a budget; without it (controls) the knob is always swept. The
    chosen settings are scored on ``test`` together (one real-driver pass).
    """
    curve = None
    chosen: list[tuple[float, ExitPolicy, float | None, dict[str, Any]] | None] = []
    for budget in budgets:
        overrides = policy.budget_config(budget) if refit is not None else {}
        if overrides:
            fitted = refit(overrides)
            gate = session.gate_point(fitted, seed)
            chosen.append((budget, fitted, None, gate) if gate["flops_saving"] >= budget else None)
            continue
        curve = curve if curve is not None else gate_curve(session, policy, seed)
        pick = choose(curve, budget)
        chosen.append(None if pick is None else
                      (budget, policy if pick["knob"] is None else policy.with_knob(pick["knob"]), pick["knob"], pick))
    reached = [c for c in chosen if c is not None]
    outcomes = iter(session.outcomes([variant for _, variant, _, _ in reached],
                                     desc=f"{policy.name} at {len(reached)} budgets (real driver)"))
    return [None if c is None else _scored(session, c[1], seed, c[0], c[2], c[3], next(outcomes))
            for c in chosen]


def method_points(session: Session, name: str, seed: int, budgets: tuple[float, ...],
                  config: dict[str, Any]) -> list[OperatingPoint | None]:
    """``name`` (with ``config`` overrides) at each budget for ``seed``; None where the budget is out of reach."""
    return policy_points(session, session.fit(name, seed, **config), seed, budgets,
                         refit=lambda overrides: session.fit(name, seed, **{**config, **overrides}))


def control_points(session: Session, seed: int, budgets: tuple[float, ...]) -> dict[str, list[OperatingPoint | None]]:
    """Each control's static exit at each budget for ``seed``, its block chosen on ``gate``."""
    return {name: policy_points(session, session.fit_control(name, seed), seed, budgets) for name in CONTROL_FEATURES}


def best_control(controls: dict[str, list[OperatingPoint | None]], index: int) -> tuple[str, OperatingPoint] | None:
    """The control with the best gate top-1 at budget ``index`` (ties: larger gate saving), or None."""
    candidates = [(name, points[index]) for name, points in controls.items() if points[index] is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda c: (c[1].gate_top1, c[1].gate_saving))


def paired_gain(point: OperatingPoint, reference: OperatingPoint) -> tuple[float, float]:
    """``point``'s test top-1 minus ``reference``'s (points), and McNemar's exact p on the same test samples."""
    return point.test_top1 - reference.test_top1, quadrants(point.correct, reference.correct).mcnemar_p


def routing_gain(point: OperatingPoint, control: tuple[str, OperatingPoint] | None) -> dict[str, Any]:
    """``point``'s test top-1 minus the best control's at the same budget, with McNemar's exact p."""
    if control is None:
        return {"control": None, "control_knob": None, "routing_gain": None, "routing_p": None}
    name, reference = control
    gain, p = paired_gain(point, reference)
    return {"control": name, "control_knob": reference.knob, "routing_gain": gain, "routing_p": p}


def recalibration_points(session: Session, seed: int) -> dict[str, OperatingPoint]:
    """Each control at its default block, the last, for ``seed``: recalibration, every sample running the
    whole tower and classified by a head trained on the quantized last block (no FLOPs saved)."""
    points = {}
    for name in CONTROL_FEATURES:
        policy = session.fit_control(name, seed)
        points[name] = _scored(session, policy, seed, 0.0, session.num_blocks, session.gate_point(policy, seed),
                               session.outcome(policy))
    return points


def recalibration_point(session: Session, seed: int) -> tuple[str, OperatingPoint]:
    """The recalibration control for ``seed``: of the CLS and the patch-mean head on the last block
    (:func:`recalibration_points`), the one with the better gate top-1."""
    return max(recalibration_points(session, seed).items(), key=lambda c: c[1].gate_top1)


def summarize(per_seed: list[list[dict[str, Any] | None]], budgets: tuple[float, ...]) -> list[dict[str, Any]]:
    """Per budget: mean and std over seeds of test top-1, test saving and routing gain, and the knobs chosen.

    Seeds where the budget was out of reach count in ``reached``, not in the means.
    """
    out = []
    for i, budget in enumerate(budgets):
        points = [seed_points[i] for seed_points in per_seed if seed_points[i] is not None]
        entry: dict[str, Any] = {"budget": budget, "reached": len(points), "seeds": len(per_seed),
                                 "knobs": [p["knob"] for p in points]}
        for key in ("test_top1", "test_saving", "gate_top1", "gate_saving", "routing_gain"):
            values = [p[key] for p in points if p.get(key) is not None]
            entry[key] = {"mean": float(np.mean(values)) if values else None,
                          "std": float(np.std(values, ddof=1)) if len(values) > 1 else (0.0 if values else None)}
        out.append(entry)
    return out


def at_budget(session: Session, seed: int, budget: float, methods: tuple[str, ...]) -> dict[str, Any]:
    """Full depth, recalibration, the best static exit and each of ``methods`` at ``budget`` for ``seed``.

    Each method row (None where the budget is out of reach) carries its
    operating point, its gain over recalibration and over the best static
    exit, its net rescue over full depth (rescued minus lost samples), each
    with McNemar's p on the paired test samples, and its earliest exit layer.
    """
    recal_name, recal = recalibration_point(session, seed)
    static = best_control(control_points(session, seed, (budget,)), 0)
    out: dict[str, Any] = {
        "full_depth_top1": float(100 * session.baseline_correct.mean()),
        "recalibration": {"control": recal_name, **recal.as_dict()},
        "best_static": None if static is None else {"control": static[0], **static[1].as_dict()},
        "methods": {},
    }
    for name in methods:
        (point,) = method_points(session, name, seed, (budget,), {})
        if point is None:
            out["methods"][name] = None
            continue
        versus_full = quadrants(point.correct, session.baseline_correct)
        row = {**point.as_dict(), "net_rescue": versus_full.net_rescue, "p_vs_full_depth": versus_full.mcnemar_p,
               "earliest_exit": min(session.fit(name, seed).exit_layers(), default=session.num_blocks + 1)}
        for label, reference in (("recalibration", recal), ("static", None if static is None else static[1])):
            if reference is not None:
                row[f"gain_vs_{label}"], row[f"p_vs_{label}"] = paired_gain(point, reference)
        out["methods"][name] = row
    return out
