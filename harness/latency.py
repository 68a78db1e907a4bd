"""Latency of the real early-exit driver, each policy against full depth, with a confidence interval.

Timing uses ``torch.utils.benchmark`` at the session's thread count. The
work is done in rounds: each round times every contender, in an order that
rotates from round to round, on the same images twice: one image at a time
(batch 1) and all of them as one batch (the throughput batch). A policy's
saving in a round is ``1 - its time / full depth's time`` in that round, so a
slow drift of the machine cancels out; the reported saving is the mean over
rounds with a Student-t 95% CI. Rounds go on until every CI is within
``target`` points on each side (after at least ``min_rounds``) or
``max_seconds`` have passed; the result says which happened.

The FLOPs saving of the same images comes with it, so each policy's
*realized* saving (latency saving over FLOPs saving) can be read at batch 1
and at the throughput batch.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any, Callable

import numpy as np
import torch

from harness.bench import seconds_per_call
from harness.drivers import run_early_exit
from harness.policy import ExitPolicy
from harness.scoring import FullDepth, outcome_flops
from harness.session import Session

DEFAULT_IMAGES = 32
DEFAULT_TARGET = 2.0  # points: the CI half-width every saving should reach
DEFAULT_MIN_ROUNDS = 5
DEFAULT_MAX_SECONDS = 120.0


def saving_interval(savings: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-round ``savings`` and its Student-t ``level`` CI (NaN bounds with fewer than 2 rounds)."""
    from scipy import stats

    values = np.asarray(savings, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def measure_latency(session: Session, policies: dict[str, ExitPolicy], images: torch.Tensor,
                    target: float = DEFAULT_TARGET, min_rounds: int = DEFAULT_MIN_ROUNDS,
                    max_seconds: float = DEFAULT_MAX_SECONDS) -> dict[str, Any]:
    """Batch-1 and throughput-batch latency of each of ``policies`` and of full depth on ``images``.

    ``session`` (a :class:`~harness.session.Session`) gives the quantized
    backbone, the classifier and the FLOPs counts. Returns the settings, the
    number of rounds, whether every CI reached ``target``, and per contender
    the median time per image and, for each policy, the saving with its CI,
    the FLOPs saving on these images and the realized ratio at both batch sizes.
    """
    backbone, _ = session.quantized()
    classifier = session.classifier
    contenders: dict[str, ExitPolicy] = {"full-depth": FullDepth(), **policies}
    count = len(images)

    def one_by_one(policy: ExitPolicy) -> Callable[[], object]:
        return lambda: [run_early_exit(policy, backbone, images[i:i + 1], classifier) for i in range(count)]

    def batched(policy: ExitPolicy) -> Callable[[], object]:
        return lambda: run_early_exit(policy, backbone, images, classifier)

    calls = {(name, mode): make(policy) for name, policy in contenders.items()
             for mode, make in (("batch1", one_by_one), ("throughput", batched))}
    for fn in calls.values():  # warm-up, not timed
        fn()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    names = list(contenders)
    started, rounds, reached = time.perf_counter(), 0, False
    while True:
        order = names[rounds % len(names):] + names[:rounds % len(names)]
        for name, mode in itertools.product(order, ("batch1", "throughput")):
            times[name, mode].append(seconds_per_call(calls[name, mode]) / count)
        rounds += 1
        savings = {key: _savings(times, key) for key in times if key[0] != "full-depth"}
        widths = [high - m for m, _, high in (saving_interval(s) for s in savings.values())]
        reached = rounds >= min_rounds and all(width <= target for width in widths)  # False while NaN
        if reached or time.perf_counter() - started > max_seconds:
            break

    flops_saving = {name: _flops_saving(session, policy, backbone, images, classifier)
                    for name, policy in policies.items()}
    methods: dict[str, Any] = {}
    for name in names:
        row: dict[str, Any] = {f"{mode}_ms_per_image": 1e3 * float(np.median(times[name, mode]))
                               for mode in ("batch1", "throughput")}
        if name != "full-depth":
            row["flops_saving"] = flops_saving[name]
            for mode in ("batch1", "throughput"):
                mean, low, high = saving_interval(_savings(times, (name, mode)))
                row[f"{mode}_saving"] = mean
                row[f"{mode}_saving_ci"] = None if math.isnan(low) else [low, high]
                row[f"{mode}_realized"] = mean / flops_saving[name] if abs(flops_saving[name]) >= 1.0 else None
        methods[name] = row
    return {"timer": "torch.utils.benchmark", "threads": torch.get_num_threads(), "images": count,
            "throughput_batch": count, "rounds": rounds, "target_ci_halfwidth": target,
            "target_reached": reached, "seconds": round(time.perf_counter() - started, 1), "methods": methods}


def _savings(times: dict[tuple[str, str], list[float]], key: tuple[str, str]) -> list[float]:
    """Per-round saving (%) of ``key`` against full depth in the same mode and round."""
    name, mode = key
    return [100 * (1 - t / full) for t, full in zip(times[name, mode], times["full-depth", mode])]


def _flops_saving(session: Session, policy: ExitPolicy, backbone, images: torch.Tensor, classifier: torch.Tensor) -> float:
    """FLOPs saving (%) of ``policy`` on ``images`` (one batch of the real driver), heads included."""
    outcome = run_early_exit(policy, backbone, images, classifier)
    flops = outcome_flops(policy, outcome, session.token_flops, session.num_blocks)
    return float(100 * (1 - flops.mean() / session.full_flops))
