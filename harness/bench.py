"""``python -m harness bench``: throughput ratios measured in one run.

- ``trace``: the trace driver's per-batch work (all blocks + per-layer
  features + embedding + logits) versus open_clip's plain vision forward, on
  the same images, backbone and quantizer. The goal is <= 5% overhead.
- ``quant``: vision-tower throughput of several quantizers on one backbone
  (default: random-init ViT-B-32 at batch 32, as in SPEC section 8).

Both contenders get the same preprocessed images, so image decoding is
outside the comparison. Timings use ``torch.utils.benchmark`` (warm-up excluded), alternating the
contenders over several rounds and reporting medians, because the machines
are noisy; compare ratios, not absolute numbers, across machines.
"""

from __future__ import annotations

import statistics
from typing import Callable

import numpy as np
import torch
import torch.utils.benchmark as benchmark

from harness.backbones import Backbone
from harness.session import Session
from harness.errors import DataError


def _images(session: Session, backbone: Backbone, batch_size: int) -> torch.Tensor:
    """``batch_size`` real test images through the backbone's own preprocessing."""
    split = session.splits["test"]
    count = min(batch_size, len(split))
    if count == 0:
        raise DataError("the test split is empty: nothing to time")
    images = [backbone.preprocess(session.dataset.read_image(split.part, int(i))) for i in split.indices[:count]]
    batch = torch.stack(images)
    repeats = -(-batch_size // count)
    return batch.repeat(repeats, 1, 1, 1)[:batch_size].to(backbone.device)


def seconds_per_call(fn: Callable[[], object], min_run_time: float = 0.0) -> float:
    """Median seconds of one call of ``fn``, timed by ``torch.utils.benchmark`` at the current torch thread
    count (the Timer's own default is one thread): one call when ``min_run_time`` is 0, else as many
    blocks as fill ``min_run_time`` seconds."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time) if min_run_time > 0 else timer.timeit(1)
    return measurement.median


def compare(contenders: dict[str, Callable[[], object]], batch_size: int, rounds: int = 3,
            min_run_time: float = 1.0) -> dict[str, dict[str, float]]:
    """Median seconds per call and images/s for each contender, rounds interleaved."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.inference_mode():
        for fn in contenders.values():  # warm-up, excluded from timing
            fn()
        for _ in range(rounds):
            for name, fn in contenders.items():
                times[name].append(seconds_per_call(fn, min_run_time))
    return {
        name: {"seconds_per_batch": statistics.median(t), "images_per_s": batch_size / statistics.median(t)}
        for name, t in times.items()
    }


def trace_overhead(session: Session, quant: str | None = None, rounds: int = 3) -> dict:
    """Trace driver vs plain ``visual(images)`` on the same quantized backbone."""
    from harness.trace import store_batch, trace_batch

    backbone, _ = session.quantized(quant)
    images = _images(session, backbone, session.config.batch_size)
    classifier = session.classifier
    # the trace contender also copies its output to host arrays, as the driver does
    buffers = {name: np.empty(tuple(t.shape), dtype=t.cpu().numpy().dtype)
               for name, t in trace_batch(backbone, images, classifier).items()}
    result = compare({
        "encode_image": lambda: backbone.visual(images),
        "trace": lambda: store_batch(buffers, 0, trace_batch(backbone, images, classifier)),
    }, len(images), rounds)
    overhead = result["trace"]["seconds_per_batch"] / result["encode_image"]["seconds_per_batch"] - 1
    return {"quant": backbone.quantizer, "batch_size": len(images), "timings": result,
            "trace_overhead_percent": 100 * overhead}


def quantizer_throughput(session: Session, quants: list[str], rounds: int = 3) -> dict:
    """Vision-tower images/s per quantizer on the same images.

    With ``fp32`` among ``quants``, the fp32 tower under ``torch.compile`` runs
    too (``fp32+compile``), so that a compiled int8 scheme's gain can be split
    into what compiling gives and what int8 adds.
    """
    towers = {q: session.quantized(q)[0].visual for q in quants}
    if "fp32" in towers:
        towers["fp32+compile"] = torch.compile(towers["fp32"])
    images = _images(session, session.backbone, session.config.batch_size)
    result = compare({q: (lambda tower=tower: tower(images)) for q, tower in towers.items()}, len(images), rounds)
    base = result[quants[0]]["images_per_s"]
    for timing in result.values():
        timing[f"speedup_vs_{quants[0]}"] = timing["images_per_s"] / base
    return {"batch_size": len(images), "timings": result}
