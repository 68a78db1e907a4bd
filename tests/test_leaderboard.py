"""The leaderboard page, rendered from a real (small) run's results."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness import leaderboard
from harness.cli import main
from harness.config import HarnessConfig
from harness.errors import ConfigError
from harness.run import run, write_results

# the page links to external resources only through these attributes (or CSS @import / url())
RESOURCE_ATTRIBUTES = {"src", "href", "xlink:href", "srcset", "action", "poster", "data", "background"}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, dict]:
    """One real run folder (two methods, one seed, latency measured) and its metrics."""
    base = tmp_path_factory.mktemp("leaderboard")
    metrics, predictions = run(HarnessConfig(limit=32, batch_size=16, cache_dir=str(base / "cache")),
                               ["cls-ee", "pabee"], seeds=1, latency=True, latency_images=4, latency_seconds=0,
                               agreement_images=0)
    write_results(base / "run", metrics, predictions)
    return base / "run", json.loads((base / "run" / "metrics.json").read_text())


def table_rows(metrics: dict) -> int:
    """Rows the leaderboard shows for one run: each row at its default setting, and each budget it reached."""
    return len(metrics["rows"]) + sum(point["reached"] > 0 for row in metrics["rows"].values()
                                      for point in row.get("operating_points", {}).get("summary", []))


class Page(HTMLParser):
    """The parts of a rendered page the tests look at."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.headers: list[dict[str, str | None]] = []
        self.rows: list[list[tuple[dict[str, str | None], str]]] = []  # (td attributes, td text)
        self.ids: set[str] = set()
        self.details_text: dict[str, str] = {}
        self._section: str | None = None
        self._cell: list[str] | None = None
        self._details: str | None = None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "table" and a.get("id") == "board":
            self._section = "table"
        elif self._section and tag in ("thead", "tbody"):
            self._section = tag
        elif self._section == "thead" and tag == "th":
            self.headers.append(a)
        elif self._section == "tbody" and tag == "tr":
            self.rows.append([])
        elif self._section == "tbody" and tag == "td":
            self._cell = []
            self.rows[-1].append((a, ""))
        elif tag == "details":
            self._details = a["id"]
            self.details_text[self._details] = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._section = None
        elif tag == "td" and self._cell is not None:
            attrs, _ = self.rows[-1][-1]
            self.rows[-1][-1] = (attrs, " ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "details":
            self._details = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._details:
            self.details_text[self._details] += data

    def row(self, method: str, budget: float | None = None) -> list[tuple[dict[str, str | None], str]]:
        """The table row of ``method`` (4th column, after a control's tag) at ``budget`` (None: its default)."""
        (found,) = [r for r in self.rows if r[3][0]["data-sort"] == method
                    and r[4][0]["data-sort"] == ("" if budget is None else str(budget))]
        return found


def test_method_names_and_configs_are_escaped(results, tmp_path):
    _, metrics = results
    evil = copy.deepcopy(metrics)
    evil["rows"]["<script>alert(1)</script>"] = evil["rows"].pop("pabee")
    evil["rows"]["<script>alert(1)</script>"]["config"]["note"] = "</pre><img src=x onerror=alert(2)>"
    evil["environment"]["cpu"] = "<b>cpu</b>"
    file = tmp_path / "metrics.json"  # a metrics file given directly, not its folder
    file.write_text(json.dumps(evil))
    html = leaderboard.render(leaderboard.load_results([file]))
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert(1)" not in html and "<img src=x" not in html and "<b>cpu" not in html
    page = Page(html)
    assert page.row("<script>alert(1)</script>")  # the parser reads back the original name
    assert sum(tag == "script" for tag, _ in page.tags) == 1  # only the page's own sorting script


def test_page_needs_no_network(results):
    html = leaderboard.render(leaderboard.load_results([results[0]]))
    page = Page(html)
    for tag, attrs in page.tags:
        assert tag not in ("link", "iframe", "object", "embed", "img", "base")
        assert not (tag == "script" and "src" in attrs)
        for name, value in attrs.items():
            if name in RESOURCE_ATTRIBUTES and value:
                assert "://" not in value and not value.startswith("//"), (tag, name, value)
    assert "@import" not in html and "url(" not in html


def test_every_column_sorts_and_every_cell_has_a_sort_key(results):
    _, metrics = results
    page = Page(leaderboard.render(leaderboard.load_results([results[0]])))
    assert len(page.headers) == 15
    assert all(h.get("data-type") in ("num", "str") for h in page.headers)
    assert len(metrics["rows"]) == 6  # two baselines, two controls and two methods at their default settings
    assert len(page.rows) == table_rows(metrics) > 6  # and at each budget they reach
    for row in page.rows:
        assert len(row) == len(page.headers)
        assert all("data-sort" in attrs for attrs, _ in row)
    for header, (attrs, _) in zip(page.headers, page.rows[0]):
        if header["data-type"] == "num" and attrs["data-sort"]:
            float(attrs["data-sort"])


def test_table_numbers_are_the_metrics(results):
    folder, metrics = results
    page = Page(leaderboard.render(leaderboard.load_results([folder])))
    quant = metrics["run"]["config"]["quant"]
    reference = metrics["rows"][f"full-depth {quant}"]["summary"]["top1"]["mean"]
    for name, row in metrics["rows"].items():
        cells = page.row(name)
        first, mean = row["per_seed"][0], row["summary"]["top1"]["mean"]
        assert [text for _, text in cells[:3]] == [metrics["run"]["backbone"]["model"],
                                                   metrics["run"]["dataset"]["name"], quant]
        assert cells[3][1] == ("control " if row["kind"] == "control" else "") + name
        assert cells[5][1] == f"{mean:.2f}" and float(cells[5][0]["data-sort"]) == pytest.approx(mean)
        assert cells[6][1] == f"[{first['top1_ci'][0]:.2f}, {first['top1_ci'][1]:.2f}]"
        assert cells[7][1] == f"{mean - reference:+.2f}"
        assert cells[8][1] == f"{row['summary']['flops_saving']['mean']:.1f}"
        assert cells[12][1] == f"{100 * first['quadrants']['net_rescue'] / 32:+.1f}"
        exits = {int(k): v for k, v in first["exit_distribution"].items()}
        assert float(cells[13][0]["data-sort"]) == pytest.approx(sum(k * v for k, v in exits.items()) / 100)
        for point in row.get("operating_points", {}).get("summary", []):
            if point["reached"]:  # the budget's row: its operating point on test, and its routing gain
                cells = page.row(name, point["budget"])
                assert cells[5][1] == f"{point['test_top1']['mean']:.2f}"
                assert cells[8][1] == f"{point['test_saving']['mean']:.1f}"
                gain = point.get("routing_gain", {}).get("mean")
                assert cells[9][1] == ("–" if gain is None else f"{gain:+.2f}")
    for name in ("cls-ee", "pabee"):
        latency = metrics["latency"]["methods"][name]
        cells = page.row(name)
        assert cells[10][1] == f"{latency['throughput_saving']:.1f}"
        assert cells[11][1] == f"{latency['batch1_saving']:.1f}"
    assert page.row("full-depth fp32")[10] == ({"class": "n", "data-sort": ""}, "–")  # not measured: sorts last
    # each row links to its run's details; the page's one other link is its rows as CSV
    assert {a["href"] for tag, a in page.tags if tag == "a" and not a["href"].startswith("#")} == {"leaderboard.csv"}
    (anchor,) = {a["href"] for tag, a in page.tags if tag == "a" and a["href"].startswith("#")}
    details = page.details_text[anchor.lstrip("#")]
    assert f"{metrics['run']['test_samples']} test samples" in details
    assert f"wall time {metrics['run']['wall_time_s']:.1f} s" in details
    assert '"threshold": 0.9' in details and metrics["environment"]["timestamp"] in details


def test_a_repeated_results_folder_adds_no_rows(results):
    loaded = leaderboard.load_results([results[0], results[0] / "metrics.json"])
    assert len(leaderboard.leaderboard_rows(loaded)) == table_rows(results[1])
    assert len(Page(leaderboard.render(loaded)).ids & {r["anchor"] for r in loaded}) == 2


def test_cli_writes_the_page(results, tmp_path):
    out = tmp_path / "site" / "index.html"
    proc = subprocess.run([sys.executable, "-m", "harness", "leaderboard", str(results[0]), "-o", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"found 1 run under {results[0]}",
        f"wrote {out} and {out.parent / 'leaderboard.csv'} ({table_rows(results[1])} rows from 1 results)"]
    assert len(Page(out.read_text()).rows) == table_rows(results[1])
    csv = (out.parent / "leaderboard.csv").read_text().splitlines()
    assert len(csv) == 1 + table_rows(results[1]) and csv[0].startswith("backbone,dataset,quantizer,method,kind")


def test_unknown_schema_version_is_a_one_line_error(results, tmp_path, capsys):
    _, metrics = results
    file = tmp_path / "future" / "metrics.json"
    file.parent.mkdir()
    file.write_text(json.dumps({**metrics, "schema_version": 99}))
    with pytest.raises(ConfigError, match=r"future/metrics.json: schema_version 99"):
        leaderboard.load_results([file.parent])
    assert main(["leaderboard", str(file), "-o", str(tmp_path / "index.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(file) in err and "schema_version" in err
    assert not (tmp_path / "index.html").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium")
def test_screenshot_is_not_blank(results, tmp_path):
    from PIL import Image

    page, png = tmp_path / "index.html", tmp_path / "lb.png"
    leaderboard.write(leaderboard.load_results([results[0]]), page)
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1400,1000",
                    page.as_uri()], capture_output=True, timeout=120, check=True)
    assert png.stat().st_size > 10_000
    low, high = Image.open(png).convert("L").getextrema()
    assert low < high


BASELINE = Path(__file__).resolve().parent.parent / "results" / "baseline" / "metrics.json"
ROWS = table_rows(json.loads(BASELINE.read_text()))


def _baseline_copy(folder: Path, edit=None) -> Path:
    """``folder/metrics.json``: the committed baseline's metrics, changed by ``edit`` first."""
    metrics = json.loads(BASELINE.read_text())
    if edit:
        edit(metrics)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder / "metrics.json"


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("rows"), "missing key 'rows'"),
    (lambda m: m["rows"]["pabee"].pop("summary"), "missing key 'summary' in rows['pabee']"),
    (lambda m: m["run"]["config"].pop("quant"), "missing key 'quant' in run['config']"),
    (lambda m: m["rows"]["lra-ee"]["per_seed"][0]["quadrants"].pop("lost"),
     "missing key 'lost' in rows['lra-ee']['per_seed'][0]['quadrants']"),
    (lambda m: m["rows"]["cls-ee"].update(per_seed=[]), "rows['cls-ee']['per_seed'] is empty"),
    (lambda m: m["rows"]["cls-ee"]["summary"]["top1"].update(mean="high"),
     "rows['cls-ee']['summary']['top1']['mean'] is a string, expected a number or null"),
])
def test_a_results_file_missing_keys_is_a_one_line_error(tmp_path, capsys, edit, message):
    file = _baseline_copy(tmp_path / "broken", edit)
    with pytest.raises(ConfigError) as raised:
        leaderboard.load_results([file.parent])
    assert str(raised.value) == f"{file}: {message}"
    assert main(["leaderboard", str(file.parent), "-o", str(tmp_path / "index.html")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {file}: {message}\n"
    assert not (tmp_path / "index.html").exists()


def test_out_may_be_a_folder(tmp_path, capsys):
    _baseline_copy(tmp_path / "run")
    (tmp_path / "site").mkdir()
    assert main(["leaderboard", str(tmp_path / "run"), "-o", str(tmp_path / "site")]) == 0
    written = tmp_path / "site" / "index.html"
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"wrote {written} and {written.parent / 'leaderboard.csv'} ({ROWS} rows from 1 results)"
    assert len(Page((tmp_path / "site" / "index.html").read_text()).rows) == ROWS


def test_out_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys):
    _baseline_copy(tmp_path / "run")
    (tmp_path / "file").write_text("not a folder")
    assert main(["leaderboard", str(tmp_path / "run"), "-o", str(tmp_path / "file" / "index.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot write {tmp_path / 'file' / 'index.html'}: ")


def test_folders_are_searched_for_runs_in_sorted_order(tmp_path, capsys):
    root = tmp_path / "results"
    _baseline_copy(root / "b" / "second")
    _baseline_copy(root / "a" / "deeper" / "first", lambda m: m["rows"]["pabee"]["summary"]["top1"].update(mean=1.0))
    (root / "experiments" / "main").mkdir(parents=True)
    (root / "experiments" / "main" / "data.json").write_text("{}")  # other results files are not runs
    _baseline_copy(root / ".run.tmp-123", lambda m: m.pop("rows"))  # a run still being written
    out = tmp_path / "index.html"
    assert main(["leaderboard", str(root), "-o", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"found 2 runs under {root}",
                     f"wrote {out} and {out.parent / 'leaderboard.csv'} ({ROWS} rows from 2 results)"]
    loaded = leaderboard.load_results([root])
    assert [r["label"] for r in loaded] == ["results/a/deeper/first", "results/b/second"]
    page = Page(out.read_text())
    assert page.row("pabee")[5][1] != "1.00"  # the same row in two runs: the later one (sorted order) is shown
    assert [r[-1][1] for r in page.rows] == ["results/b/second"] * ROWS


def test_a_folder_without_runs_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main(["leaderboard", str(tmp_path / "empty"), "-o", str(tmp_path / "index.html")]) == 2
    assert capsys.readouterr().err == (f"error: no run under {tmp_path / 'empty'}: no metrics.json in it or its "
                                       "subfolders (pass folders written by `python -m harness run`)\n")
