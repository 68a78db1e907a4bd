"""``python -m harness``: one entry point, one small function per subcommand.

Heavy imports (torch, open_clip) happen inside the commands, so ``--help``
and ``list`` stay quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.config import HarnessConfig
    from harness.distributed import Ranks

EPILOG = """examples:
  python -m harness list
  python -m harness run --methods all
  python -m harness run --methods cls-ee,pabee --seeds 1 --limit 500 --no-latency
  python -m harness profile --quant int8-dynamic
  python -m harness zeroshot --quant fp32,int8-dynamic,fake-w4a4
  python -m harness profile --model ViT-B-32 --pretrained /path/to/weights.safetensors \\
         --data imagenet --data-root /data/imagenet/val --quant int8-dynamic --limit 2000
"""


def _add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per HarnessConfig field, help text taken from the field."""
    from harness.config import HarnessConfig

    group = parser.add_argument_group("backbone, data and quantizer")
    hints = typing.get_type_hints(HarnessConfig)
    for f in dataclasses.fields(HarnessConfig):
        if f.name in skip:
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if hints[f.name] is bool:
            group.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        base = next((arm for arm in typing.get_args(hints[f.name]) if arm is not type(None)), hints[f.name])
        kind = base if base in (int, float) else str
        group.add_argument(flag, type=kind, default=f.default, choices=f.metadata["choices"], help=f.metadata["help"])


def _add_job_arguments(parser: argparse.ArgumentParser, jobs: str) -> None:
    """--shard and --skip-existing (:mod:`harness.jobs`)."""
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help=f"run every N-th of the {jobs} from the I-th (0-based; default: a launcher's "
                             "RANK/WORLD_SIZE, else all)")
    parser.add_argument("--skip-existing", action="store_true", help=f"skip the {jobs} whose folder is complete")


def _at_least(minimum: int):
    """argparse type: an integer >= ``minimum`` (argparse names the flag in its one-line error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _config(args: argparse.Namespace, **overrides: object) -> "HarnessConfig":
    from harness.config import HarnessConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(HarnessConfig) if hasattr(args, f.name)}
    return HarnessConfig(**{**values, **overrides})


def _default_config(method: str) -> str:
    """``key=value, ...`` of a method's default config ('?' if it cannot be built)."""
    from harness.policy import create_method

    try:
        config = create_method(method).describe()["config"]
    except Exception as exc:  # a broken plugin is listed, not fatal
        return f"? ({type(exc).__name__})"
    return ", ".join(f"{key}={value}" for key, value in config.items()) or "-"


def _cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from harness.backbones import backbone_family, list_backbones, timm_classifiers
    from harness.datasets import DATASETS
    from harness.policy import METHODS
    from harness.quantizers import QUANTIZERS

    print(tabulate([(name, text, _default_config(name)) for name, text in METHODS.describe()],
                   headers=["method", "description", "default config (change with run --set METHOD.KEY=VALUE)"],
                   maxcolwidths=[None, 50, 60]))
    print()
    for registry in (QUANTIZERS, DATASETS):
        print(tabulate(registry.describe(), headers=[registry.kind, "description"]))
        print()
    families: dict[str, list[str]] = {}
    for name in list_backbones():
        families.setdefault(backbone_family(name), []).append(name)
    for family, names in families.items():
        print(f"backbones, {family} family ({len(names)}): " + ", ".join(names))
    timm_names = timm_classifiers()
    print(f"backbones, timm family ({len(timm_names)} classifiers, as --model timm:ARCH): "
          + ", ".join(f"timm:{name}" for name in timm_names if name.startswith(("deit_", "vit_tiny", "vit_small")))
          + ", ...")
    _warn_refused_plugins()
    return 0


def _warn_refused_plugins() -> None:
    """One stderr line per plugin that failed to load or clashed with a registered name."""
    from harness.datasets import DATASETS
    from harness.policy import METHODS
    from harness.quantizers import QUANTIZERS

    for registry in (METHODS, QUANTIZERS, DATASETS):
        registry.names()  # loads the plugins
        for name, error in registry.load_errors.items():
            print(f"warning: {registry.kind} plugin {name!r} refused: {error}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    """One config; or, with comma-separated --model / --quant, a sweep: one results folder per config."""
    import datetime

    from harness.distributed import Ranks
    from harness.jobs import Shard, complete
    from harness.protocol import parse_budgets
    from harness.run import check_out, parse_overrides, resolve_methods

    base = _config(args)
    configs = [dataclasses.replace(base, model=model, quant=quant).resolved()
               for model in _listed(base.model) for quant in _listed(base.quant)]
    budgets = parse_budgets(args.budgets)
    _warn_refused_plugins()
    methods = resolve_methods(args.methods)
    overrides = parse_overrides(args.set, methods)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    if len(configs) == 1 and args.shard is None and not args.skip_existing:
        config = configs[0]
        out = Path(args.out or f"results/{stamp}-{_folder_name(config)}")
        ranks = Ranks.from_env()  # several ranks: they shard this config's traces
        if ranks.rank == 0:
            check_out(out)  # now, not after minutes of work
        return _run_config(config, out, args, methods, overrides, budgets, ranks)
    root = Path(args.out or f"results/{stamp}-sweep")
    jobs = [(config, root / _folder_name(config)) for config in configs]
    shard = Shard.parse(args.shard)  # several ranks: they split the configs, each run alone
    mine = shard.mine(jobs)
    print(f"sweep: {len(jobs)} config(s), shard {shard} runs {len(mine)}, results under {root}")
    status = 0
    for config, out in mine:
        if args.skip_existing and complete(out, "metrics.json"):
            print(f"skip {out}: complete (--skip-existing)")
            continue
        check_out(out)
        status = max(status, _run_config(config, out, args, methods, overrides, budgets, Ranks()))
    return status


def _listed(value: str | None) -> list[str | None]:
    """A comma-separated flag value as a list (``None``: the default, once)."""
    return [None] if value is None else [item.strip() for item in value.split(",") if item.strip()]


def _folder_name(config: "HarnessConfig") -> str:
    """MODEL-DATA-QUANT, with the '/' and ':' of names such as timm:ARCH made safe for a folder name."""
    return f"{config.model}-{config.data}-{config.quant}".replace("/", "_").replace(":", "_")


def _run_config(config: "HarnessConfig", out: Path, args: argparse.Namespace, methods: list[str],
                overrides: dict, budgets: tuple[float, ...], ranks: "Ranks") -> int:
    """Run one config into ``out`` (its traces sharded across ``ranks``); the exit code."""
    from harness.distributed import process_group, restore_threads, trace_for_run
    from harness.run import format_tables, run, write_results

    if ranks.sharded:  # every rank traces its shards; rank 0 goes on alone, from the cache
        with process_group(ranks, config.device) as device:
            trace_for_run(dataclasses.replace(config, device=device), methods,
                          [config.seed + s for s in range(args.seeds)], ranks)
        if ranks.rank != 0:
            print(f"rank {ranks.rank} of {ranks.world}: traced its shards; rank 0 writes the results")
            return 0
        restore_threads(config.threads)
    metrics, predictions = run(config, methods, args.seeds, latency=not args.no_latency,
                               latency_images=args.latency_images, latency_seconds=args.latency_seconds,
                               agreement_images=args.agreement_images,
                               overrides=overrides, budgets=budgets)
    write_results(out, metrics, predictions)
    print(format_tables(metrics, fmt="simple"))
    print(f"wrote {out} ({metrics['run']['wall_time_s']} s)")
    if metrics["failures"]:
        print(f"error: {len(metrics['failures'])} method(s) failed: {', '.join(metrics['failures'])} "
              "(the others' results are written)", file=sys.stderr)
        return 1
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from harness.results import refuse_overwrite

    config = _config(args).resolved()
    out = Path(args.out or f"results/profile/{config.model}-{config.data}-{config.quant}")
    if not args.overwrite:
        refuse_overwrite(out)  # now, not after minutes of tracing

    from harness import profile
    from harness.session import Session

    session = Session(config)
    result = profile.noise_profile(session, split=args.split)
    print(profile.format_table(result))
    paths = profile.save(result, out)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _cmd_zeroshot(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from harness.session import Session

    session = Session(_config(args, quant=None))
    quants = args.quant.split(",")
    session.prepare_traces((q, args.split) for q in quants)  # one pass over the images for all of them
    rows = [(q, session.zero_shot_top1(q, args.split)) for q in quants]
    print(tabulate(rows, headers=["quantizer", f"top-1 % ({args.split})"], floatfmt=".2f"))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import contextlib
    import dataclasses
    import tempfile

    from harness import bench
    from harness.datasets.synthetic import write_imagenet_layout
    from harness.provenance import environment
    from harness.results import results_json
    from harness.session import Session

    config = _config(args).resolved()
    suites = bench.SUITES if args.suite == "all" else (args.suite,)
    out_dir = Path(args.out or "results/bench") if args.suite == "all" else None
    with contextlib.ExitStack() as cleanup:
        for suite in suites:
            suite_config = config
            if args.suite == "all" and suite in bench.SETTINGS:
                suite_config = dataclasses.replace(config, **bench.SETTINGS[suite])
                if suite == "data":  # a generated val folder, removed when the bench ends
                    val = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="exitbench-bench-"))) / "val"
                    write_imagenet_layout(val, per_class=1, progress=True)
                    suite_config = dataclasses.replace(suite_config, data_root=str(val))
            session = Session(suite_config)
            result = bench.run_suite(suite, session, rounds=args.rounds, quants=tuple(args.quants.split(",")))
            print(f"## {suite}: {session.config.model} / {session.config.quant}\n\n"
                  f"{bench.format_result(suite, result)}\n")
            out = out_dir / f"{suite}.json" if out_dir else (Path(args.out) if args.out else None)
            if out:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(results_json({"suite": suite, "result": result, **session.describe(),
                                             "environment": environment()}))
                print(f"wrote {out}")
    return 0


def _cmd_synth_imagenet(args: argparse.Namespace) -> int:
    from harness.datasets.synthetic import write_imagenet_layout
    from harness.errors import ConfigError

    out = Path(args.out)
    width, _, height = args.size.partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise ConfigError(f"--size {args.size}: expected WIDTHxHEIGHT, e.g. 500x375")
    size = (int(width), int(height))
    written = write_imagenet_layout(out / "val", args.per_class, size, args.seed, progress=True, workers=args.workers)
    if args.train_per_class:
        written += write_imagenet_layout(out / "train", args.train_per_class, size, args.seed + 1, progress=True,
                                         workers=args.workers)
    print(f"wrote {written:,} synthetic JPEGs under {out} (random content: accuracy on them is chance)")
    return 0


def _cmd_train_embedded(args: argparse.Namespace) -> int:
    from harness.train_embedded import TrainConfig, record_accuracies, screen_default_quantizer, train

    if not args.evaluate_only:
        card = train(TrainConfig(epochs=args.epochs, seed=args.seed, max_steps=args.max_steps), Path(args.data_root))
        print(f"wrote weights and card ({card['wall_time_s']} s)")
    screening = screen_default_quantizer()
    for quant, top1 in screening["percent"].items():
        print(f"default-quantizer screening, holdout top-1 {quant}: {top1:.2f}%")
    print(f"chosen by the screening: {screening['chosen']}")
    for quant, top1 in record_accuracies().items():
        print(f"zero-shot test top-1 {quant}: {top1:.2f}%")
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from harness import leaderboard

    results = leaderboard.load_results(args.results)
    print(f"found {len(results)} run{'' if len(results) == 1 else 's'} under {', '.join(args.results)}")
    out, rows = leaderboard.write(results, Path(args.out))
    print(f"wrote {out} and {out.parent / leaderboard.CSV_NAME} ({rows} rows from {len(results)} results)")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from harness.experiments import run_experiments
    from harness.jobs import Shard

    options = {"factor": args.factor, "no_sweep": args.no_sweep}
    folders, failures = run_experiments(args.name, _config(args).resolved(), args.seeds, options, Path(args.out),
                                        Shard.parse(args.shard), args.skip_existing)
    print(f"wrote {len(folders)} experiment folder(s) under {args.out}")
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0


def _cmd_check(args: argparse.Namespace) -> int:
    from harness import check
    from harness.results import read_metrics

    baseline_file, baseline = read_metrics(args.baseline)
    if args.current:
        current_file, current = read_metrics(args.current)
        predictions = check.read_predictions(current_file)
    else:
        print("re-running the baseline's config (no latency)", file=sys.stderr)
        current, predictions = check.rerun(baseline, cache_dir=args.cache_dir)
    checks = check.compare(baseline, current, args.tolerance, args.flops_tolerance,
                           check.read_predictions(baseline_file), predictions)
    text, passed = check.report(checks, baseline, current)
    print(text)
    return 0 if passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness",
        description="Benchmark early-exit methods on quantized CLIP vision encoders.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list quantizers, datasets and backbones")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("run", help="fit and evaluate exit methods against full-depth baselines",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_arguments(p)
    p.add_argument("--methods", default="all", help="'all' or a comma-separated list (see `list`)")
    p.add_argument("--seeds", type=_at_least(1), default=3, help="seeds re-drawing head init, data order and gate split")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="change a method's config (repeatable; `list` shows the options), e.g. pabee.patience=4")
    p.add_argument("--budgets", default="10,25,40",
                   help="FLOPs-saving budgets in percent: at each, every method's and control's operating point is "
                        "the knob value with the best gate-split top-1 among those saving at least the budget on "
                        "gate (never chosen on test)")
    p.add_argument("--out", default=None, help="results folder (default: results/TIME-MODEL-DATA-QUANT); for a sweep "
                                               "(comma-separated --model / --quant) the folder of the configs' "
                                               "folders (default: results/TIME-sweep)")
    p.add_argument("--no-latency", action="store_true", help="skip the real-driver latency measurement")
    p.add_argument("--latency-images", type=_at_least(1), default=32,
                   help="test images timed by the real driver, one at a time and as one batch "
                        "(--no-latency skips the pass)")
    p.add_argument("--latency-seconds", type=float, default=120.0,
                   help="at most this long for the latency rounds: they stop earlier once every latency saving's "
                        "95%% CI is within +-2 points")
    p.add_argument("--agreement-images", type=_at_least(0), default=1024,
                   help="test images run through the real driver to report its disagreement with trace replay "
                        "(non-zero only for batch-dependent quantizers); 0 skips")
    _add_job_arguments(p, "configs of a sweep")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("profile", help="QIRC noise profile: fp32 vs quantized, block by block",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_arguments(p)
    p.add_argument("--split", default="heads", choices=("heads", "gate", "test"),
                   help="split to profile (default heads: where LRA-EE measures its INR)")
    p.add_argument("--out", default=None, help="output folder (default: results/profile/MODEL-DATA-QUANT)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results in an --out folder that has files (default: refuse, before computing)")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("zeroshot", help="full-depth zero-shot top-1 under one or more quantizers")
    _add_config_arguments(p, skip=("quant",))
    p.add_argument("--quant", default="fp32,int8-dynamic", help="comma-separated quantizers")
    p.add_argument("--split", default="test", choices=("heads", "gate", "test"))
    p.set_defaults(func=_cmd_zeroshot)

    p = sub.add_parser("bench", help="throughput and latency ratios: trace overhead, quantizers, methods' latency",
                       epilog="examples:\n  python -m harness bench --suite all      # everything, to results/bench/\n"
                              "  python -m harness bench --suite trace\n"
                              "  python -m harness bench --suite data --model ViT-B-32 --pretrained none --data imagenet "
                              "--data-root VAL --limit 256 --workers 2\n"
                              "  python -m harness bench --suite quant --model ViT-B-32 --pretrained none "
                              "--batch-size 32",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_arguments(p)
    p.add_argument("--suite", choices=("trace", "quant", "latency", "data", "all"), default="trace",
                   help="trace: trace driver vs plain encode_image (fp32 and --quant); quant: --quants side by side; "
                        "latency: every method vs full depth under the real driver, with 95%% CIs; data: decoding "
                        "with and without --workers, and the fed trace vs encode_image on pre-decoded images; all: "
                        "the four (quant and data on a random-init ViT-B-32 at batch 32, data fed 256 images of a "
                        "synthetic ImageNet folder), written to results/bench/")
    p.add_argument("--quants", default="fp32,int8-dynamic,int8-torchao,int8-pt2e", help="quantizers for --suite quant")
    p.add_argument("--rounds", type=_at_least(1), default=None,
                   help="interleaved timing rounds (default: trace 20, quant 10, data 5); ratios are paired by round "
                        "and reported as means (20%% trimmed from 5 rounds on) with 95%% CIs")
    p.add_argument("--out", default=None, help="also write the result as JSON here (--suite all: the folder, "
                                               "default results/bench)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("synth-imagenet", help="write a synthetic ImageNet-layout folder (random JPEGs) for timing "
                                              "and memory checks offline")
    p.add_argument("out", help="new folder: OUT/val (and OUT/train) get 1,000 WordNet-id-named class folders")
    p.add_argument("--per-class", type=_at_least(1), default=10, help="val images per class (default 10)")
    p.add_argument("--train-per-class", type=_at_least(0), default=0, help="train images per class (default none)")
    p.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of every image (default 500x375)")
    p.add_argument("--seed", type=_at_least(0), default=0)
    p.add_argument("--workers", type=_at_least(0), default=0,
                   help="processes writing class folders (default 0: this one); the files do not depend on it")
    p.set_defaults(func=_cmd_synth_imagenet)

    p = sub.add_parser("train-embedded", help="train the embedded default CLIP on Fashion-MNIST")
    p.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist",
                   help="folder with the Fashion-MNIST IDX .gz files (Debian: dataset-fashion-mnist)")
    p.add_argument("--epochs", type=_at_least(1), default=7)
    p.add_argument("--seed", type=_at_least(0), default=0)
    p.add_argument("--max-steps", type=_at_least(1), default=None, help="stop after N steps (smoke test)")
    p.add_argument("--evaluate-only", action="store_true",
                   help="only re-measure the card's zero-shot accuracies of the shipped weights")
    p.set_defaults(func=_cmd_train_embedded)

    p = sub.add_parser("experiment", help="the paper's tables and figures as commands (see README)",
                       epilog="experiments: all, main (Table 1), compare (Table 2), ablation (Table 3), rescue (Table 4), "
                              "profile (Fig. 1), pareto (Fig. 2), gates (Fig. 3), pathology (Fig. 4), precision, validate "
                              "(the instrument's positive and negative controls; exits 1 when one fails)\n"
                              "examples:\n  python -m harness experiment all\n"
                              "  python -m harness experiment ablation --factor head=cls,ssa "
                              "--factor supervision=hard,distilled --factor routing=last,adaptive",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="experiment name, or 'all'")
    _add_config_arguments(p)
    p.add_argument("--seeds", type=_at_least(1), default=3, help="seeds for the experiments that report mean +- std")
    p.add_argument("--factor", action="append", default=[], metavar="NAME=LEVEL,LEVEL",
                   help="ablation: an lra-ee switch and its levels (repeatable; default: the paper's five "
                        "configurations); head=cls,ssa is an alias of feature=cls,patch_mean")
    p.add_argument("--no-sweep", action="store_true",
                   help="validate: run the positive and negative controls only, not the damage sweep")
    p.add_argument("--out", default="results/experiments", help="folder for the experiments' folders")
    _add_job_arguments(p, "experiments of 'all'")
    p.set_defaults(func=_cmd_experiment)

    from harness.check import NOISE_Z

    p = sub.add_parser("check", help="regression check: top-1 and FLOPs saving against baseline results",
                       description="Compares each row's mean top-1 and FLOPs saving with the baseline's. A row fails\n"
                                   "when its top-1 drops, or its FLOPs saving moves either way, by more than\n"
                                   f"max(floor, {NOISE_Z:g} x noise) points, or when it is missing. noise combines the\n"
                                   "baseline row's seed spread (std over seeds x sqrt(2/N)) with a paired bootstrap\n"
                                   "over test samples of both runs' predictions.parquet (seed spread alone where one\n"
                                   "is missing). The table shows each tolerance used and its source.",
                       epilog="examples:\n  python -m harness check --baseline results/baseline\n"
                              "  python -m harness check --baseline results/baseline --current results/RUN",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="baseline run folder or its metrics.json")
    p.add_argument("--current", default=None,
                   help="run folder to compare (default: re-run the baseline's config, methods and seeds)")
    p.add_argument("--tolerance", type=float, default=0.5,
                   help="floor of the allowed top-1 drop, percentage points: the smallest drop that fails a row "
                        "(the noise-derived tolerance is used where larger)")
    p.add_argument("--flops-tolerance", type=float, default=0.5,
                   help="floor of the allowed change of FLOPs saving either way, percentage points "
                        "(the noise-derived tolerance is used where larger)")
    p.add_argument("--cache-dir", default=None, help="cache folder for a re-run (default as for `run`)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("leaderboard", help="one static HTML page (table, Pareto plot, configs) from run folders",
                       epilog="examples:\n  python -m harness leaderboard results/ -o leaderboard/index.html\n"
                              "  python -m harness leaderboard results/baseline results/RUN/metrics.json -o site/",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+",
                   help="folders searched for runs at any depth (every folder holding a metrics.json written by "
                        "`run`; folders starting with '.' are skipped), or metrics.json files")
    p.add_argument("-o", "--out", default="leaderboard/index.html",
                   help="HTML file to write, or an existing folder to write index.html into "
                        "(default: leaderboard/index.html)")
    p.set_defaults(func=_cmd_leaderboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    from harness.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as exc:
        # User errors (unknown names, bad paths, mismatched checkpoints) end in
        # one line, not a traceback; EXITBENCH_DEBUG=1 shows the traceback.
        if os.environ.get("EXITBENCH_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
