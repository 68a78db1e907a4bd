"""Paired rounds: how two timed contenders compare, round by round, with a confidence interval.

Each round times every contender once, in an order that rotates from round
to round (:func:`rotated`), so that no contender always follows the same
one. Two contenders are compared by the ratio of their times within each
round, so slow drift of the machine cancels out, and the ratios' 20%
trimmed mean is reported with its 95% CI (:func:`trimmed_interval`): on a
shared machine an interrupted round lands far from the rest, and a plain
mean lets a few such rounds set the interval.

:mod:`harness.latency` (savings against full depth) and :mod:`harness.bench`
(throughput ratios) both read their numbers through :func:`round_ratio`.
"""

from __future__ import annotations

import numpy as np

# share of rounds cut from each end before averaging
TRIM = 0.2

Ratio = tuple[float, "list[float] | None"]  # a mean and its 95% CI (None from a single round)


def rotated(names: list[str], shift: int) -> list[str]:
    """``names`` starting at position ``shift`` (mod their number), wrapping around."""
    shift %= len(names)
    return names[shift:] + names[:shift]


def _trims(rounds: int) -> bool:
    """Whether :data:`TRIM` cuts any of ``rounds`` rounds (from 5 on)."""
    return int(TRIM * rounds) > 0


def trimmed_interval(values: list[float], level: float = 0.95) -> Ratio:
    """The :data:`TRIM` trimmed mean of per-round ``values`` and its ``level`` CI (Tukey-McLaughlin / Yuen:
    winsorized standard error, Student-t with one less degree of freedom than the rounds kept). With too few
    rounds to cut any (under 5), the plain mean and its Student-t CI; no CI (None) from a single round."""
    from scipy.stats import mstats

    array = np.asarray(values, dtype=np.float64)
    limits = (TRIM, TRIM) if _trims(len(array)) else None
    mean = float(mstats.trimmed_mean(array, limits=limits))
    if len(array) < 2:
        return mean, None
    low, high = mstats.trimmed_mean_ci(array, limits=limits, alpha=1 - level)
    return mean, [float(low), float(high)]


def estimator(rounds: int) -> str:
    """What :func:`round_ratio` reports from ``rounds`` rounds, in words."""
    if _trims(rounds):
        return f"{TRIM:.0%} trimmed means of per-round ratios, 95% CIs"
    return "means of per-round ratios, 95% CIs" if rounds > 1 else "one round: no CIs"


def round_ratio(times: list[float], reference: list[float]) -> Ratio:
    """``times`` over ``reference``, round by round: the trimmed mean of the per-round ratios and its 95% CI
    (:func:`trimmed_interval`); no CI from a single round."""
    return trimmed_interval([t / r for t, r in zip(times, reference, strict=True)])


def percent(ratio: Ratio) -> Ratio:
    """A ratio (with its CI) in percent: a share."""
    mean, ci = ratio
    return 100 * mean, ci and [100 * ci[0], 100 * ci[1]]


def percent_less(ratio: Ratio) -> Ratio:
    """A time ratio (with its CI) as percent less time: a saving."""
    mean, ci = ratio
    return 100 * (1 - mean), ci and [100 * (1 - ci[1]), 100 * (1 - ci[0])]


def percent_more(ratio: Ratio) -> Ratio:
    """A time ratio (with its CI) as percent more time: an overhead."""
    mean, ci = ratio
    return 100 * (mean - 1), ci and [100 * (ci[0] - 1), 100 * (ci[1] - 1)]
