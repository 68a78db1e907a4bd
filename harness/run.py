"""``python -m harness run``: every chosen method on one backbone, quantizer and dataset.

For each seed the methods are fitted on the ``heads``/``gate`` traces
(fitted states are cached) and replayed on the ``test`` trace: replaying N
methods costs no backbone pass beyond the traces. Latency comes from the
real early-exit driver, measured against full depth in the same process.
Token pruners cannot be replayed (their later features depend on the
dropped tokens): they run on the test images under the real driver, and
when the run also has ``lra-ee`` their keep ratio is swept to compare them
with it at matched FLOPs (:func:`matched_flops`).
Results go to ``results/<run-id>/``: ``config.json``, ``metrics.json``
(schema :data:`SCHEMA_VERSION`), ``predictions.parquet`` and ``tables.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness import evaluate
from harness._io import atomic_path, atomic_write_text
from harness.config import HarnessConfig
from harness.context import Context
from harness.errors import ConfigError
from harness.drivers import ExitOutcome, TraceView, replay, run_early_exit
from harness.policy import METHODS, Decision, ExitPolicy, FitContext, LayerView, create_method
from harness.provenance import environment
from harness.results import SCHEMA_VERSION


class FullDepth(ExitPolicy):
    """No exits: the full-depth model run through the same driver (the latency reference)."""

    name = "full-depth"

    def fit(self, ctx: FitContext) -> None:
        pass

    def exit_layers(self) -> list[int]:
        return []

    def decide(self, layer: int, view: LayerView) -> Decision:  # never called: no exit layers
        raise AssertionError("FullDepth has no exit layers")


def resolve_methods(spec: str) -> list[str]:
    """``all`` or a comma-separated list -> registered method names (unknown names raise)."""
    names = METHODS.names() if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    for name in names:
        METHODS.get(name)
    return names


def _policy_key(policy: ExitPolicy, fit_ctx: FitContext) -> str:
    """Cache key of a fitted policy: its config, its code, the data it fits on, the seed."""
    code = hashlib.sha256()
    for file in sorted(Path(inspect.getfile(type(policy))).parent.glob("*.py")):
        code.update(file.read_bytes())
    # the fp32 twin of the heads split is fixed by the heads trace's key, so it needs no entry here
    data = [(t.meta["key"], hashlib.sha256(np.asarray(t.indices).tobytes()).hexdigest())
            for t in (fit_ctx.heads, fit_ctx.gate)]
    blob = json.dumps([policy.describe(), code.hexdigest(), data, fit_ctx.seed], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def parse_overrides(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``["pabee.patience=4", ...]`` -> ``{"pabee": {"patience": 4}}``; values are JSON, else strings.

    Unknown methods or config keys raise :class:`ConfigError` naming the known ones.
    """
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, raw = item.partition("=")
        method, dot, key = target.partition(".")
        if not (sep and dot and key):
            raise ConfigError(f"--set {item!r}: expected METHOD.KEY=VALUE, e.g. pabee.patience=4")
        if method not in methods:
            raise ConfigError(f"--set {item!r}: {method!r} is not among the methods of this run ({', '.join(methods)})")
        known = create_method(method).describe()["config"]
        if key not in known:
            raise ConfigError(f"--set {item!r}: {method} has no option {key!r} (options: {', '.join(known)})")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides.setdefault(method, {})[key] = tuple(value) if isinstance(value, list) else value
    return overrides


def fit_policy(ctx: Context, name: str, seed: int, **config: Any) -> ExitPolicy:
    """A fitted ``name`` (with ``config`` overrides) for ``seed``, from the cache when an identical fit exists."""
    policy = create_method(name, **config)
    fit_ctx = ctx.fit_context(seed=seed)
    path = ctx.cache_dir / "policies" / f"{_policy_key(policy, fit_ctx)}.pt"
    if path.is_file():
        try:
            policy.load_state_dict(torch.load(path, weights_only=True))
            return policy
        except Exception:  # a damaged entry is refitted below
            path.unlink(missing_ok=True)
    policy.fit(fit_ctx)
    with atomic_path(path) as tmp:
        torch.save(policy.state_dict(), tmp)
    return policy


def layer_accuracy(policy: ExitPolicy, trace, num_classes: int) -> dict[int, float]:
    """Top-1 (%) of the policy's own prediction at each of its exit layers, for every test sample.

    Empty for a token policy: its features after a pruning block are not in the trace.
    """
    if policy.prunes_tokens:
        return {}
    labels = np.asarray(trace.labels)
    accuracy = {}
    with torch.no_grad():
        for layer in policy.exit_layers():
            policy.start_batch(len(labels))
            logits = policy.decide(layer, TraceView(trace, layer, np.arange(len(labels)), 0)).logits
            accuracy[layer] = float(100 * np.mean(logits.argmax(-1).numpy() == labels))
    return accuracy


def score(outcome: ExitOutcome, labels: np.ndarray, baseline_correct: np.ndarray, flops: np.ndarray,
          full_flops: float, block_share: np.ndarray, num_blocks: int, seed: int) -> dict[str, Any]:
    """The metrics of one outcome on the test split."""
    correct = outcome.predictions == labels
    q = evaluate.quadrants(correct, baseline_correct)
    low, high = evaluate.bootstrap_ci(correct, seed=seed)
    flops_low, flops_high = evaluate.bootstrap_ci(1 - flops / full_flops, seed=seed)
    return {
        "top1": float(100 * correct.mean()), "top1_ci": [100 * low, 100 * high],
        "top5": float(100 * evaluate.topk_correct(outcome.logits, labels, 5).mean()),
        "flops_per_sample": float(flops.mean()),
        "flops_saving": float(100 * (1 - flops.mean() / full_flops)),
        "flops_saving_ci": [100 * flops_low, 100 * flops_high],
        "flops_saving_paper_formula": 100 * evaluate.paper_flops_saving(outcome.exit_layer, block_share),
        "exit_distribution": evaluate.exit_distribution(outcome.exit_layer, num_blocks),
        "quadrants": {**dataclasses.asdict(q), "net_rescue": q.net_rescue},
    }


def _test_images(ctx: Context, count: int) -> torch.Tensor:
    """The first ``count`` images of the test split, preprocessed, in split order."""
    backbone, _ = ctx.quantized()
    split = ctx.splits["test"]
    indices = split.indices[: min(count, len(split))]
    return torch.stack([backbone.preprocess(ctx.dataset.read_image(split.part, int(i))) for i in indices])


def driver_agreement(ctx: Context, policies: dict[str, ExitPolicy], replayed: dict[str, ExitOutcome],
                     images: int) -> dict[str, Any]:
    """How often the real driver and trace replay disagree, on the first ``images`` test images.

    Replay classifies with features traced in full batches; the real driver
    drops exited samples from the batch. For a batch-invariant quantizer the
    two agree exactly (tested); for a batch-dependent one (per-tensor
    activation scales) a sample's features depend on who else is still in the
    batch, and this is the share of images whose exit layer or prediction
    changes. ``full-depth`` isolates the effect of batch composition alone.
    """
    backbone, quantizer = ctx.quantized()
    x = _test_images(ctx, images)
    size = ctx.config.batch_size
    result: dict[str, Any] = {"images": len(x), "batch_size": size, "batch_invariant": quantizer.batch_invariant,
                              "methods": {}}
    for name, policy in {"full-depth": FullDepth(), **policies}.items():
        parts = [run_early_exit(policy, backbone, x[i:i + size], ctx.classifier) for i in range(0, len(x), size)]
        exit_layer = np.concatenate([p.exit_layer for p in parts])
        predictions = np.concatenate([p.predictions for p in parts])
        reference = replayed[name]
        result["methods"][name] = {
            "prediction": float(100 * np.mean(predictions != reference.predictions[: len(x)])),
            "exit_layer": float(100 * np.mean(exit_layer != reference.exit_layer[: len(x)])),
        }
    return result


def measure_latency(ctx: Context, policies: dict[str, ExitPolicy], images: int, repeats: int) -> dict[str, Any]:
    """Per-image median wall time of the real driver at batch 1 and at the run's batch size.

    Methods and the full-depth reference alternate within each repeat, so
    machine noise hits them alike; warm-up runs are excluded.
    """
    backbone, _ = ctx.quantized()
    x = _test_images(ctx, images)
    count = len(x)
    batch = x[: min(ctx.config.batch_size, count)]
    contenders = {"full-depth": FullDepth(), **policies}
    single: dict[str, list[float]] = {name: [] for name in contenders}
    batched: dict[str, list[float]] = {name: [] for name in contenders}
    for policy in contenders.values():  # warm-up
        run_early_exit(policy, backbone, batch, ctx.classifier)
    for _ in range(repeats):
        for name, policy in contenders.items():
            for i in range(count):
                start = time.perf_counter()
                run_early_exit(policy, backbone, x[i:i + 1], ctx.classifier)
                single[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            run_early_exit(policy, backbone, batch, ctx.classifier)
            batched[name].append((time.perf_counter() - start) / len(batch))
    full_1, full_b = statistics.median(single["full-depth"]), statistics.median(batched["full-depth"])
    return {
        "threads": torch.get_num_threads(), "images": count, "repeats": repeats, "throughput_batch": len(batch),
        "methods": {
            name: {
                "batch1_ms": 1e3 * statistics.median(single[name]),
                "throughput_ms_per_image": 1e3 * statistics.median(batched[name]),
                "batch1_saving": 100 * (1 - statistics.median(single[name]) / full_1),
                "throughput_saving": 100 * (1 - statistics.median(batched[name]) / full_b),
            }
            for name in contenders
        },
    }


def _fit_digest(policy: ExitPolicy) -> str:
    """Identity of a fitted policy: its description and every value of its state."""
    digest = hashlib.sha256(json.dumps(policy.describe(), sort_keys=True, default=str).encode())

    def update(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(str(key).encode())
                update(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                update(item)
        else:
            digest.update(repr(value).encode())

    state = policy.state_dict()
    update({k: v for k, v in state.items() if k != "report"})  # diagnostics (timings) are not the fit
    return digest.hexdigest()


def real_outcome(ctx: Context, policy: ExitPolicy, trace, desc: str | None = None) -> ExitOutcome:
    """``policy`` on the whole test split under the real driver, in batches of the run's batch size.

    The batches are the trace's (split order, bad images skipped alike), so
    the rows line up with ``trace`` and, for a batch-dependent quantizer, a
    policy that drops nothing reproduces the traced full-depth logits exactly.
    ``desc`` labels a progress bar (None: none).
    """
    from tqdm import tqdm

    from harness.datasets import ImageBatches

    backbone, _ = ctx.quantized()
    batches = ImageBatches(ctx.dataset, ctx.splits["test"], backbone.preprocess, ctx.config.batch_size,
                           on_bad_image=ctx.config.on_bad_image)
    parts, indices = [], []
    for images, _, batch_indices in tqdm(batches, desc=desc, unit="batch", leave=False,
                                         disable=desc is None or not ctx.progress):
        parts.append(run_early_exit(policy, backbone, images, ctx.classifier))
        indices.append(batch_indices)
    if not np.array_equal(np.concatenate(indices) if indices else np.zeros(0, np.int64), np.asarray(trace.indices)):
        raise RuntimeError("the real driver's test images do not match the test trace's rows")
    return ExitOutcome(*(np.concatenate([getattr(p, f.name) for p in parts])
                         for f in dataclasses.fields(ExitOutcome)))


def outcome_flops(policy: ExitPolicy, outcome: ExitOutcome, block_flops: evaluate.BlockFlops,
                  num_blocks: int) -> np.ndarray:
    """FLOPs per sample of ``outcome``: blocks at their token counts, plus the policy's heads/decisions.

    An exit policy pays its heads at its exit layers; a token policy also pays
    :meth:`ExitPolicy.head_flops` at every block where it reports a cost.
    """
    layers = set(policy.exit_layers()) | (set(range(1, num_blocks + 1)) if policy.prunes_tokens else set())
    head_flops = {layer: policy.head_flops(layer) for layer in sorted(layers)}
    return evaluate.flops_per_sample(outcome.tokens, block_flops, outcome.exit_layer, head_flops,
                                     sorted(layers), outcome.by_policy)


MATCHED_FLOPS_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # keep ratios of the matched-FLOPs sweep
MATCHED_FLOPS_REFERENCE = "lra-ee"


def pareto_interpolate(points: list[dict[str, float]], saving: float) -> tuple[float | None, dict[str, float]]:
    """Top-1 at ``saving`` on the Pareto front of ``points`` (each with ``flops_saving`` and ``top1``), and
    the measured point nearest in saving.

    The front keeps the points no other point beats in both saving and
    top-1; top-1 is interpolated linearly between its neighbours in saving.
    Outside the front's range the interpolation is None (no extrapolation).

    Example:
        >>> pts = [{"flops_saving": 0.0, "top1": 80.0}, {"flops_saving": 20.0, "top1": 70.0},
        ...        {"flops_saving": 10.0, "top1": 60.0}]
        >>> pareto_interpolate(pts, 5.0)
        (77.5, {'flops_saving': 0.0, 'top1': 80.0})
    """
    pairs = sorted({(p["flops_saving"], p["top1"]) for p in points})
    front = [(x, y) for x, y in pairs if not any(a >= x and b >= y and (a, b) != (x, y) for a, b in pairs)]
    nearest = min(points, key=lambda p: abs(p["flops_saving"] - saving))
    if not front or not front[0][0] <= saving <= front[-1][0]:
        return None, nearest
    return float(np.interp(saving, [x for x, _ in front], [y for _, y in front])), nearest


def matched_flops(ctx: Context, pruners: dict[str, ExitPolicy], first_seed: dict[str, dict[str, Any]],
                  reference: dict[str, Any], full_point: dict[str, float], trace, score_outcome,
                  grid: tuple[float, ...] = MATCHED_FLOPS_GRID) -> dict[str, Any]:
    """Token pruners at the FLOPs saving of :data:`MATCHED_FLOPS_REFERENCE` (the paper's Table 2 comparison).

    Each pruner's keep ratio is swept over ``grid`` (its first-seed fit;
    :meth:`ExitPolicy.with_keep_ratio`, no refit: a learned pruner keeps its
    trained scores and only its per-block budget changes), every point on
    the test split under the real driver, except two already measured: the
    ratio the pruner ran with in this run (its row) and 1.0, where nothing is
    dropped and the real driver is the full-depth quantized model (its
    baseline row). Top-1 is then read off each pruner's (FLOPs saving, top-1)
    Pareto curve at the reference's mean FLOPs saving (:func:`pareto_interpolate`).

    Args:
        pruners: method -> its first-seed fitted policy.
        first_seed: method -> the metrics of its first seed (the run's rows).
        reference: the reference method's row summary (mean top-1 and FLOPs saving).
        full_point: ``flops_saving`` and ``top1`` of the full-depth quantized model.
        score_outcome: ``f(policy, outcome) -> metrics`` as the run scores its rows.
    """
    started = time.time()
    target, target_top1 = reference["flops_saving"]["mean"], reference["top1"]["mean"]
    out: dict[str, Any] = {"reference": MATCHED_FLOPS_REFERENCE, "target_saving": target,
                           "reference_top1": target_top1, "grid": list(grid), "methods": {}}
    for name, policy in pruners.items():
        points = []
        for ratio in grid:
            variant = policy.with_keep_ratio(ratio)
            if variant is policy:
                metrics, source = first_seed[name], "run row"
            elif ratio == 1.0:
                metrics, source = full_point, "full depth (nothing dropped)"
            else:
                outcome = real_outcome(ctx, variant, trace, desc=f"{name} keep {ratio:g}")
                metrics, source = score_outcome(variant, outcome), "real driver"
            points.append({"keep_ratio": ratio, "flops_saving": float(metrics["flops_saving"]),
                           "top1": float(metrics["top1"]), "source": source})
        top1, nearest = pareto_interpolate(points, target)
        out["methods"][name] = {
            "target_saving": target, "top1_at_target": top1,
            "delta_vs_reference": None if top1 is None else top1 - target_top1,
            "nearest": nearest, "points": points,
            "sweep": inspect.getdoc(type(policy).with_keep_ratio).splitlines()[0],  # what the knob changes
        }
    out["wall_time_s"] = round(time.time() - started, 1)
    return out


def _aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of the scalar metrics."""
    out = {}
    for key in ("top1", "top5", "flops_saving", "flops_saving_paper_formula"):
        values = [m[key] for m in per_seed]
        out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    return out


def run(config: HarnessConfig, methods: list[str], seeds: int, latency: bool = True,
        latency_images: int = 32, latency_repeats: int = 3, agreement_images: int = 1024,
        overrides: dict[str, dict[str, Any]] | None = None,
        matched: bool | None = None) -> tuple[dict[str, Any], "pd.DataFrame"]:  # noqa: F821
    """Fit and evaluate ``methods`` over ``seeds``; return (metrics, per-sample predictions).

    ``overrides`` maps a method to config values that replace its defaults
    (:func:`parse_overrides`).

    Token pruners are evaluated under the real driver. ``matched``: sweep
    their keep ratio for the matched-FLOPs comparison with ``lra-ee``
    (``metrics["matched_flops"]``, :func:`matched_flops`). None (default)
    does so when the run has ``lra-ee`` and a token pruner but not every
    registered method: for ``--methods all`` the sweep (about 5 minutes on
    the embedded default, 2 CPU cores) is opt-in.

    ``agreement_images`` test images (0: none) also go through the real
    driver to measure its disagreement with replay (:func:`driver_agreement`).
    """
    import pandas as pd

    started = time.time()
    base = Context(config)
    c = base.config
    num_blocks = base.backbone.num_blocks
    test = base.trace(None, "test")
    labels = np.asarray(test.labels)
    from harness.flops import tower_flops

    tower = tower_flops(base.backbone)
    full_flops = float(tower["total"])
    block_share = np.asarray(tower["blocks"], dtype=np.float64) / sum(tower["blocks"])
    block_flops = evaluate.BlockFlops(base.backbone, tower["embed"], tower["head"])
    baselines = {"full-depth fp32": base.trace("fp32", "test"), f"full-depth {c.quant}": test}
    baseline_correct = np.asarray(test.logits).argmax(1) == labels
    full = ExitOutcome(np.full(len(labels), num_blocks), np.asarray(test.logits),
                       np.full((len(labels), num_blocks), base.num_tokens - 1), np.zeros(len(labels), bool))

    rows, frames = {}, []
    for name, trace in baselines.items():
        outcome = dataclasses.replace(full, logits=np.asarray(trace.logits))
        flops = evaluate.flops_per_sample(outcome.tokens, block_flops, outcome.exit_layer, {}, [],
                                          outcome.by_policy)
        rows[name] = {"per_seed": [score(outcome, labels, baseline_correct, flops, full_flops, block_share,
                                         num_blocks, c.seed)], "kind": "baseline"}
        frames.append(_frame(name, c.seed, test, outcome, flops))

    fitted: dict[str, ExitPolicy] = {}
    replayed: dict[str, ExitOutcome] = {"full-depth": full}
    real_outcomes: dict[str, ExitOutcome] = {}
    from tqdm import tqdm

    bar = tqdm(total=len(methods) * seeds, desc="fit and replay", unit="fit", disable=not base.progress)
    for name in methods:
        per_seed = []
        for s in range(seeds):
            seed = c.seed + s
            ctx = base.with_seed(seed)
            bar.set_postfix_str(f"{name} seed {seed}")
            policy = fit_policy(ctx, name, seed, **(overrides or {}).get(name, {}))
            fitted.setdefault(name, policy)
            if policy.prunes_tokens:  # real driver: later features depend on the dropped tokens
                key = _fit_digest(policy)
                if key not in real_outcomes:  # a training-free pruner gives the same outcome for every seed
                    real_outcomes[key] = real_outcome(base, policy, test, desc=f"{name} seed {seed} (real driver)")
                outcome = real_outcomes[key]
            else:
                outcome = replay(policy, test, num_blocks, base.num_tokens - 1)
            replayed.setdefault(name, outcome)
            flops = outcome_flops(policy, outcome, block_flops, num_blocks)
            metrics = score(outcome, labels, baseline_correct, flops, full_flops, block_share, num_blocks, seed)
            metrics["layer_accuracy"] = layer_accuracy(policy, test, base.classifier.shape[0])
            per_seed.append(metrics)
            frames.append(_frame(name, seed, test, outcome, flops))
            bar.update()
        rows[name] = {"per_seed": per_seed, "kind": "method", "config": fitted[name].describe()["config"]}
    bar.close()

    for row in rows.values():
        row["summary"] = _aggregate(row["per_seed"])
    pruners = {name: policy for name, policy in fitted.items() if policy.prunes_tokens}
    if matched is None:
        matched = MATCHED_FLOPS_REFERENCE in rows and bool(pruners) and not set(METHODS.names()) <= set(methods)
    comparison = None
    if matched and MATCHED_FLOPS_REFERENCE in rows and pruners:
        def score_outcome(policy: ExitPolicy, outcome: ExitOutcome) -> dict[str, Any]:
            flops = outcome_flops(policy, outcome, block_flops, num_blocks)
            return score(outcome, labels, baseline_correct, flops, full_flops, block_share, num_blocks, c.seed)

        comparison = matched_flops(base, pruners, {name: rows[name]["per_seed"][0] for name in pruners},
                                   rows[MATCHED_FLOPS_REFERENCE]["summary"],
                                   rows[f"full-depth {c.quant}"]["per_seed"][0], test, score_outcome)
    exit_policies = {name: policy for name, policy in fitted.items() if not policy.prunes_tokens}
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "run": {**base.describe(), "methods": methods, "overrides": overrides or {}, "seeds": seeds,
                "test_samples": len(labels),
                "bad_images": test.bad_images, "full_depth_flops": full_flops,
                "wall_time_s": None},
        "environment": environment(),
        "rows": rows,
        "latency": measure_latency(base, fitted, latency_images, latency_repeats) if latency else None,
        "driver_agreement": driver_agreement(base, exit_policies, replayed, agreement_images)
        if agreement_images else None,
    }
    if comparison is not None:
        metrics["matched_flops"] = comparison
    metrics["run"]["wall_time_s"] = round(time.time() - started, 1)
    return metrics, pd.concat(frames, ignore_index=True)


def _frame(method: str, seed: int, trace, outcome: ExitOutcome, flops: np.ndarray) -> "pd.DataFrame":  # noqa: F821
    import pandas as pd

    labels = np.asarray(trace.labels)
    return pd.DataFrame({
        "method": method, "seed": seed, "sample": np.asarray(trace.indices), "label": labels,
        "exit_layer": outcome.exit_layer, "prediction": outcome.predictions,
        "correct": outcome.predictions == labels, "flops": flops,
    })


TABLE_HEADERS = ["method", "top-1 % (95% CI)", "delta vs quant full depth", "FLOPs saving %",
                 "FLOPs saving % (paper formula)", "latency saving % (b=1 / batch)", "exits (layer: %)"]


def table_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """One row per baseline and method, in a fixed column order (:data:`TABLE_HEADERS`)."""
    quant = metrics["run"]["config"]["quant"]
    reference = metrics["rows"][f"full-depth {quant}"]["summary"]["top1"]["mean"]
    latency = (metrics.get("latency") or {}).get("methods", {})
    out = []
    for name, row in metrics["rows"].items():
        s, first = row["summary"], row["per_seed"][0]
        pm = lambda k: f"{s[k]['mean']:.2f}" + (f" ± {s[k]['std']:.2f}" if len(row["per_seed"]) > 1 else "")  # noqa: E731
        lat = latency.get(name if row["kind"] == "method" else "", None)
        out.append([
            name,
            f"{pm('top1')} [{first['top1_ci'][0]:.2f}, {first['top1_ci'][1]:.2f}]",
            f"{s['top1']['mean'] - reference:+.2f}",
            pm("flops_saving"),
            pm("flops_saving_paper_formula"),
            f"{lat['batch1_saving']:.1f} / {lat['throughput_saving']:.1f}" if lat else "-",
            ", ".join(f"{layer}: {share:.1f}" for layer, share in first["exit_distribution"].items()),
        ])
    return out


def format_tables(metrics: dict[str, Any], fmt: str = "github") -> str:
    from tabulate import tabulate

    run_info = metrics["run"]
    title = (f"{run_info['backbone']['model']} / {run_info['config']['quant']} / {run_info['dataset']['name']}: "
             f"{run_info['test_samples']} test images, {run_info['seeds']} seed(s)")
    table = tabulate(table_rows(metrics), headers=TABLE_HEADERS, tablefmt=fmt, disable_numparse=True)
    text = f"{title}\n\n{table}\n"
    agreement = metrics.get("driver_agreement")
    if agreement:
        kind = "batch-invariant" if agreement["batch_invariant"] else "batch-dependent"
        rows = [[name, f"{d['prediction']:.2f}", f"{d['exit_layer']:.2f}"] for name, d in agreement["methods"].items()]
        text += (f"\nReal driver vs trace replay on the first {agreement['images']} test images "
                 f"(batch {agreement['batch_size']}, {kind} quantizer), first seed:\n\n"
                 + tabulate(rows, headers=["method", "predictions differ %", "exit layers differ %"],
                            tablefmt=fmt, disable_numparse=True) + "\n")
    matched = metrics.get("matched_flops")
    if matched:
        rows = []
        for name, m in matched["methods"].items():
            near = m["nearest"]
            rows.append([
                name,
                "-" if m["top1_at_target"] is None else f"{m['top1_at_target']:.2f}",
                "-" if m["delta_vs_reference"] is None else f"{m['delta_vs_reference']:+.2f}",
                f"{near['keep_ratio']:g} / {near['flops_saving']:.2f} / {near['top1']:.2f}",
                ", ".join(f"{p['keep_ratio']:g}: {p['flops_saving']:.1f}/{p['top1']:.2f}" for p in m["points"]),
            ])
        text += (f"\nToken pruners at {matched['reference']}'s FLOPs saving ({matched['target_saving']:.2f}%, "
                 f"top-1 {matched['reference_top1']:.2f}%), keep ratio swept, first seed:\n\n"
                 + tabulate(rows, headers=["method", "top-1 % at matched FLOPs (interpolated)",
                                           f"delta vs {matched['reference']}", "nearest point: keep / saving % / top-1 %",
                                           "keep: saving % / top-1 %"],
                            tablefmt=fmt, disable_numparse=True) + "\n")
    return text


def write_results(out: Path, metrics: dict[str, Any], predictions: "pd.DataFrame") -> None:  # noqa: F821
    """Write the run folder atomically: all files appear together or none does."""
    if out.exists():
        raise ConfigError(f"results folder {out} exists already; pass another --out")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        atomic_write_text(tmp / "config.json", json.dumps(metrics["run"]["config"], indent=2) + "\n")
        atomic_write_text(tmp / "metrics.json", json.dumps(metrics, indent=2, default=float) + "\n")
        predictions.to_parquet(tmp / "predictions.parquet", index=False)
        atomic_write_text(tmp / "tables.md", format_tables(metrics))
