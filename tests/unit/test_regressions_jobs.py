"""ci/regressions --jobs: sessions side by side, never more than asked, each one's report and
output kept apart, results in the planned order. The children are real processes (small
Python programs standing in for pytest sessions: they write a JUnit report and print); the
real sessions run in ci/test's regressions stage."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from ci import regressions
from ci.pipeline import SUITE_PYTEST, Case, junit_cases
from ci.regressions import Planned, main, run_concurrently
from sut.regressions import BLOCKING_START, NO_REPLAY, VCR_DENIED_WHILE_STARTING

CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    name, junit, marks, partner = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    running = marks / f"{name}.running"
    running.touch()
    others = sorted(p.stem for p in marks.glob("*.running") if p.stem != name)
    (marks / f"{name}.saw").write_text(",".join(others))
    if partner != "-":
        # wait (bounded) until the partner runs too: proves the two overlap without a sleep
        deadline = time.monotonic() + 20
        while not (marks / f"{partner}.running").exists() and not (marks / f"{partner}.saw").exists():
            if time.monotonic() > deadline:
                print(f"{name}: {partner} never ran beside me")
                sys.exit(3)
            time.sleep(0.01)
    print(f"output of {name}")
    failed = '<failure message="caught it">trace</failure>' if name != "quiet" else ""
    junit.write_text(f'<testsuite><testcase classname="tests.suite.test_x" name="test_{name}">'
                     f'{failed}</testcase></testsuite>')
    running.unlink()
    sys.exit(1 if failed else 0)
    """
)


def planned(tmp_path: Path, name: str, partner: str = "-") -> Planned:
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    junit = tmp_path / f"junit-{name}.xml"
    # argv[3:] is what the runner prints as the session's arguments
    return Planned(name, [sys.executable, str(script), name, str(junit), str(marks), partner], junit)


def test_two_at_a_time_in_planned_order_with_separate_reports_and_logs(tmp_path: Path) -> None:
    plan = [planned(tmp_path, "first", "second"), planned(tmp_path, "second", "first"),
            planned(tmp_path, "third"), planned(tmp_path, "quiet")]
    runs = run_concurrently(plan, 2, tmp_path / "logs")
    assert [r.switch for r in runs] == ["first", "second", "third", "quiet"]
    assert [r.rc for r in runs] == [1, 1, 1, 0]
    assert [[c.id.rsplit("::", 1)[-1] for c in r.failed] for r in runs] == [
        ["test_first"], ["test_second"], ["test_third"], []]
    marks = tmp_path / "marks"
    # the first two ran side by side; no session ever saw two others running (jobs = 2)
    assert "second" in (marks / "first.saw").read_text() or "first" in (marks / "second.saw").read_text()
    for name in ("first", "second", "third", "quiet"):
        assert len([n for n in (marks / f"{name}.saw").read_text().split(",") if n]) <= 1
        assert (tmp_path / "logs" / f"{name}.log").read_text() == f"output of {name}\n"


def test_one_job_at_a_time_never_overlaps(tmp_path: Path) -> None:
    plan = [planned(tmp_path, n) for n in ("a", "b", "c")]
    runs = run_concurrently(plan, 1, tmp_path / "logs")
    assert [r.switch for r in runs] == ["a", "b", "c"]
    for name in ("a", "b", "c"):
        assert (tmp_path / "marks" / f"{name}.saw").read_text() == ""


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--jobs", "0"], "--jobs takes a whole number from 1 to 8; got '0'"),
        (["--jobs", "9"], "--jobs takes a whole number from 1 to 8; got '9'"),
        (["--jobs", "2,3"], "--jobs takes a whole number from 1 to 8; got '2,3'"),
        (["--jobs", "99999999999999999999999"], "--jobs takes a whole number from 1 to 8"),
        (["--jobs", "2", "-n", "2"], "give it or pytest's -n, not both"),
        (["--jobs=2", "--numprocesses=2"], "give it or pytest's -n, not both"),
    ],
)
def test_bad_jobs_are_refused_with_the_reason(args: list[str], complaint: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--catchers", *args])
    assert complaint in str(exc.value)


# --- a switch's catching tests as sessions of their own ------------------------------------

def _junit(path: Path, cases: dict[str, str]) -> None:
    """A JUnit report of `cases` (test name -> "failed"/"passed") in tests.suite.test_x."""
    body = "".join(f'<testcase classname="tests.suite.test_x" name="{name}" time="2.5">'
                   + ('<failure message="caught it">trace</failure>' if outcome == "failed" else "")
                   + "</testcase>" for name, outcome in cases.items())
    path.write_text(f"<testsuites><testsuite>{body}</testsuite></testsuites>")


def test_catchers_split_a_switch_into_one_session_per_catching_test(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(regressions, "RESULTS", tmp_path)
    several = regressions.plan(BLOCKING_START, ["-m", "not nightly"], catchers=True, tag="real")
    assert sorted(p.argv[len(SUITE_PYTEST)] for p in several) == regressions.catching_tests(BLOCKING_START)
    assert len({p.name for p in several}) == len(several)  # each its own log
    assert len({p.junit for p in several}) == len(several)  # and its own report
    for p in several:
        assert p.entry == BLOCKING_START and p.name.startswith(f"{BLOCKING_START}--test_")
        assert p.row_junit == tmp_path / f"junit-regression-{BLOCKING_START}-real.xml"
        assert not p.junit.name.startswith("junit-")  # ci/report reads junit-*.xml as stages
        assert f"--phd-regression={BLOCKING_START}" in p.argv and "not nightly" in p.argv
    # one results directory for the row: each session writes under its own session id
    assert len({a for p in several for a in p.argv if a.startswith("--phd-tmp-dir=")}) == 1
    [one] = regressions.plan(NO_REPLAY, [], catchers=True)
    assert one.part == "" and one.row_junit is None
    assert one.junit == tmp_path / f"junit-regression-{NO_REPLAY}.xml"
    [suite] = regressions.plan(None, [], catchers=False)
    assert suite.name == "none" and "tests/suite" in suite.argv


def test_sessions_are_ordered_by_how_long_their_tests_took_last_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(regressions, "RESULTS", tmp_path)
    [vcr, firmware] = sorted(regressions.catching_tests(VCR_DENIED_WHILE_STARTING))
    last = tmp_path / f"junit-regression-{VCR_DENIED_WHILE_STARTING}.xml"
    test_name = vcr.rpartition("::")[2]
    fw_name = firmware.rpartition("::")[2]
    last.write_text(
        '<testsuites><testsuite>'
        f'<testcase classname="tests.suite.test_crucible" name="{test_name}[plain]" time="10"/>'
        f'<testcase classname="tests.suite.test_crucible" name="{test_name}[encrypted]" time="8"/>'
        f'<testcase classname="tests.suite.test_firmware" name="{fw_name}[tiny]" time="3"/>'
        '</testsuite></testsuites>')
    planned = regressions.plan(VCR_DENIED_WHILE_STARTING, [], catchers=True)
    assert {p.argv[len(SUITE_PYTEST)]: p.expected_s for p in planned} == {vcr: 18.0, firmware: 3.0}
    assert not last.exists()  # read, then cleared: a crashed run is never last time's report


def test_a_split_rows_reports_merge_into_its_junit_file_and_row(tmp_path: Path) -> None:
    row_junit = tmp_path / "junit-regression-blocking-start.xml"
    parts = []
    for name, outcome in (("a", "failed"), ("b", "passed")):
        p = Planned(BLOCKING_START, ["python", "-m", "pytest"], tmp_path / f"{name}.xml", part=name,
                    row_junit=row_junit)
        _junit(p.junit, {f"test_{name}": outcome})
        parts.append((p, regressions.finished(p, 1 if outcome == "failed" else 0, 10.0)))
    [row] = regressions.rows([p for p, _r in parts], [r for _p, r in parts], [BLOCKING_START])
    assert (row.switch, row.rc, row.duration_s, row.broken) == (BLOCKING_START, 1, 20.0, False)
    assert [c.id.rsplit("::", 1)[1] for c in row.failed] == ["test_a"]
    # the file ci/report and the next run's ordering read has both sessions' cases
    assert [c.id.rsplit("::", 1)[1] for c in junit_cases(row_junit)] == ["test_a", "test_b"]


@pytest.mark.parametrize(("rc", "report", "broken"), [
    (5, False, False),  # -k left that session nothing to run: the row stands on the others
    (1, False, True),  # it ended without a report
    (3, True, True),  # internal error after some tests
])
def test_a_split_row_is_broken_when_one_of_its_sessions_is(
        tmp_path: Path, rc: int, report: bool, broken: bool) -> None:
    good = Planned(BLOCKING_START, ["x"], tmp_path / "good.xml", part="good")
    _junit(good.junit, {"test_good": "failed"})
    other = Planned(BLOCKING_START, ["x"], tmp_path / "other.xml", part="other")
    if report:
        _junit(other.junit, {"test_other": "failed"})
    row = regressions.merged([(good, regressions.finished(good, 1, 1.0)),
                              (other, regressions.finished(other, rc, 1.0))], tmp_path / "row.xml")
    assert row.broken is broken
    assert row.rc == (rc if broken else 1)


# --- a catcher that failed for another reason is run once more ------------------------------

def _row(outcome: str, message: str) -> regressions.Run:
    [test] = regressions.catching_tests(NO_REPLAY)
    case = Case(test, outcome, message.splitlines()[0] if message else "", 1.0, message)
    return regressions.Run(NO_REPLAY, [case], 0 if outcome == "passed" else 1, 1.0)


CAUGHT = "AssertionError: its backlog was not replayed after LastFlush"
OTHER = "WaitTimeout: the guest did not log in within 60 s"


@pytest.mark.parametrize(("tries", "rc", "said"), [
    # another reason, then caught as the table says: proven, and the run says it retried
    ([OTHER, CAUGHT], 0, ["RETRIED (first try): no-replay: tests/suite/"]),
    # another reason twice: not proven
    ([OTHER, OTHER], 1, ["RETRIED (first try)", "FAIL: no-replay: tests/suite/"]),
    # the catcher PASSED against the bug: that is the finding, no second chance
    (["", CAUGHT], 1, ["FAIL: no-replay: not caught by any test"]),
    # caught at once: one try
    ([CAUGHT], 0, []),
])
def test_a_catcher_that_failed_for_another_reason_gets_one_more_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tries: list[str], rc: int, said: list[str]) -> None:
    monkeypatch.setattr(regressions, "RESULTS", tmp_path)
    calls: list[list[str]] = []

    def execute(entries: list[str], extra: list[str], **kw: object) -> list[regressions.Run]:
        message = tries[len(calls)]
        calls.append(entries)
        return [_row("failed" if message else "passed", message)]

    monkeypatch.setattr(regressions, "execute", execute)
    (tmp_path / "regression-runs" / NO_REPLAY).mkdir(parents=True)
    assert main(["--catchers", "--switches", NO_REPLAY]) == rc
    out = capsys.readouterr().out
    for text in said:
        assert text in out
    expected_calls = 2 if tries[0] == OTHER else 1
    assert calls == [[NO_REPLAY]] * expected_calls
    # the first try's results stay beside the retry's
    assert (tmp_path / "regression-runs" / f"{NO_REPLAY}.first-try").is_dir() == (expected_calls == 2)
    problems = tmp_path / "regressions-problems.txt"
    assert problems.exists() == (rc == 1)
