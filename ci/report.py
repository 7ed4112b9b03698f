"""One self-contained HTML page of a CI run: the test matrix and the benchmark figures.

Usage: python -m ci.report [--results DIR] [--out FILE] [--shards DIR]
(defaults: results/, results/report.html; --shards: every subfolder is also read as a shard's
results/, as the nightly workflow's merge job downloads them next to the merged nightly.json)

Reads whatever of these exists under DIR (missing ones are noted in the page):
  junit-*.xml (ci/test's stages), nightly/junit-*.xml and nightly.json (ci/nightly),
  junit-regression-<switch>[-<tag>].xml and regressions[-<tag>].json (ci/regressions),
  pipeline-*.json (stage summaries), bench-*.json (ci/bench).

Rows are tests (node ids without the guest parameter), columns are guests (the `[tiny]` part of
a node id; a stage run on other downstairs, junit-suite-real.xml, gets its own column) and one
column per regression switch. A cell is pass / fail / skip / flaky (passed and failed over
repeats), with the pass rate when the test ran more than once, the first lines of its failure
message and a link to its kept results directory (the JUnit property phd_results). In a
regression column a failure is what the switch is for: it shows as "caught" (the test detects
the re-created bug), a pass as "not caught". Bench files give one inline SVG bar chart each.

The page has no JavaScript and no external URL; every string read is escaped. A malformed input
is an error naming the file (exit 2). Standard library only: it runs without the venv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import os
import re
import sys
import tomllib
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ci.pipeline import ROOT, junit_cases

MANIFEST = ROOT / "artifacts" / "artifacts.toml"
MESSAGE_LINES = 12
NO_GUEST = "-"


class ReportError(Exception):
    """An input that cannot be read; the message names the file."""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def known_guests(manifest: Path = MANIFEST) -> list[str]:
    """The guest keys of the artifact manifest (`kind = { guest_os = ... }`); [] without one."""
    try:
        data = tomllib.loads(manifest.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return []
    arts = data.get("artifacts", {})
    return [k for k, v in arts.items() if isinstance(v, dict) and isinstance(v.get("kind"), dict)
            and "guest_os" in v["kind"]]


def split_guest(node_id: str, guests: list[str]) -> tuple[str, str]:
    """`t.py::test_x[debian-plain]` -> (`t.py::test_x[plain]`, `debian`); no guest -> (id, "-").
    A guest is a known guest name that is a whole dash-separated part of the parameter id."""
    m = re.fullmatch(r"(.*?)\[(.*)\]", node_id, flags=re.DOTALL)
    if not m:
        return node_id, NO_GUEST
    base, params = m.groups()
    for guest in sorted(guests, key=len, reverse=True):
        for pm in re.finditer(rf"(?:^|-)({re.escape(guest)})(?=-|$)", params):
            rest = (params[:pm.start(1)] + params[pm.end(1):]).strip("-").replace("--", "-")
            return (f"{base}[{rest}]" if rest else base), guest
    return node_id, NO_GUEST


@dataclass
class Cell:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    messages: list[str] = field(default_factory=list)
    results_dirs: list[str] = field(default_factory=list)

    @property
    def runs(self) -> int:
        return self.passed + self.failed + self.skipped

    @property
    def state(self) -> str:
        if self.passed and self.failed:
            return "flaky"
        if self.failed:
            return "fail"
        if self.passed:
            return "pass"
        return "skip"

    @property
    def pass_rate(self) -> float | None:
        ran = self.passed + self.failed
        return self.passed / ran if ran else None


@dataclass
class Column:
    key: str
    title: str
    regression: bool = False  # a failure is "caught"
    note: str = ""


@dataclass
class Report:
    columns: dict[str, Column] = field(default_factory=dict)
    cells: dict[tuple[str, str], Cell] = field(default_factory=lambda: defaultdict(Cell))
    inputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pipelines: list[dict[str, Any]] = field(default_factory=list)
    benches: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not readable JSON: {exc}") from None


def _read_junit(path: Path) -> list[tuple[str, str, str, str]]:
    """(node id, outcome, full message, phd_results) per test case."""
    try:
        cases = junit_cases(path)
        dirs = {}
        for tc in ET.parse(path).getroot().iter("testcase"):
            for prop in tc.iter("property"):
                if prop.get("name") == "phd_results":
                    dirs[(tc.get("classname") or "", tc.get("name") or "")] = prop.get("value") or ""
    except (OSError, ET.ParseError, ValueError) as exc:
        raise ReportError(f"{path}: not readable JUnit XML: {exc}") from None
    tcs = list(ET.parse(path).getroot().iter("testcase"))
    out = []
    for case, tc in zip(cases, tcs, strict=True):
        key = (tc.get("classname") or "", tc.get("name") or "")
        out.append((case.id, case.outcome, case.full_message.strip(), dirs.get(key, "")))
    return out


def _column(report: Report, key: str, title: str, *, regression: bool = False) -> str:
    report.columns.setdefault(key, Column(key, title, regression))
    return key


def _add(report: Report, row: str, col: str, outcome: str, message: str, results_dir: str,
         *, count: bool = True) -> None:
    cell = report.cells[(row, col)]
    if count:
        if outcome == "passed":
            cell.passed += 1
        elif outcome == "skipped":
            cell.skipped += 1
        else:
            cell.failed += 1
    if message and outcome != "passed" and message not in cell.messages:
        cell.messages.append(message)
    if results_dir and results_dir not in cell.results_dirs:
        cell.results_dirs.append(results_dir)


def _stage_variant(path: Path) -> str:
    """junit-suite-real.xml -> "real" (another downstairs: its own column); "" otherwise."""
    m = re.fullmatch(r"junit-[a-z]+(?:-\d+)?(?:-(.+))?\.xml", path.name)
    return (m.group(1) or "") if m else ""


def _locate(results_dir: str, source: Path) -> str:
    """A kept results directory as recorded (an absolute path on the machine that ran the test),
    or, when that is not here but the same path under `source` is (a shard's results/ downloaded
    elsewhere), that one."""
    if not results_dir or Path(results_dir).exists() or "/results/" not in results_dir:
        return results_dir
    moved = source / results_dir.rsplit("/results/", 1)[1]
    return str(moved.resolve()) if moved.exists() else results_dir


def collect(results: Path, guests: list[str] | None = None, shards: Path | None = None) -> Report:
    """Everything under `results` and, with `shards`, under each subfolder of it (a shard's
    results/, as the nightly workflow downloads them); nightly.json is read from `results` only
    (the merged one), a shard's nightly/ JUnit then gives messages and results directories."""
    guests = known_guests() if guests is None else guests
    report = Report()
    if not results.is_dir():
        report.notes.append(f"{results} does not exist: nothing to report")
        return report
    dirs = [results]
    if shards is not None:
        if not shards.is_dir():
            raise ReportError(f"{shards}: --shards names no folder")
        dirs += sorted(p for p in shards.iterdir() if p.is_dir())

    def found(pattern: str) -> list[Path]:
        return [p for d in dirs for p in sorted(d.glob(pattern))]

    def source(path: Path) -> Path:
        return next(d for d in dirs if path.is_relative_to(d))

    def note_input(path: Path) -> None:
        stamp = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        d = source(path)
        shown = path.relative_to(d) if d == results else Path(d.name) / path.relative_to(d)
        report.inputs.append(f"{shown} ({stamp})")

    # pipeline summaries
    for path in found("pipeline-*.json"):
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
            raise ReportError(f"{path}: expected {{pipeline, stages: [...]}}")
        report.pipelines.append(data)
        note_input(path)

    # nightly.json: counts of the nightly's repeats (its JUnit files give messages only)
    nightly = results / "nightly.json"
    nightly_counts = False
    if nightly.is_file():
        data = _read_json(nightly)
        if not isinstance(data, dict):
            raise ReportError(f"{nightly}: expected {{test id: {{passed, failed, skipped, ...}}}}")
        for test, row in data.items():
            try:
                p, f, s = (int(row[k]) for k in ("passed", "failed", "skipped"))
            except (TypeError, KeyError, ValueError):
                raise ReportError(f"{nightly}: {test!r}: expected passed/failed/skipped counts") from None
            base, guest = split_guest(str(test), guests)
            cell = report.cells[(base, _column(report, guest, guest))]
            cell.passed += p
            cell.failed += f
            cell.skipped += s
        nightly_counts = True
        note_input(nightly)
    else:
        report.notes.append("no nightly.json (ci/nightly not run here): no pass rates over repeats")

    # stage JUnit files
    stage_files = [p for p in found("junit-*.xml") if not p.name.startswith("junit-regression-")]
    nightly_files = found("nightly/junit-*.xml")
    if not stage_files and not nightly_files:
        report.notes.append("no JUnit XML of a test stage (junit-*.xml, nightly/junit-*.xml)")
    for path in [*stage_files, *nightly_files]:
        variant = _stage_variant(path)
        counted = not (nightly_counts and path.parent.name == "nightly")
        for test, outcome, message, rdir in _read_junit(path):
            base, guest = split_guest(test, guests)
            col = f"{guest} ({variant})" if variant else guest
            _add(report, base, _column(report, col, col), outcome, message, _locate(rdir, source(path)),
                 count=counted)
        note_input(path)

    # regression switches
    tags = sorted((m.group(1) for p in found("regressions-*.json")
                   if (m := re.fullmatch(r"regressions-(.+)\.json", p.name))), key=len, reverse=True)
    tables: dict[str, dict[str, Any]] = {}
    for path in found("regressions*.json"):
        data = _read_json(path)
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise ReportError(f"{path}: expected {{switch: [failed test ids]}}")
        tag = path.stem.removeprefix("regressions").removeprefix("-")
        tables.setdefault(tag, {}).update(data)  # shards run different switches
        note_input(path)
    if not tables:
        report.notes.append("no regressions.json (ci/regressions not run here)")
    with_junit: set[str] = set()
    for path in found("junit-regression-*.xml"):
        name = path.stem.removeprefix("junit-regression-")
        tag = next((t for t in tags if name.endswith(f"-{t}")), "")
        switch = name.removesuffix(f"-{tag}") if tag else name
        col = _regression_column(report, switch, tag)
        with_junit.add(col)
        for test, outcome, message, rdir in _read_junit(path):
            base, _guest = split_guest(test, guests)
            _add(report, base, col, outcome, message, _locate(rdir, source(path)))
        note_input(path)
    for tag, table in tables.items():
        for switch, failed in table.items():
            col = _regression_column(report, str(switch), tag)
            if col in with_junit:
                continue  # the JUnit file has every outcome; the table only the failures
            for test in failed:
                base, _guest = split_guest(str(test), guests)
                _add(report, base, col, "failed", "", "")
    for column in report.columns.values():
        if column.regression:
            caught = sum(1 for (_r, c), cell in report.cells.items() if c == column.key and cell.failed)
            column.note = f"caught by {caught} test(s)" if caught else "NOT CAUGHT"
        elif column.key == "none" or column.key.startswith("none ("):
            column.note = "regression run without a switch"

    # benchmarks
    benches = found("bench-*.json")
    if not benches:
        report.notes.append("no bench-*.json (ci/bench not run here)")
    for path in benches:
        data = _read_json(path)
        if not isinstance(data, dict):
            raise ReportError(f"{path}: expected a JSON object")
        report.benches.append((path.name, data))
        note_input(path)
    return report


def _regression_column(report: Report, switch: str, tag: str) -> str:
    key = f"{switch} ({tag})" if tag else switch
    title = "no switch" if switch == "none" else switch
    if key not in report.columns:
        report.columns[key] = Column(key, f"{title} ({tag})" if tag else title, regression=switch != "none")
    return key


# --- rendering -------------------------------------------------------------------------------
CSS = """
body{font:13px/1.35 sans-serif;margin:1em;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:1.5em}
table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:2px 5px;vertical-align:top}
th{background:#f2f2f2;position:sticky;top:0}th.reg{background:#efe9f7}
td.test{font-family:monospace;white-space:nowrap}
td.cell{min-width:5em;text-align:center}
.pass{background:#d8f0d8}.fail{background:#f6c9c9}.skip{background:#ececec;color:#666}
.flaky{background:#f8e4a8}.caught{background:#cfe3f8}.notcaught{background:#fff;color:#999}
.none{background:#fff}
.rate{font-size:11px;color:#444}
details summary{cursor:pointer}pre{white-space:pre-wrap;max-width:60em;text-align:left;font-size:11px}
.note{color:#855}.legend span{padding:1px 6px;margin-right:4px;border:1px solid #ccc}
figure{display:inline-block;margin:0 2em 1em 0;vertical-align:top}
"""


def _label(col: Column, cell: Cell) -> tuple[str, str]:
    """(CSS class, text) of a cell."""
    state = cell.state
    if col.regression:
        return {"fail": ("caught", "caught"), "flaky": ("flaky", "flaky"),
                "pass": ("notcaught", "not caught"), "skip": ("skip", "skip")}[state]
    return state, state


def _cell_html(col: Column, cell: Cell | None, out: Path) -> str:
    if cell is None:
        return '<td class="cell none"></td>'
    cls, text = _label(col, cell)
    parts = [f'<span class="label">{esc(text)}</span>']
    rate = cell.pass_rate
    if cell.runs > 1:
        shown = "-" if rate is None else f"{100 * rate:.0f}%"
        parts.append(f'<div class="rate">{esc(shown)} of {cell.passed + cell.failed}'
                     f" ({cell.passed}/{cell.failed}/{cell.skipped})</div>")
    title = ""
    if cell.messages:
        lines = "\n".join(cell.messages[0].splitlines()[:MESSAGE_LINES])
        title = f' title="{esc(lines[:500])}"'
        more = f"\n(+ {len(cell.messages) - 1} other message(s))" if len(cell.messages) > 1 else ""
        parts.append(f"<details><summary>message</summary><pre>{esc(lines + more)}</pre></details>")
    for rdir in cell.results_dirs[:3]:
        try:
            href = os.path.relpath(rdir, out.parent.resolve()) if os.path.isabs(rdir) else rdir
        except ValueError:
            href = rdir
        parts.append(f'<a class="dir" href="{esc(Path(href).as_posix())}/">results</a>')
    return f'<td class="cell {cls}" data-state="{esc(cls)}"{title}>{"".join(parts)}</td>'


NUMERIC_SKIP = {"wall_s", "exit", "size_mib", "mib_per_pass", "duration_s"}


def bench_figures(data: dict[str, Any]) -> list[tuple[str, float]]:
    """Headline numbers: top-level numbers and one level of nested numbers ("parent.key")."""
    out: list[tuple[str, float]] = []
    for key, value in data.items():
        if key in NUMERIC_SKIP or key == "targets":
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            out.append((str(key), float(value)))
        elif isinstance(value, dict):
            out += [(f"{key}.{k}", float(v)) for k, v in value.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)]
    return out


def _unit(name: str) -> str:
    if "ratio" in name or "speedup" in name or "_vs_" in name:
        return "ratio"
    for suffix, unit in (("_mb_s", "MB/s"), ("_ms", "ms"), ("_s", "s"), ("_mb", "MB")):
        if name.endswith(suffix):
            return unit
    return "value"


def bar_chart(figures: list[tuple[str, float]]) -> str:
    """A horizontal bar per figure, scaled within its unit; name and value as text."""
    row_h, label_w, bar_w = 16, 260, 220
    height = row_h * len(figures) + 4
    by_unit: dict[str, float] = defaultdict(float)
    for name, value in figures:
        by_unit[_unit(name)] = max(by_unit[_unit(name)], abs(value))
    rows = []
    for i, (name, value) in enumerate(figures):
        top = i * row_h + 2
        scale = by_unit[_unit(name)] or 1.0
        width = max(1.0, bar_w * abs(value) / scale)
        rows.append(f'<text x="0" y="{top + 12}" font-size="11">{esc(name)}</text>'
                    f'<rect x="{label_w}" y="{top + 2}" width="{width:.1f}" height="{row_h - 4}"'
                    ' fill="#6a9fd8"/>'
                    f'<text x="{label_w + width + 4:.1f}" y="{top + 12}" font-size="11">'
                    f"{esc(f'{value:g}')} {esc(_unit(name))}</text>")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 90}" height="{height}" '
            f'role="img">{"".join(rows)}</svg>')


def render(report: Report, out: Path) -> str:
    rows = sorted({r for r, _c in report.cells})
    def is_regression(c: Column) -> bool:
        return c.regression or c.key == "none" or c.key.startswith("none (")

    guest_cols = sorted((c for c in report.columns.values() if not is_regression(c)),
                        key=lambda c: (c.key == NO_GUEST, c.key))
    other_cols = sorted((c for c in report.columns.values() if is_regression(c)), key=lambda c: c.key)
    cols = guest_cols + other_cols
    states: dict[str, int] = defaultdict(int)
    for (_r, c), cell in report.cells.items():
        if not report.columns[c].regression:
            states[cell.state] += 1
    h = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
         "<title>phd CI report</title>", f"<style>{CSS}</style></head><body>",
         "<h1>phd CI report</h1>",
         f"<p>written {esc(dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC'))}; "
         + (", ".join(f"{n} {esc(s)}" for s, n in sorted(states.items())) or "no")
         + " test x guest cells</p>"]
    for p in report.pipelines:
        stages = ", ".join(f"{esc(s.get('name'))}: {esc(s.get('status'))}" for s in p["stages"])
        h.append(f"<p>{esc(p.get('pipeline', '?'))}: {'pass' if p.get('ok') else 'FAIL'} ({stages})</p>")
    if report.notes:
        h.append('<ul class="notes">' + "".join(f'<li class="note">{esc(n)}</li>' for n in report.notes)
                 + "</ul>")
    h.append('<p class="legend"><span class="pass">pass</span><span class="fail">fail</span>'
             '<span class="skip">skip</span><span class="flaky">flaky (passed and failed over repeats)</span>'
             '<span class="caught">caught: failed under a regression switch (it detects the bug)</span>'
             '<span class="notcaught">not caught: passed under the switch</span>'
             " Pass rate shown when a test ran more than once: rate of passed/(passed+failed) "
             "(passed/failed/skipped).</p>")
    h.append("<h2>Tests</h2>")
    if rows:
        head = "".join(
            f'<th class="{"reg" if c.regression else "guest"}" data-col="{esc(c.key)}">'
            f'{esc(c.title if c.key != NO_GUEST else "no guest")}'
            + (f'<br><span class="rate">{esc(c.note)}</span>' if c.note else "") + "</th>" for c in cols)
        h.append(f'<table id="matrix"><thead><tr><th>test</th>{head}</tr></thead><tbody>')
        for row in rows:
            cells = "".join(_cell_html(c, report.cells.get((row, c.key)), out) for c in cols)
            h.append(f'<tr data-test="{esc(row)}"><td class="test">{esc(row)}</td>{cells}</tr>')
        h.append("</tbody></table>")
    else:
        h.append("<p>no test results found</p>")
    h.append("<h2>Benchmarks</h2>")
    for name, data in report.benches:
        figures = bench_figures(data)
        h.append(f'<figure class="bench" data-file="{esc(name)}"><figcaption>{esc(name)}</figcaption>')
        h.append(bar_chart(figures) if figures else "<p>no numeric figures</p>")
        h.append("</figure>")
    h.append("<h2>Inputs</h2><ul>" + "".join(f"<li>{esc(i)}</li>" for i in report.inputs) + "</ul>")
    h.append("</body></html>\n")
    return "\n".join(h)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ci.report", description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--out", type=Path, default=None, help="default: RESULTS/report.html")
    parser.add_argument("--shards", type=Path, default=None,
                        help="also read every subfolder of this folder as a shard's results/ "
                             "(the nightly workflow's shards/)")
    args = parser.parse_args(argv)
    out: Path = args.out or args.results / "report.html"
    try:
        report = collect(args.results, shards=args.shards)
    except ReportError as exc:
        print(f"ci.report: ERROR: {exc}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(report, out))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
