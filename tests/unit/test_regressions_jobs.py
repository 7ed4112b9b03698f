"""ci/regressions --jobs: sessions side by side, never more than asked, each one's report and
output kept apart, results in the planned order. The children are real processes (small
Python programs standing in for pytest sessions: they write a JUnit report and print); the
real sessions run in ci/test's regressions stage."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from ci.regressions import Planned, main, run_concurrently

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
