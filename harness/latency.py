"""Latency of the real early-exit driver, each policy against full depth, with a confidence interval.

Times are read with ``torch.utils.benchmark``'s clock (``benchmark.timer``,
which waits for the accelerator on a GPU) at the session's thread count,
after one untimed warm-up pass of every contender. The work is done in
rounds: each round times every contender, in an order that rotates from
round to round, on the same images twice: one image after another (batch
1) and all of them as one batch (the throughput batch). A contender's
images run back to back, as a deployed policy would run them; interleaving
the contenders image by image leaves each policy's own heads cold while the
backbone they share stays warm, and that cost exit methods several points
of batch-1 saving on the embedded model. ``benchmark.Timer.timeit`` is not
used: it runs every call twice more as its own warm-up, tripling the cost
of a round.

A policy's saving in a round is ``1 - its time / full depth's time`` in that
round, so slow drift of the machine cancels out. The reported saving is the
20% trimmed mean over rounds with its 95% CI (:func:`saving_interval`): on a
shared machine an interrupted round lands tens of points away from the
rest, and a plain mean lets a few such rounds set the interval. Rounds go on
until every CI is within ``target`` points on each side (after at least
``min_rounds``) or ``max_seconds`` have passed; the result says which.

Beside the policies runs a second, identical full-depth contender, the
negative control: its true saving is zero, so its interval shows the
instrument's own noise and should cover 0.

The FLOPs saving of the same images comes with it, so each policy's
*realized* saving (latency saving over FLOPs saving) can be read at batch 1
and at the throughput batch.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch.utils import benchmark

from harness.drivers import run_early_exit
from harness.policy import ExitPolicy
from harness.results import LATENCY_CONTROL
from harness.scoring import FullDepth, outcome_flops
from harness.session import Session

MODES = ("batch1", "throughput")
DEFAULT_IMAGES = 32
DEFAULT_TARGET = 2.0  # points: the CI half-width every saving should reach
DEFAULT_MIN_ROUNDS = 5
DEFAULT_MAX_SECONDS = 120.0
# share of rounds cut from each end before averaging: a round the machine interrupts is far off the others
TRIM = 0.2


def saving_interval(savings: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """The :data:`TRIM` trimmed mean of per-round ``savings`` and its ``level`` CI (Tukey-McLaughlin / Yuen:
    winsorized standard error, Student-t with one less degree of freedom than the rounds kept). With too few
    rounds to cut any (under 5), the plain mean and its Student-t CI; NaN bounds with fewer than 2 rounds."""
    from scipy.stats import mstats

    values = np.asarray(savings, dtype=np.float64)
    limits = (TRIM, TRIM) if int(TRIM * len(values)) else None
    mean = float(mstats.trimmed_mean(values, limits=limits))
    if len(values) < 2:
        return mean, math.nan, math.nan
    low, high = mstats.trimmed_mean_ci(values, limits=limits, alpha=1 - level)
    return mean, float(low), float(high)


def measure_latency(session: Session, policies: dict[str, ExitPolicy], images: torch.Tensor,
                    target: float = DEFAULT_TARGET, min_rounds: int = DEFAULT_MIN_ROUNDS,
                    max_seconds: float = DEFAULT_MAX_SECONDS) -> dict[str, Any]:
    """Batch-1 and throughput-batch latency of each of ``policies`` and of full depth on ``images``.

    ``session`` (a :class:`~harness.session.Session`) gives the quantized
    backbone, the classifier and the FLOPs counts. Returns the settings, the
    number of rounds, whether every CI reached ``target``, and per contender
    the median time per image and, for each policy and the negative control
    (:data:`~harness.results.LATENCY_CONTROL`), the saving with its CI, the
    FLOPs saving on these images and the realized ratio at both batch sizes.
    """
    backbone, _ = session.quantized()
    classifier = session.classifier
    # the control goes last, so that in most rounds it does not run right after the identical full depth
    contenders: dict[str, ExitPolicy] = {"full-depth": FullDepth(), **policies, LATENCY_CONTROL: FullDepth()}
    names, count = list(contenders), len(images)

    def seconds(name: str, mode: str) -> float:
        """One timed pass of contender ``name`` over the images: one at a time, or as one batch."""
        policy = contenders[name]
        start = benchmark.timer()
        if mode == "batch1":
            for i in range(count):
                run_early_exit(policy, backbone, images[i:i + 1], classifier)
        else:
            run_early_exit(policy, backbone, images, classifier)
        return benchmark.timer() - start

    for name in names:  # warm-up, not timed
        for mode in MODES:
            seconds(name, mode)
    times: dict[tuple[str, str], list[float]] = {(name, mode): [] for name in names for mode in MODES}
    started, rounds, reached = time.perf_counter(), 0, False
    while True:
        for name in rotated(names, rounds):
            for mode in MODES:
                times[name, mode].append(seconds(name, mode) / count)
        rounds += 1
        widths = [high - mean for mean, _, high in (saving_interval(_savings(times, (name, mode)))
                                                     for name in names[1:] for mode in MODES)]
        reached = rounds >= min_rounds and all(width <= target for width in widths)  # False while NaN
        if reached or time.perf_counter() - started > max_seconds:
            break

    flops_saving = {name: _flops_saving(session, contenders[name], backbone, images, classifier) for name in names[1:]}
    methods: dict[str, Any] = {}
    for name in names:
        row: dict[str, Any] = {f"{mode}_ms_per_image": 1e3 * float(np.median(times[name, mode]))
                               for mode in MODES}
        if name != "full-depth":
            row["flops_saving"] = flops_saving[name]
            for mode in MODES:
                mean, low, high = saving_interval(_savings(times, (name, mode)))
                row[f"{mode}_saving"] = mean
                row[f"{mode}_saving_ci"] = None if math.isnan(low) else [low, high]
                row[f"{mode}_realized"] = mean / flops_saving[name] if abs(flops_saving[name]) >= 1.0 else None
        methods[name] = row
    return {"timer": "torch.utils.benchmark.timer", "estimator": f"{TRIM:.0%} trimmed mean over rounds, 95% CI",
            "threads": torch.get_num_threads(), "images": count,
            "throughput_batch": count, "rounds": rounds, "target_ci_halfwidth": target,
            "target_reached": reached, "seconds": round(time.perf_counter() - started, 1), "methods": methods}


def rotated(names: list[str], shift: int) -> list[str]:
    """``names`` starting at position ``shift`` (mod their number), wrapping around."""
    shift %= len(names)
    return names[shift:] + names[:shift]


def _savings(times: dict[tuple[str, str], list[float]], key: tuple[str, str]) -> list[float]:
    """Per-round saving (%) of ``key`` against full depth in the same mode and round."""
    name, mode = key
    return [100 * (1 - t / full) for t, full in zip(times[name, mode], times["full-depth", mode])]


def _flops_saving(session: Session, policy: ExitPolicy, backbone, images: torch.Tensor, classifier: torch.Tensor) -> float:
    """FLOPs saving (%) of ``policy`` on ``images`` (one batch of the real driver), heads included."""
    outcome = run_early_exit(policy, backbone, images, classifier)
    flops = outcome_flops(policy, outcome, session.token_flops, session.num_blocks)
    return float(100 * (1 - flops.mean() / session.full_flops))
