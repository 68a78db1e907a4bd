"""An experiment's output: tables (markdown + LaTeX via tabulate), figures (PNG + SVG), data (JSON)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness._io import atomic_path, atomic_write_text
from harness.results import results_json

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.json")


def paper_numbers(table: str) -> dict[str, Any]:
    """The paper's reported numbers for ``table`` (from the cited data file; never our measurements)."""
    return json.loads(PAPER_NUMBERS.read_text())["tables"].get(table, {})


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass
class Report:
    """Collects what an experiment measured; :meth:`save` writes it into one results folder."""

    name: str
    tables: list[Table] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # file stem -> matplotlib Figure
    data: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # a check the experiment makes that did not hold

    def table(self, title: str, headers: list[str], rows: list[list[Any]], note: str = "") -> None:
        self.tables.append(Table(title, headers, rows, note))

    def render(self, fmt: str = "github") -> str:
        from tabulate import tabulate

        parts = []
        for t in self.tables:
            body = tabulate(t.rows, headers=t.headers, tablefmt=fmt, disable_numparse=True)
            if fmt == "latex":
                parts.append(f"% {t.title}\n{body}\n" + (f"% {t.note}\n" if t.note else ""))
            else:
                parts.append(f"### {t.title}\n\n{body}\n" + (f"\n{t.note}\n" if t.note else ""))
        return "\n".join(parts)

    def save(self, out: Path, context: dict[str, Any]) -> list[Path]:
        """Write tables.md, tables.tex, data.json and the figures into ``out`` (replaced as a whole)."""
        with atomic_path(out) as tmp:
            tmp.mkdir(parents=True)
            atomic_write_text(tmp / "tables.md", f"# {self.name}\n\n" + self.render() + "\n")
            atomic_write_text(tmp / "tables.tex", self.render("latex"))
            atomic_write_text(tmp / "data.json", results_json({"experiment": self.name, **context, "data": self.data}))
            for stem, figure in self.figures.items():
                for suffix in ("png", "svg"):
                    figure.savefig(tmp / f"{stem}.{suffix}", dpi=150, bbox_inches="tight")
            if out.exists():  # a rerun replaces the folder as a whole
                shutil.rmtree(out)
        return sorted(out.iterdir())


