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

A policy's saving is ``1 - its time / full depth's time``, the time ratio
taken within each round and averaged over rounds by
:func:`harness.paired.round_ratio` (a 20% trimmed mean with its 95% CI: on a
shared machine an interrupted round lands tens of points away from the
rest, and a plain mean lets a few such rounds set the interval). Rounds go on
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

import time
from typing import Any

import numpy as np
import torch
from torch.utils import benchmark

from harness.drivers import run_early_exit
from harness.paired import estimator, percent_less, rotated, round_ratio
from harness.policy import ExitPolicy
from harness.results import LATENCY_CONTROL
from harness.scoring import FullDepth, outcome_flops
from harness.session import Session

MODES = ("batch1", "throughput")
DEFAULT_IMAGES = 32
DEFAULT_TARGET = 2.0  # points: the CI half-width every saving should reach
DEFAULT_MIN_ROUNDS = 5
DEFAULT_MAX_SECONDS = 120.0


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
        savings = {(name, mode): _saving(times, name, mode) for name in names[1:] for mode in MODES}
        reached = rounds >= min_rounds and all(ci and ci[1] - mean <= target for mean, ci in savings.values())
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
                mean, ci = savings[name, mode]
                row[f"{mode}_saving"], row[f"{mode}_saving_ci"] = mean, ci
                row[f"{mode}_realized"] = mean / flops_saving[name] if abs(flops_saving[name]) >= 1.0 else None
        methods[name] = row
    return {"timer": "torch.utils.benchmark.timer", "estimator": estimator(rounds),
            "threads": torch.get_num_threads(), "images": count,
            "throughput_batch": count, "rounds": rounds, "target_ci_halfwidth": target,
            "target_reached": reached, "seconds": round(time.perf_counter() - started, 1), "methods": methods}


def _saving(times: dict[tuple[str, str], list[float]], name: str, mode: str) -> tuple[float, list[float] | None]:
    """Saving (%) of ``name`` against full depth in ``mode``, paired by round, with its 95% CI."""
    return percent_less(round_ratio(times[name, mode], times["full-depth", mode]))


def _flops_saving(session: Session, policy: ExitPolicy, backbone, images: torch.Tensor, classifier: torch.Tensor) -> float:
    """FLOPs saving (%) of ``policy`` on ``images`` (one batch of the real driver), heads included."""
    outcome = run_early_exit(policy, backbone, images, classifier)
    flops = outcome_flops(policy, outcome, session.token_flops, session.num_blocks)
    return float(100 * (1 - flops.mean() / session.full_flops))
