"""ci/report.py: reading a results directory and rendering the HTML matrix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ci.report import ReportError, collect, main, render, split_guest

GUESTS = ["tiny", "debian", "alpine"]
HOSTILE = "boom <script>document.title='pwned'</script> \"quoted\" & 'single'"


def _junit(cases: str) -> str:
    return ('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">'
            f"{cases}</testsuite></testsuites>")


def _case(name: str, body: str = "", results_dir: str = "") -> str:
    props = (f'<properties><property name="phd_results" value="{results_dir}" /></properties>'
             if results_dir else "")
    return f'<testcase classname="tests.suite.test_smoke" name="{name}" time="1.0">{props}{body}</testcase>'


def make_results(root: Path) -> Path:
    """A small results/ of every kind: pass, fail (hostile message), skip, flaky, regressions, bench."""
    root.mkdir(parents=True, exist_ok=True)
    kept = root / "kept" / "test_fails_tiny"
    kept.mkdir(parents=True)
    (kept / "vm.serial.log").write_text("console\n")
    message = HOSTILE.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
    (root / "junit-suite.xml").write_text(_junit(
        _case("test_passes[tiny]") + _case("test_passes[debian]")
        + _case("test_fails[tiny]", f'<failure message="{message}">trace line 1\ntrace line 2</failure>',
                str(kept.resolve()))
        + _case("test_skips[alpine]", '<skipped message="alpine cannot be downloaded here" />')
        + _case("test_param[debian-plain]") + _case("test_param[tiny-plain]")))
    (root / "nightly.json").write_text(json.dumps({
        "tests/suite/test_smoke.py::test_flaky[tiny]": {"passed": 2, "failed": 1, "skipped": 0, "runs": 3,
                                                        "pass_rate": 0.667},
        "tests/suite/test_smoke.py::test_passes[alpine]": {"passed": 3, "failed": 0, "skipped": 0, "runs": 3,
                                                           "pass_rate": 1.0}}))
    (root / "regressions.json").write_text(json.dumps({
        "no-replay": ["tests/suite/test_smoke.py::test_catches[tiny]"], "blocking-start": []}))
    (root / "junit-regression-no-replay.xml").write_text(_junit(
        _case("test_catches[tiny]", '<failure message="the backlog was not replayed">x</failure>')
        + _case("test_passes[tiny]")))
    (root / "bench-storage.json").write_text(json.dumps({
        "seq_read_ratio": 0.14, "seq_write_ratio": 0.08, "wall_s": 12.0,
        "real_downstairs_ratios": {"seq_read": 0.21}, "targets": {"x": {"min": 1}}, "method": {"tool": "x"}}))
    return root


def cell_of(page: str, test: str, column: str) -> str:
    """The class attribute of the cell of row `test` in column `column` (by header order)."""
    heads = re.findall(r'<th class="[a-z]+" data-col="([^"]*)"', page)
    row = re.search(rf'<tr data-test="{re.escape(test)}">(.*?)</tr>', page, flags=re.DOTALL)
    assert row, test
    cells = re.findall(r'<td class="cell ([a-z]+)', row.group(1))
    return cells[heads.index(column)]


@pytest.mark.parametrize(("node_id", "expected"), [
    ("t.py::test_x[tiny]", ("t.py::test_x", "tiny")),
    ("t.py::test_x[debian-plain]", ("t.py::test_x[plain]", "debian")),
    ("t.py::test_x[plain-debian]", ("t.py::test_x[plain]", "debian")),
    ("t.py::test_x[a-tiny-b]", ("t.py::test_x[a-b]", "tiny")),
    ("t.py::test_x[tinyish]", ("t.py::test_x[tinyish]", "-")),
    ("t.py::test_x", ("t.py::test_x", "-")),
    ("t.py::test_x[encrypted]", ("t.py::test_x[encrypted]", "-")),
])
def test_the_guest_is_a_whole_part_of_the_parameter_id(node_id: str, expected: tuple[str, str]) -> None:
    assert split_guest(node_id, GUESTS) == expected


def test_cells_by_guest_and_switch(tmp_path: Path) -> None:
    results = make_results(tmp_path / "results")
    out = results / "report.html"
    page = render(collect(results, GUESTS), out)
    t = "tests/suite/test_smoke.py::"
    assert cell_of(page, t + "test_passes", "tiny") == "pass"
    assert cell_of(page, t + "test_passes", "debian") == "pass"
    assert cell_of(page, t + "test_passes", "alpine") == "pass"  # from nightly.json
    assert cell_of(page, t + "test_fails", "tiny") == "fail"
    assert cell_of(page, t + "test_fails", "debian") == "none"  # not run there
    assert cell_of(page, t + "test_skips", "alpine") == "skip"
    assert cell_of(page, t + "test_flaky", "tiny") == "flaky"
    assert cell_of(page, t + "test_param[plain]", "debian") == "pass"
    assert cell_of(page, t + "test_catches", "no-replay") == "caught"
    assert cell_of(page, t + "test_passes", "no-replay") == "notcaught"
    assert "67% of 3 (2/1/0)" in page  # the flaky test's pass rate over its repeats
    assert "NOT CAUGHT" in page  # blocking-start: caught by no test
    assert 'href="kept/test_fails_tiny/"' in page  # relative to the page


def test_hostile_strings_are_escaped(tmp_path: Path) -> None:
    results = make_results(tmp_path / "results")
    (results / "nightly.json").write_text(json.dumps({
        "t.py::test_<img src=x onerror=alert(1)>[tiny]": {"passed": 1, "failed": 0, "skipped": 0}}))
    page = render(collect(results, GUESTS), results / "report.html")
    assert "<script>" not in page
    assert "<img" not in page
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt; &quot;quoted&quot;" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page


def test_missing_inputs_are_noted_not_fatal(tmp_path: Path) -> None:
    page = render(collect(tmp_path, GUESTS), tmp_path / "report.html")
    for note in ("no nightly.json", "no JUnit XML", "no regressions.json", "no bench-*.json"):
        assert note in page
    assert "no test results found" in page
    page = render(collect(tmp_path / "absent", GUESTS), tmp_path / "report.html")
    assert "does not exist" in page


@pytest.mark.parametrize("name", ["nightly.json", "regressions.json", "bench-x.json", "pipeline-test.json"])
def test_malformed_json_names_the_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("{not json")
    with pytest.raises(ReportError, match=re.escape(str(tmp_path / name))):
        collect(tmp_path, GUESTS)


def test_malformed_junit_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junit-suite.xml").write_text("<testsuites><testcase")
    assert main(["--results", str(tmp_path)]) == 2
    assert str(tmp_path / "junit-suite.xml") in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def test_nightly_junit_gives_messages_not_counts_next_to_nightly_json(tmp_path: Path) -> None:
    (tmp_path / "nightly").mkdir()
    (tmp_path / "nightly.json").write_text(json.dumps({
        "tests/suite/test_smoke.py::test_x[tiny]": {"passed": 1, "failed": 1, "skipped": 0}}))
    (tmp_path / "nightly" / "junit-suite-1.xml").write_text(
        _junit(_case("test_x[tiny]", '<failure message="first failure">t</failure>')))
    report = collect(tmp_path, GUESTS)
    cell = report.cells[("tests/suite/test_smoke.py::test_x", "tiny")]
    assert (cell.passed, cell.failed, cell.state) == (1, 1, "flaky")
    assert cell.messages[0].startswith("first failure")


def test_a_real_downstairs_stage_gets_its_own_column(tmp_path: Path) -> None:
    (tmp_path / "junit-suite.xml").write_text(_junit(_case("test_x[tiny]")))
    (tmp_path / "junit-suite-real.xml").write_text(
        _junit(_case("test_x[tiny]", '<failure message="m">t</failure>')))
    (tmp_path / "regressions-real.json").write_text(json.dumps({"no-replay": []}))
    (tmp_path / "junit-regression-no-replay-real.xml").write_text(_junit(_case("test_x[tiny]")))
    report = collect(tmp_path, GUESTS)
    assert report.cells[("tests/suite/test_smoke.py::test_x", "tiny")].state == "pass"
    assert report.cells[("tests/suite/test_smoke.py::test_x", "tiny (real)")].state == "fail"
    assert report.columns["no-replay (real)"].regression
    assert report.columns["no-replay (real)"].note == "NOT CAUGHT"


def test_bench_figures_are_charted_with_their_numbers(tmp_path: Path) -> None:
    results = make_results(tmp_path)
    page = render(collect(results, GUESTS), results / "report.html")
    chart = page.split('data-file="bench-storage.json"')[1]
    assert "<svg" in chart
    assert "seq_read_ratio" in chart and "0.14 ratio" in chart
    assert "real_downstairs_ratios.seq_read" in chart
    assert "wall_s" not in chart.split("</figure>")[0]


def test_command_line_writes_the_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = make_results(tmp_path / "results")
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["--results", str(results), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert 'href="../results/kept/test_fails_tiny/"' in out.read_text()


def test_shards_give_messages_regressions_and_moved_results_dirs(tmp_path: Path) -> None:
    """The nightly merge job: the merged nightly.json in results/, each shard's results/ under
    shards/<name>/, its phd_results paths naming the shard machine's checkout."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "nightly.json").write_text(json.dumps({
        "tests/suite/test_smoke.py::test_x[tiny]": {"passed": 2, "failed": 1, "skipped": 0}}))
    shard = tmp_path / "shards" / "nightly-shard-2"
    kept = shard / "regression-runs" / "no-replay" / "abc" / "test_x"
    kept.mkdir(parents=True)
    (shard / "nightly").mkdir()
    (shard / "nightly" / "junit-suite-1.xml").write_text(_junit(_case(
        "test_x[tiny]", '<failure message="shard failure">t</failure>', "/__w/phd/phd/results/elsewhere")))
    (shard / "regressions.json").write_text(json.dumps({"no-replay": ["tests/suite/test_smoke.py::test_x"]}))
    (shard / "junit-regression-no-replay.xml").write_text(_junit(_case(
        "test_x[tiny]", '<failure message="caught it">t</failure>',
        "/__w/phd/phd/results/regression-runs/no-replay/abc/test_x")))
    out = results / "report.html"
    assert main(["--results", str(results), "--shards", str(tmp_path / "shards"), "--out", str(out)]) == 0
    page = out.read_text()
    t = "tests/suite/test_smoke.py::test_x"
    assert cell_of(page, t, "tiny") == "flaky"  # counts from nightly.json only
    assert "shard failure" in page
    assert cell_of(page, t, "no-replay") == "caught"
    assert 'href="../shards/nightly-shard-2/regression-runs/no-replay/abc/test_x/"' in page
    assert "nightly-shard-2/junit-regression-no-replay.xml" in page
    assert main(["--results", str(results), "--shards", str(tmp_path / "absent")]) == 2
