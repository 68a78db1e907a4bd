"""``python -m harness bench``: throughput and latency ratios, each measured within one run.

- ``trace``: the trace driver's per-batch work (all blocks + per-layer
  features + embedding + logits) versus open_clip's plain vision forward, on
  the same images, backbone and quantizer. The goal is <= 5% overhead. Under
  a fake-quantizing scheme the trace also runs with its activation rounding
  unfused (eager mode), the speed-up of the fused kernel.
- ``quant``: vision-tower throughput of several quantizers on one backbone
  (default: random-init ViT-B-32 at batch 32, as in SPEC section 8), with
  the fp32 tower under ``torch.compile`` beside them.
- ``latency``: every registered method, fitted for the first seed, against
  full depth under the real driver (:mod:`harness.latency`: paired rounds,
  95% CIs, realized latency / FLOPs saving at batch 1 and at the batch).
- ``data``: the input pipeline: decoding alone (in this process and with
  ``--workers`` DataLoader processes), and the trace fed by the workers
  against ``encode_image`` on pre-decoded images (is tracing input-bound?),
  with how long the fed trace waits for its batches and, on the CPU, the
  floor that decoding's own CPU time sets on the gap (an estimate).
- ``all``: the four, each with its own settings (``quant`` on the random-init
  ViT-B-32 at batch 32; ``data`` on the same tower fed a synthetic ImageNet
  val folder; the others on the given config), written to
  ``results/bench/`` with the machine described.

Contenders get the same preprocessed images, so image decoding is outside
the comparison (except in ``data``, which measures it). Timings use ``torch.utils.benchmark`` at the session's torch
thread count (warm-up excluded), alternating the contenders over several
rounds (:data:`DEFAULT_ROUNDS`), because the machines are noisy: a ratio of
two contenders is taken within each round, and its mean over the rounds
(20% trimmed from 5 rounds on: :mod:`harness.paired`) is reported with a
95% CI, beside each contender's median time.
Compare ratios, not absolute numbers, across machines.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.utils.benchmark as benchmark

from harness.backbones import Backbone
from harness.paired import Ratio, estimator, percent, percent_less, percent_more, rotated, round_ratio
from harness.session import Session


def _images(session: Session, backbone: Backbone, batch_size: int) -> torch.Tensor:
    """``batch_size`` real test images, preprocessed (repeated when the test split has fewer; none readable
    raises :class:`~harness.errors.DataError`, from :meth:`Session.test_images`)."""
    batch, _ = session.test_images(batch_size)
    repeats = -(-batch_size // len(batch))
    return batch.repeat(repeats, 1, 1, 1)[:batch_size].to(backbone.device)


def seconds_per_call(fn: Callable[[], object], min_run_time: float = 0.0) -> float:
    """Seconds of one call of ``fn`` when ``min_run_time`` is 0 (by ``torch.utils.benchmark``'s clock, which
    waits for a GPU; not ``Timer.timeit``, which calls ``fn`` twice more as its own warm-up), else the
    median of ``Timer.blocked_autorange``'s blocks filling ``min_run_time`` seconds, at the current torch
    thread count (the Timer's own default is one thread)."""
    if min_run_time <= 0:
        start = benchmark.timer()
        fn()
        return benchmark.timer() - start
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def compare(contenders: dict[str, Callable[[], object]], batch_size: int, rounds: int = 3,
            min_run_time: float = 1.0) -> dict[str, dict]:
    """Median seconds per call and images/s for each contender, and its seconds in every round.

    Each round times every contender once, starting one further along each round, so that no contender
    always follows the same one; :func:`paired_ratio` compares two contenders round by round.
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.inference_mode():
        for fn in contenders.values():  # warm-up, excluded from timing
            fn()
        for shift in range(rounds):
            for name in rotated(list(contenders), shift):
                times[name].append(seconds_per_call(contenders[name], min_run_time))
    return {
        name: {"seconds_per_batch": statistics.median(t), "images_per_s": batch_size / statistics.median(t),
               "seconds_per_round": t}
        for name, t in times.items()
    }


def paired_ratio(result: dict[str, dict], name: str, reference: str) -> Ratio:
    """``name``'s time over ``reference``'s in a :func:`compare` result, paired by round, with its 95% CI
    (:func:`harness.paired.round_ratio`)."""
    return round_ratio(result[name]["seconds_per_round"], result[reference]["seconds_per_round"])


def trace_overhead(session: Session, quant: str | None = None, rounds: int = 3) -> dict:
    """Trace driver vs plain ``visual(images)`` on the same quantized backbone."""
    from harness.quantizers._fake import FakeQuantLinear, eager_fake_quantization, fusion_active
    from harness.trace import store_batch, trace_batch

    backbone, _ = session.quantized(quant)
    images = _images(session, backbone, session.config.batch_size)
    classifier = session.classifier
    # the trace contender also copies its output to host arrays, as the driver does
    buffers = {name: np.empty(tuple(t.shape), dtype=t.cpu().numpy().dtype)
               for name, t in trace_batch(backbone, images, classifier).items()}
    contenders = {
        "encode_image": lambda: backbone.visual(images),
        "trace": lambda: store_batch(buffers, 0, trace_batch(backbone, images, classifier)),
    }
    fake = any(isinstance(module, FakeQuantLinear) for module in backbone.visual.modules())
    if fake:  # the same trace with the activation rounding unfused: what the fusion gains

        def unfused_trace() -> None:
            with eager_fake_quantization():
                contenders["trace"]()

        contenders["trace, fake quantization unfused"] = unfused_trace
    result = compare(contenders, len(images), rounds)
    overhead, overhead_ci = percent_more(paired_ratio(result, "trace", "encode_image"))
    # no speed-up to report where compiling failed: both contenders ran unfused
    fusion, fusion_ci = (paired_ratio(result, "trace, fake quantization unfused", "trace")
                         if fake and fusion_active() else (None, None))
    return {"quant": backbone.quantizer, "batch_size": len(images), "rounds": rounds, "timings": result,
            "trace_overhead_percent": overhead, "trace_overhead_ci": overhead_ci,
            "fusion_speedup": fusion, "fusion_speedup_ci": fusion_ci}


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
    for name, timing in result.items():  # the first quantizer's time over this one's, round by round
        timing[f"speedup_vs_{quants[0]}"], timing["speedup_ci"] = paired_ratio(result, quants[0], name)
    return {"batch_size": len(images), "rounds": rounds, "timings": result}


def method_latency(session: Session, images: int = 32, max_seconds: float = 300.0) -> dict:
    """Every registered method, fitted for the config's seed, timed against full depth
    (:func:`harness.latency.measure_latency`) on the first ``images`` test images."""
    from harness.latency import measure_latency
    from harness.policy import METHODS

    policies = {name: session.fit(name, session.config.seed) for name in METHODS.names()}
    return measure_latency(session, policies, session.test_images(images)[0], max_seconds=max_seconds)


def input_pipeline(session: Session, rounds: int = 3) -> dict:
    """Whether tracing is input-bound: passes over the test split, each contender once per round.

    - ``decode, N workers``: decoding and preprocessing alone, in this process and with ``--workers``;
    - ``encode_image, pre-decoded`` and ``trace, pre-decoded``: the tower and the trace driver on the
      same images decoded beforehand (no input cost);
    - ``trace + decode, N workers``: the trace driver fed by the DataLoader, as a trace runs (on the CPU
      its workers run at idle priority, see :class:`~harness.datasets.ImageBatches`), and on the CPU
      the same with the workers at normal priority;
    - ``trace + decode, N workers started once``: the same fed by workers kept from pass to pass
      (``keep_workers``): what a long pass sees once its workers have started, because a trace starts
      its workers once a pass and, forked from a process that holds a model, they cost it a fixed time
      (the fork, then re-copying the pages the parent writes) that a 256-image pass does not hide;
    - under a quantizer other than fp32, ``fp32 + QUANT traces, decoded once``: both traces a run makes
      of a split, fed by one pass over the images as :func:`harness.trace.trace_splits` does, against
      ``..., decoded twice``: one pass each.

    ``input_gap_percent`` is how far the fed trace's throughput (images/s) falls below ``encode_image``'s on
    pre-decoded images (the goal: at most 10), ``input_gap_normal_priority_percent`` the same with the workers at
    normal priority (on the CPU only), ``input_gap_started_percent`` with the workers started once,
    ``worker_start_percent`` the share of a fed pass's time that starting and joining its workers costs (the
    same two passes compared), ``decode_once_saving_percent`` the time that decoding once saves the two traces; each
    with its 95% CI over rounds (``..._ci``, :func:`paired_ratio`).

    Whether the trace is input-bound, the gap aside:

    - ``input_wait_percent`` (new workers), ``input_wait_normal_priority_percent`` and
      ``input_wait_started_percent`` (workers started once): the share of a fed pass that its loop spends
      blocked on a batch after the first, i.e. starved of input (near 0: the trace does not wait for images).
      The first batch's wait (starting new workers, filling the pipeline) and the pass's end (joining new
      workers) are not in it; the first is kept per round (``first_batch_wait_seconds_per_round``). With 0
      workers it is the loop's own decoding. Timed on the host without a GPU sync, so on a GPU it bounds from
      above the GPU's idle time that waiting for input causes (kernels of the last batch may still run while
      the loop waits);
    - ``input_gap_floor_percent`` (CPU, with workers): the gap if decoding's CPU time were taken from the
      tower's threads and nothing else were lost: ``encode_image``'s time against the pre-decoded trace's time
      plus the CPU seconds the workers of a decode pass spent (their reaped rusage, at one torch thread each;
      this process's own CPU time while it decodes would count its idle intra-op threads spinning, twice the
      pass's wall time on a 2-core machine) divided by the torch threads. It includes the trace driver's own overhead
      over ``encode_image`` and the workers' start-up (the decode pass starts new ones). It estimates a floor
      where the tower keeps every thread's core busy, which ``tower_busy_threads`` (``encode_image``'s CPU
      seconds a second, spin-waiting threads included, since they hold the core too) tells; there hardly any
      pipeline on those cores does better without cheaper decoding or hand-over, and a fed gap near it is
      decoding's own work, not waiting.
    """
    from harness.datasets import ImageBatches
    from harness.trace import trace_batch

    backbone, _ = session.quantized(None)
    classifier, workers = session.classifier, session.config.workers
    split, batch_size = session.splits["test"], session.config.batch_size
    on_cpu = backbone.device.type == "cpu"

    def batches(count: int, idle: bool = on_cpu, keep: bool = False) -> ImageBatches:
        return ImageBatches(session.dataset, split, backbone.preprocess, batch_size, workers=count, idle_workers=idle,
                            keep_workers=keep)

    # per fed contender and pass, the seconds its loop was blocked on the first batch (starting the workers and
    # filling the pipeline) and on the later ones (starved of input); host clock, no GPU sync
    waits: dict[str, list[tuple[float, float]]] = {}
    cpu: dict[str, list[float]] = {}  # per contender so wrapped, each pass's CPU seconds (see measured_cpu)

    def fed(name: str, idle: bool, reader: ImageBatches | None = None) -> Callable[[], None]:
        """A traced pass fed by ``reader``, or by a new reader (new workers) each pass, its waits kept in
        ``waits[name]``."""
        waits[name] = []

        def traced_pass() -> None:
            source = iter(batches(workers, idle) if reader is None else reader)
            first, later = None, 0.0
            try:
                while True:
                    start = time.perf_counter()
                    batch = next(source, None)
                    if batch is None:  # the end of the pass (joining new workers), not a wait for images
                        break
                    if first is None:
                        first = time.perf_counter() - start
                    else:
                        later += time.perf_counter() - start
                    trace_batch(backbone, batch[0].to(backbone.device), classifier)
            finally:  # a kept reader is free for the next pass even if this one failed
                source.close()
            waits[name].append((first or 0.0, later))

        return traced_pass

    def measured_cpu(name: str, fn: Callable[[], object], workers_only: bool = False) -> Callable[[], None]:
        """``fn``, its CPU seconds kept in ``cpu[name]``: this process's (every thread, spin-waiting included), or
        with ``workers_only`` those of the worker processes it started and joined (decoding at one thread each)."""
        import resource

        who = resource.RUSAGE_CHILDREN if workers_only else resource.RUSAGE_SELF
        cpu[name] = []

        def measured() -> None:
            before = resource.getrusage(who)
            fn()
            after = resource.getrusage(who)
            cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)

        return measured

    decoded = [images.to(backbone.device) for images, _, _ in batches(workers)]
    contenders = {
        "decode, 0 workers": lambda: [None for _ in batches(0)],
        f"decode, {workers} workers": measured_cpu(f"decode, {workers} workers",
                                                   lambda: [None for _ in batches(workers)], workers_only=True),
        "encode_image, pre-decoded": measured_cpu("encode_image, pre-decoded",
                                                  lambda: [backbone.visual(images) for images in decoded]),
        "trace, pre-decoded": lambda: [trace_batch(backbone, images, classifier) for images in decoded],
    }
    new, normal = f"trace + decode, {workers} workers", f"trace + decode, {workers} workers at normal priority"
    started = f"trace + decode, {workers} workers started once"
    contenders[new] = fed(new, on_cpu)
    if on_cpu and workers:
        contenders[normal] = fed(normal, False)
    if workers:  # one reader for every round: its workers start in the warm-up
        contenders[started] = fed(started, on_cpu, batches(workers, keep=True))
    both = f"fp32 + {session.config.quant} traces"
    if session.config.quant != "fp32":
        pair = (session.quantized("fp32")[0], backbone)
        contenders[f"{both}, decoded once"] = lambda: [
            trace_batch(b, images.to(b.device), classifier) for images, _, _ in batches(workers) for b in pair]
        contenders[f"{both}, decoded twice"] = lambda: [
            trace_batch(b, images.to(b.device), classifier) for b in pair for images, _, _ in batches(workers)]
    images = sum(len(batch) for batch in decoded)
    timed = compare(contenders, images, rounds, min_run_time=0.0)
    result = {name: {"seconds_per_pass": t["seconds_per_batch"], "images_per_s": t["images_per_s"],
                     "seconds_per_round": t["seconds_per_round"]} for name, t in timed.items()}
    for name, passes in waits.items():  # the warm-up's pass left out, so that they line up with the rounds
        result[name]["first_batch_wait_seconds_per_round"] = [first for first, _ in passes[1:]]
        result[name]["wait_seconds_per_round"] = [later for _, later in passes[1:]]
    for name, passes in cpu.items():
        result[name]["cpu_seconds_per_round"] = passes[1:]

    def saving(name: str, reference: str) -> tuple[float | None, list[float] | None]:
        """How much less time (%) ``name`` takes than ``reference``, round by round, with its CI."""
        return percent_less(paired_ratio(timed, name, reference)) if name in timed and reference in timed else (None, None)

    def waiting(name: str) -> tuple[float | None, list[float] | None]:
        """The share (%) of ``name``'s passes its loop was blocked on a batch after the first, round by round."""
        return (percent(round_ratio(result[name]["wait_seconds_per_round"], result[name]["seconds_per_round"]))
                if name in waits else (None, None))

    bare, threads = "encode_image, pre-decoded", torch.get_num_threads()
    floor, floor_ci, busy, busy_ci = None, None, None, None
    if on_cpu:
        busy, busy_ci = round_ratio(result[bare]["cpu_seconds_per_round"], result[bare]["seconds_per_round"])
    if on_cpu and workers:  # the trace's time plus the decoding workers' CPU time taken from the tower's threads
        decode_cpu = result[f"decode, {workers} workers"]["cpu_seconds_per_round"]
        shared = [trace + decode / threads for trace, decode in zip(result["trace, pre-decoded"]["seconds_per_round"],
                                                                    decode_cpu)]
        floor, floor_ci = percent_less(round_ratio(result[bare]["seconds_per_round"], shared))
    gap, gap_ci = saving(bare, new)
    gap_normal, gap_normal_ci = saving(bare, normal)
    gap_started, gap_started_ci = saving(bare, started)
    start, start_ci = saving(started, new)
    once, once_ci = saving(f"{both}, decoded once", f"{both}, decoded twice")
    wait, wait_ci = waiting(new)
    wait_normal, wait_normal_ci = waiting(normal)
    wait_started, wait_started_ci = waiting(started)
    return {"images": images, "batch_size": batch_size, "workers": workers, "threads": threads,
            "rounds": rounds, "timings": result,
            "input_gap_percent": gap, "input_gap_ci": gap_ci,
            "input_gap_floor_percent": floor, "input_gap_floor_ci": floor_ci,
            "tower_busy_threads": busy, "tower_busy_threads_ci": busy_ci,
            "input_wait_percent": wait, "input_wait_ci": wait_ci,
            "input_wait_normal_priority_percent": wait_normal, "input_wait_normal_priority_ci": wait_normal_ci,
            "input_wait_started_percent": wait_started, "input_wait_started_ci": wait_started_ci,
            "input_gap_normal_priority_percent": gap_normal, "input_gap_normal_priority_ci": gap_normal_ci,
            "input_gap_started_percent": gap_started, "input_gap_started_ci": gap_started_ci,
            "worker_start_percent": start, "worker_start_ci": start_ci,
            "decode_once_saving_percent": once, "decode_once_saving_ci": once_ci}


SUITES = ("trace", "quant", "latency", "data")
# the quant suite's own setting under ``all`` (SPEC section 8): a random-init ViT-B-32 at batch 32
QUANT_SETTING = {"model": "ViT-B-32", "pretrained": "none", "batch_size": 32}
# the data suite's under ``all``: the same tower under int8-dynamic, fed 256 images of a synthetic ImageNet val folder
# (:mod:`harness.datasets.synthetic`, 1 JPEG per class, 500 x 375) that ``bench`` writes to a temporary folder
DATA_SETTING = {**QUANT_SETTING, "quant": "int8-dynamic", "data": "imagenet", "limit": 256, "templates": "simple"}
SETTINGS = {"quant": QUANT_SETTING, "data": DATA_SETTING}
DEFAULT_QUANTS = ("fp32", "int8-dynamic", "int8-torchao", "int8-pt2e")


# rounds per suite unless ``--rounds`` says otherwise: enough for a CI of each paired ratio (the trace
# suite's contenders take about a second each a round on this CPU, the data suite's passes up to 25 s)
DEFAULT_ROUNDS = {"trace": 20, "quant": 10, "data": 5}


def run_suite(suite: str, session: Session, rounds: int | None = None,
              quants: tuple[str, ...] = DEFAULT_QUANTS) -> dict:
    """One suite's result (see the module docstring); ``rounds`` None: :data:`DEFAULT_ROUNDS`."""
    rounds = rounds or DEFAULT_ROUNDS.get(suite, 0)
    if suite == "trace":
        return {quant: trace_overhead(session, quant, rounds) for quant in dict.fromkeys(["fp32", session.config.quant])}
    if suite == "quant":
        return quantizer_throughput(session, list(quants), rounds)
    if suite == "latency":
        return method_latency(session)
    if suite == "data":
        return input_pipeline(session, rounds)
    raise ValueError(f"unknown bench suite {suite!r}; suites: {', '.join(SUITES)}, all")


def _waits(result: dict, ci: Callable[[list[float] | None], str]) -> str:
    """The data suite's waits for input, as a clause of its summary (none in results made before they were kept)."""
    if result.get("input_wait_percent") is None:
        return ""
    if not result["workers"]:
        return (f"; after its first batch, decoding in the loop took {result['input_wait_percent']:.1f}%"
                f"{ci(result['input_wait_ci'])} of a pass")
    others = [f"{result[key]:.1f}%{ci(result[key.replace('_percent', '_ci')])} {label}"
              for key, label in (("input_wait_normal_priority_percent", "with its workers at normal priority"),
                                 ("input_wait_started_percent", "with its workers started once"))
              if result.get(key) is not None]
    return (f"; after its first batch the fed trace waited for input for {result['input_wait_percent']:.1f}%"
            f"{ci(result['input_wait_ci'])} of a pass" + (f" ({', '.join(others)})" if others else ""))


def format_result(suite: str, result: dict) -> str:
    """A suite's result as plain-text tables."""
    from tabulate import tabulate

    def ci(bounds: list[float] | None, unit: str = "") -> str:
        return f" [{bounds[0]:.{2 if unit == 'x' else 1}f}, {bounds[1]:.{2 if unit == 'x' else 1}f}]" if bounds else ""

    def timings(timing: dict) -> str:
        rows = [(name, t["seconds_per_batch"] * 1e3, t["images_per_s"]) for name, t in timing.items()]
        return tabulate(rows, headers=["contender", "ms / batch (median)", "images / s"], floatfmt=".1f")

    if suite == "trace":
        return "\n\n".join(f"{r['quant']}, batch {r['batch_size']}, {r['rounds']} rounds: trace overhead "
                           f"{r['trace_overhead_percent']:+.1f}%{ci(r['trace_overhead_ci'])}"
                           + ("" if r.get("fusion_speedup") is None else
                              f"; fused fake quantization: trace {r['fusion_speedup']:.2f}x"
                              f"{ci(r['fusion_speedup_ci'], 'x')} unfused")
                           + f" ({estimator(r['rounds'])})\n" + timings(r["timings"])
                           for r in result.values())
    if suite == "quant":
        first = next(iter(result["timings"]))
        rows = [(name, f"{t['seconds_per_batch'] * 1e3:.1f}", f"{t['images_per_s']:.1f}",
                 f"{t[f'speedup_vs_{first}']:.2f}{ci(t['speedup_ci'], 'x')}") for name, t in result["timings"].items()]
        return (f"batch {result['batch_size']}, {result['rounds']} rounds ({estimator(result['rounds'])})\n"
                + tabulate(rows, headers=["contender", "ms / batch (median)", "images / s",
                                          f"speed-up vs {first} [95% CI]"],
                           disable_numparse=True, colalign=("left", "right", "right", "right")))
    if suite == "data":
        rows = [(name, t["seconds_per_pass"], t["images_per_s"]) for name, t in result["timings"].items()]
        return (f"{result['images']} images, batch {result['batch_size']}, {result['workers']} workers, "
                f"{result['rounds']} rounds: the fed trace's throughput is {result['input_gap_percent']:.1f}%"
                f"{ci(result['input_gap_ci'])} below encode_image's on pre-decoded images"
                + ("" if result.get("input_gap_normal_priority_percent") is None else
                   f" ({result['input_gap_normal_priority_percent']:.1f}%{ci(result['input_gap_normal_priority_ci'])}"
                   " with its workers at normal priority)")
                + ("" if result.get("input_gap_started_percent") is None else
                   f", {result['input_gap_started_percent']:.1f}%{ci(result['input_gap_started_ci'])} with its workers"
                   f" started once (starting and joining them took {result['worker_start_percent']:.1f}%"
                   f"{ci(result['worker_start_ci'])} of a pass with new workers)")
                + ("" if result.get("input_gap_floor_percent") is None else
                   f"; with the tower keeping {result['tower_busy_threads']:.2f}"
                   f"{ci(result['tower_busy_threads_ci'], 'x')} of its {result['threads']} threads busy, the workers'"
                   f" CPU time taken from them would alone put the fed trace's gap at about"
                   f" {result['input_gap_floor_percent']:.1f}%{ci(result['input_gap_floor_ci'])}")
                + _waits(result, ci)
                + ("" if result.get("decode_once_saving_percent") is None else
                   f"; decoding once for the fp32 and quantized traces saves {result['decode_once_saving_percent']:.1f}%"
                   f"{ci(result['decode_once_saving_ci'])} of their time")
                + f" ({estimator(result['rounds'])})\n"
                + tabulate(rows, headers=["contender", "s / pass (median)", "images / s"], floatfmt=".1f"))

    def saving(row: dict, mode: str) -> str:
        ci = row[f"{mode}_saving_ci"]
        return f"{row[f'{mode}_saving']:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = [(name, f"{row['batch1_ms_per_image']:.2f}", f"{row['throughput_ms_per_image']:.3f}",
             saving(row, "batch1") if "flops_saving" in row else "-",
             saving(row, "throughput") if "flops_saving" in row else "-",
             f"{row['flops_saving']:.1f}" if "flops_saving" in row else "-",
             ratio(row.get("batch1_realized")), ratio(row.get("throughput_realized")))
            for name, row in result["methods"].items()]
    return (f"{result['images']} test images, {result['rounds']} rounds, {result['threads']} threads; every CI within "
            f"+-{result['target_ci_halfwidth']:g}: {'yes' if result['target_reached'] else 'no'}\n"
            + tabulate(rows, headers=["", "ms / image (b=1)", f"ms / image (b={result['throughput_batch']})",
                                      "latency saving % b=1 [95% CI]", "latency saving % batch [95% CI]",
                                      "FLOPs saving %", "realized b=1", "realized batch"], disable_numparse=True))
