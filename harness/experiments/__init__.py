"""``python -m harness experiment NAME``: the paper's tables and figures as commands.

Each experiment is a function ``(session, seeds, options) -> Report`` registered
with :func:`experiment`; ``all`` runs every one. They share one
:class:`~harness.session.Session` (traces and fitted methods are
cached), and write ``tables.md``, ``tables.tex``, ``data.json`` and figures
into ``results/experiments/<name>-<model>-<data>-<quant>/``. The paper's
numbers come from ``paper_numbers.json`` and appear only in columns labelled
as the paper's.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

from harness.config import HarnessConfig
from harness.errors import ConfigError
from harness.jobs import Shard, complete
from harness.experiments.report import Report
from harness.session import Session
from harness.provenance import environment

Experiment = Callable[[Session, int, dict[str, Any]], Report]
EXPERIMENTS: dict[str, tuple[Experiment, str]] = {}


def experiment(name: str, description: str) -> Callable[[Experiment], Experiment]:
    def register(fn: Experiment) -> Experiment:
        EXPERIMENTS[name] = (fn, description)
        return fn

    return register


def names() -> list[str]:
    _load()
    return list(EXPERIMENTS)


def _load() -> None:
    from harness.experiments import compare, figures, precision, tables, validate  # noqa: F401  (registration)


def run_experiments(name: str, config: HarnessConfig, seeds: int, options: dict[str, Any],
                    out_root: Path, shard: Shard = Shard(), skip_existing: bool = False) -> tuple[list[Path], list[str]]:
    """Run ``name`` (or ``all``) and write each experiment's folder under ``out_root``.

    ``shard`` picks this process's experiments of ``all`` (:mod:`harness.jobs`); ``skip_existing`` skips
    those whose folder is already complete.

    Returns the folders written, and the failed checks of the experiments that make
    checks (``validate``), each prefixed with the experiment's name.
    """
    _load()
    chosen = list(EXPERIMENTS) if name == "all" else [name]
    unknown = [n for n in chosen if n not in EXPERIMENTS]
    if unknown:
        raise ConfigError(f"unknown experiment {unknown[0]!r}; known: all, {', '.join(EXPERIMENTS)}")
    session = Session(config)
    c = session.config
    folders, failures = [], []
    for n in shard.mine(chosen):
        out = out_root / f"{n}-{c.model}-{c.data}-{c.quant}"
        if skip_existing and complete(out, "data.json"):
            print(f"skip {n}: {out} exists (--skip-existing)")
            continue
        started = time.time()
        report = EXPERIMENTS[n][0](session, seeds, options)
        context = {"config": dataclasses.asdict(c), "seeds": seeds, "options": options,
                   "wall_time_s": round(time.time() - started, 1), "environment": environment()}
        report.save(out, context)
        print(f"\n## {n}\n\n{report.render()}\nwrote {out} ({context['wall_time_s']} s)")
        folders.append(out)
        failures += [f"{n}: {failure}" for failure in report.failures]
    return folders, failures
