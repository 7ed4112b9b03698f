"""Run the PHD suite once per regression switch and once with none; tabulate the failures.

Usage: ci/regressions [--catchers] [--switches none,NAME,...|storage] [--tag T] [--shard i/N]
                      [--jobs N] [extra pytest args, e.g. -n 2]
   or: python -m ci.regressions ... (from the repository root: it imports tests.meta)

Writes results/regressions.json ({switch: [node ids of failed tests]} plus "none"),
results/junit-regression-<switch>.xml and the failed tests' results directories under
results/regression-runs/<switch>/ (unless --phd-tmp-dir is given), and prints a table with the
first line of each failed test's failure message, so it shows that the failure names the broken
behaviour.

Exit status 1 when the run without a switch has failures, when a switch is caught by no test
(the suite stays green against a known bug, so it proves nothing about it), when a test that
tests/meta/test_regressions_caught.py expects to catch a switch ran but did not fail with the
text it names, or when a run produced no report; 0 otherwise. With --catchers a row whose
catcher failed for another reason, or whose session broke, is run once more first (see main).

--switches runs only the named entries ("none" is the run without a switch): with a -k that
selects a switch's catching test it checks one row of the table in minutes.

--catchers (what ci/test runs on every change) runs, per switch, only the tests that must catch
it (EXPECTED_FAILURES) instead of the whole suite, and no "none" run (the suite stage is that
run). It still proves every switch caught, each by the test and the failure text the table
names; what only the full matrix (ci/nightly) proves is that no OTHER test starts failing under a
switch for another reason, and which further tests catch it.

--switches storage names every storage-side switch (those the downstairs kind could matter
to). --tag T names this run's outputs junit-regression-<switch>-T.xml, regressions-T.json and
regression-runs/T/<switch>/, so a second matrix (say on the real crucible-downstairs, with
--phd-downstairs-binary among the pytest args) does not overwrite the first.

--jobs N runs N sessions side by side (each without xdist; not with -n), each one's output
in results/regression-runs/logs/<session>.log and printed whole when it ends, longest first
(by the last run's reports). With --catchers a switch with several catching tests runs one
session per test (<session> is <switch>--<module>.<test>; their reports are merged into the
switch's one JUnit file and its row of the table, whose time is their sessions' sum): the
catchers are mostly waiting (on guests, timeouts, containers), so more sessions than cores
shorten the stage, and small sessions let them finish together. ci/test runs --jobs 4.

--shard i/N runs every N-th entry of [none, switch, ...] (1-based i), so N machines share the
matrix. Sharding by switch, not by test, keeps "caught" decidable on each machine: a switch's
whole suite runs in one place.

The switches are sut.regressions' table; what each must make fail is the meta test's
EXPECTED_FAILURES (keyed by the same names), so both checks prove the same thing.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from ci.pipeline import (
    NO_TESTS,
    RESULTS,
    ROOT,
    SUITE_PYTEST,
    Case,
    junit_cases,
    let_clean_up,
    regression_problems,
    run_child,
    split_own_args,
)
from phd.plugin import parse_shard
from sut.regressions import ALL_REGRESSIONS, STORAGE_REGRESSIONS
from tests.meta.test_regressions_caught import EXPECTED_FAILURES, is_case_of


@dataclass
class Run:
    switch: str  # "none" for the run without a switch
    cases: list[Case]
    rc: int
    duration_s: float
    # one of the sessions a row was split into is broken (see merged()), the others not
    incomplete: bool = False

    @property
    def failed(self) -> list[Case]:
        return [c for c in self.cases if c.outcome in ("failed", "error")]

    @property
    def broken(self) -> bool:
        """pytest did not get as far as a report, or stopped on an internal/usage error."""
        return not self.cases or self.rc in (2, 3, 4) or self.incomplete


def catching_tests(switch: str) -> list[str]:
    """The node ids (files and test names, every parametrization) that must catch ``switch``."""
    return sorted(EXPECTED_FAILURES[switch])


@dataclass
class Planned:
    """One pytest session of the matrix: its switch (None: no switch), argv and report file;
    ``part`` names the catching test it runs when its switch's tests are split into sessions."""

    switch: str | None
    argv: list[str]
    junit: Path
    part: str = ""
    expected_s: float = 0.0  # how long it should take (only orders the sessions)
    row_junit: Path | None = None  # a part's row's report, which merged() writes

    @property
    def entry(self) -> str:
        """The row of the table this session reports to."""
        return self.switch or "none"

    @property
    def name(self) -> str:
        """Unique in a matrix run: names its log."""
        return f"{self.entry}--{self.part}" if self.part else self.entry


# The environment of every child: sharding is by switch here (see the docstring), so a test
# shard from the environment would make "not caught" mean "not in this shard". Bytecode may
# be written (PYTHONDONTWRITEBYTECODE, set on CI machines, is cleared): pytest keeps the
# assertion-rewritten modules of phd and the suite only in a .pyc, so without it every one of
# the matrix's many short sessions rewrote and compiled them again (about 1.5 s of CPU each,
# on a machine whose two cores run the other sessions' guests). __pycache__ is git-ignored.
CHILD_ENV = {"PHD_SHARD": "", "PHD_REGRESSION": "", "PYTHONDONTWRITEBYTECODE": ""}


def part_name(test_id: str) -> str:
    """``tests/suite/test_x.py::test_y`` -> ``test_x.test_y``: names a session of one test."""
    module, _, name = test_id.rpartition("::")
    return f"{Path(module).stem}.{name}"


def plan(switch: str | None, extra: list[str], *, catchers: bool = False, tag: str = "") -> list[Planned]:
    """The sessions of one row of the table: the whole suite, or with --catchers each test that
    must catch ``switch`` in a session of its own (one session when it is one test). Clears
    the row's last report and kept results first."""
    name = switch or "none"
    suffix = f"-{tag}" if tag else ""
    junit = RESULTS / f"junit-regression-{name}{suffix}.xml"
    last = _last_cases(junit)  # read before it goes: it says how long each session takes
    junit.unlink(missing_ok=True)  # a crashed run must not be read as last time's report
    tail = [f"--phd-regression={switch}"] if switch else []
    if not any(a.startswith("--phd-tmp-dir") for a in extra) and not os.environ.get("PHD_TMP_DIR"):
        # The failures a switch causes are expected, and every failed test keeps its results
        # directory: under results/ (replaced by the next matrix run) they stay at hand as
        # evidence instead of piling up in $TMPDIR/phd run after run. The sessions of one row
        # share it: each writes under its own session id.
        kept = RESULTS / "regression-runs" / (f"{tag}/{name}" if tag else name)
        shutil.rmtree(kept, ignore_errors=True)
        tail.insert(0, f"--phd-tmp-dir={kept}")
    if not (catchers and switch):
        return [Planned(switch, [*SUITE_PYTEST, "tests/suite", "-q", f"--junitxml={junit}", *extra, *tail],
                        junit,
                        expected_s=_expected(last, None, fallback=1000.0))]
    tests = catching_tests(switch)
    if len(tests) == 1:
        return [Planned(switch, [*SUITE_PYTEST, *tests, "-q", f"--junitxml={junit}", *extra, *tail], junit,
                        expected_s=_expected(last, tests, fallback=1.0))]
    parts_dir = RESULTS / "regression-runs" / (f"{tag}-parts" if tag else "parts")
    planned = []
    for test in tests:
        part = part_name(test)
        part_junit = parts_dir / f"{name}--{part}.xml"
        part_junit.unlink(missing_ok=True)
        planned.append(Planned(switch, [*SUITE_PYTEST, test, "-q", f"--junitxml={part_junit}", *extra, *tail],
                               part_junit, part=part, expected_s=_expected(last, [test], fallback=1.0),
                               row_junit=junit))
    parts_dir.mkdir(parents=True, exist_ok=True)
    return planned


def _last_cases(junit: Path) -> list[Case] | None:
    try:
        return junit_cases(junit)
    except (OSError, ET.ParseError):
        return None


def _expected(last: list[Case] | None, tests: list[str] | None, *, fallback: float) -> float:
    """How long a session took last time (its tests' times in the row's last report), else
    ``fallback`` (a whole suite: long; a catching test: short); only orders the sessions."""
    if last is None:
        return fallback
    return sum(c.time_s for c in last if tests is None or any(is_case_of(c.id, t) for t in tests))


def finished(p: Planned, rc: int, duration_s: float) -> Run:
    cases = junit_cases(p.junit) if p.junit.is_file() else []
    return Run(p.entry, cases, rc, round(duration_s, 1))


def merged(parts: list[tuple[Planned, Run]], junit: Path) -> Run:
    """One row of the table from the sessions it was split into, their reports merged into
    the row's JUnit file (one <testsuite> per session). The row is broken when one of its
    sessions is (a session that -k left nothing to run, exit 5, is not); its exit status is
    that session's, else the highest of those that ran tests; its time is the sessions' sum."""
    root = ET.Element("testsuites")
    for p, _run in parts:
        try:
            top = ET.parse(p.junit).getroot()
        except (OSError, ET.ParseError):
            continue  # that session wrote no report: its Run has no cases and says so
        root.extend(list(top) if top.tag == "testsuites" else [top])
    ET.ElementTree(root).write(junit, encoding="utf-8", xml_declaration=True)
    runs = [r for _p, r in parts]
    broken = [r for r in runs if r.rc in (2, 3, 4) or (not r.cases and r.rc != NO_TESTS)]
    ran = [r.rc for r in runs if r.rc != NO_TESTS]
    rc = broken[0].rc if broken else max(ran, default=NO_TESTS)
    return Run(runs[0].switch, [c for r in runs for c in r.cases], rc,
               round(sum(r.duration_s for r in runs), 1), incomplete=bool(broken))


def rows(planned: list[Planned], runs: list[Run], entries: list[str]) -> list[Run]:
    """The table's rows, in ``entries``' order: a row's sessions merged when it had several."""
    out = []
    for entry in entries:
        parts = [(p, r) for p, r in zip(planned, runs, strict=True) if p.entry == entry]
        row_junit = parts[0][0].row_junit
        out.append(parts[0][1] if row_junit is None else merged(parts, row_junit))
    return out


def run(p: Planned) -> Run:
    print(f"== {p.name}: {' '.join(p.argv[3:])}", flush=True)
    t0 = time.monotonic()
    rc = run_child(p.argv, env=CHILD_ENV)
    return finished(p, rc, time.monotonic() - t0)


def run_concurrently(planned: list[Planned], jobs: int, log_dir: Path) -> list[Run]:
    """Run the sessions ``jobs`` at a time, each with its output in ``log_dir/<name>.log``,
    printed whole when it ends (so the output of two sessions never interleaves).

    Why: a catchers session is one or two tests. Under ``-n 2`` one worker idles while the
    other finishes the last test, and both start up for a minute's work; two sessions of one
    process each keep both cores busy instead. Ctrl-C reaches every child (one process group)
    and each tears its VMs and containers down; SIGTERM is passed on to them as SIGINT. Either
    way every child is waited for before this returns or raises.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = list(planned)
    running: dict[int, tuple[Planned, subprocess.Popen[bytes], float, Path]] = {}
    done: dict[str, Run] = {}
    # One waiter thread per child reports its end here: os.wait() would also reap children
    # that are not ours (say, of the process that imported this module).
    ended: queue.Queue[int] = queue.Queue()

    def on_term(signum: int, frame: object) -> None:
        for _p, proc, _t0, _log in running.values():
            proc.send_signal(signal.SIGINT)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                p = pending.pop(0)
                log = log_dir / f"{p.name}.log"
                print(f"== {p.name}: started ({' '.join(p.argv[3:])}); output in {log}", flush=True)
                with log.open("wb") as out:
                    proc = subprocess.Popen(  # noqa: S603 - argv list built by plan()
                        p.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                        stderr=subprocess.STDOUT, env={**os.environ, **CHILD_ENV})
                running[proc.pid] = (p, proc, time.monotonic(), log)
                threading.Thread(target=lambda pr=proc: (pr.wait(), ended.put(pr.pid)), daemon=True,
                                 name=f"wait-{p.name}").start()
            p, proc, t0, log = running.pop(ended.get())  # blocks until one of them ends
            assert proc.returncode is not None
            done[p.name] = finished(p, proc.returncode, time.monotonic() - t0)
            print(f"\n== {p.name}: exit {proc.returncode} after {done[p.name].duration_s:.0f} s\n"
                  f"{log.read_text(errors='replace')}", flush=True)
    except KeyboardInterrupt:
        let_clean_up(proc for _p, proc, _t0, _log in running.values())
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return [done[p.name] for p in planned]


def unexpected(r: Run) -> list[str]:
    """The meta test's expectations (switch -> test -> text its failure must contain), checked
    for the tests this run ran (a -k may leave some out), so the matrix proves what it proves."""
    out = []
    for test, text in EXPECTED_FAILURES.get(r.switch, {}).items():
        # every parametrized case of the test (test[plain], test[encrypted]) must catch it
        for case in (c for c in r.cases if is_case_of(c.id, test)):
            if case.outcome == "skipped":
                continue
            if case.outcome != "failed":
                out.append(f"{r.switch}: {case.id} {case.outcome}, expected it to fail with {text!r}")
            elif text not in case.full_message:
                out.append(f"{r.switch}: {case.id} failed for another reason than {text!r}: "
                           f"{case.message[:200]}")
    return out


def shard_entries(entries: list[str], shard: str | None) -> list[str]:
    """Entry i, i+N, ... of the list for shard i/N (the plugin's own i/N rule and parser)."""
    if not shard:
        return entries
    try:
        index, count = parse_shard(shard)
    except pytest.UsageError as exc:
        raise SystemExit(f"--shard: {exc}") from None
    return entries[index - 1::count]


def print_table(runs: list[Run]) -> None:
    width = max(len(r.switch) for r in runs)
    print(f"\n{'regression':<{width}}  {'time':>6}  tests that failed: first line of the failure message")
    for r in runs:
        passed = sum(c.outcome == "passed" for c in r.cases)
        skipped = sum(c.outcome == "skipped" for c in r.cases)
        head = f"{r.switch:<{width}}  {r.duration_s:>5.0f}s  "
        tally = f"({passed} passed, {len(r.failed)} failed, {skipped} skipped)"
        if r.broken:
            print(f"{head}NO REPORT: pytest exited {r.rc} {tally}")
        elif not r.failed:
            print(f"{head}- {tally}" + ("" if r.switch == "none" else "  <- NOT CAUGHT"))
        else:
            print(f"{head}{tally}")
        for case in r.failed:
            kind = "" if case.outcome == "failed" else "[error] "
            print(f"{'':<{width}}          {case.id}")
            print(f"{'':<{width}}            {kind}{case.message[:200] or '<no message>'}")


def selected_entries(switches: str | None, *, catchers: bool = False) -> list[str]:
    """[none, every switch of the table] ([every switch] with --catchers), or the ones
    --switches names (in that order)."""
    everything = ["none", *sorted(ALL_REGRESSIONS)]
    if switches is None:
        return everything[1:] if catchers else everything
    if switches == "storage":
        return sorted(STORAGE_REGRESSIONS)
    names = [n.strip() for n in switches.split(",") if n.strip()]
    unknown = [n for n in names if n not in everything]
    if unknown or not names:
        raise SystemExit(f"--switches takes names from: {', '.join(everything)}; got {switches!r}")
    return [e for e in everything if e in names]


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    catchers = "--catchers" in argv
    argv = [a for a in argv if a != "--catchers"]
    own, extra = split_own_args(argv, ["--shard", "--switches", "--tag", "--jobs"])
    tag = own.get("--tag", "")
    if tag and not tag.replace("-", "").isalnum():
        raise SystemExit(f"--tag takes letters, digits and '-' (it names files); got {tag!r}")
    jobs_text = own.get("--jobs", "1")
    if not jobs_text.isdigit() or not 1 <= int(jobs_text) <= 8:
        raise SystemExit(f"--jobs takes a whole number from 1 to 8; got {jobs_text!r}")
    jobs = int(jobs_text)
    if jobs > 1 and any(a == "-n" or a.startswith(("-n=", "--numprocesses")) for a in extra):
        raise SystemExit("--jobs runs whole sessions side by side: give it or pytest's -n, not both")
    entries = shard_entries(selected_entries(own.get("--switches"), catchers=catchers), own.get("--shard"))
    RESULTS.mkdir(exist_ok=True)
    logs = RESULTS / "regression-runs" / (f"{tag}-logs" if tag else "logs")
    runs = execute(entries, extra, catchers=catchers, tag=tag, jobs=jobs, logs=logs)
    retried: list[str] = []
    if catchers:
        # A catcher that failed for another reason (or a session that broke) under a loaded
        # machine proves nothing either way: its row is run once more, and the row counts as
        # proven only if that run fails exactly as the table says. The first try's results
        # stay beside it (<row>.first-try) and the run says it was retried. A catcher that
        # PASSED is not retried: the suite was green against the bug, which is the finding.
        again = [r.switch for r in runs if r.switch != "none" and retryable(r)]
        if again:
            retried = [p for r in runs if r.switch in again for p in row_problems(r)]
            print("\n== retrying " + ", ".join(again) + ": the first try found\n"
                  + "".join(f"   {p}\n" for p in retried), flush=True)
            for switch in again:
                kept = RESULTS / "regression-runs" / (f"{tag}/{switch}" if tag else switch)
                first = kept.with_name(f"{kept.name}.first-try")
                shutil.rmtree(first, ignore_errors=True)
                if kept.exists():
                    kept.rename(first)
            second = {r.switch: r for r in execute(again, extra, catchers=True, tag=tag, jobs=jobs,
                                                    logs=logs / "retry")}
            runs = [second.get(r.switch, r) for r in runs]

    table = {r.switch: sorted(c.id for c in r.failed) for r in runs}
    out = RESULTS / (f"regressions-{tag}.json" if tag else "regressions.json")
    out.write_text(json.dumps(table, indent=2) + "\n")
    print_table(runs)
    print(f"wrote {os.path.relpath(out, ROOT)}")

    problems = [p for r in runs for p in row_problems(r)]
    for p in retried:
        print(f"RETRIED (first try): {p}")
    for p in problems:
        print(f"FAIL: {p}")
    if problems:
        regression_problems(tag, RESULTS).write_text("".join(f"{p}\n" for p in problems))
    else:
        regression_problems(tag, RESULTS).unlink(missing_ok=True)
    return 1 if problems else 0


def execute(entries: list[str], extra: list[str], *, catchers: bool, tag: str, jobs: int,
            logs: Path) -> list[Run]:
    """The rows of ``entries``, their sessions run ``jobs`` at a time (outputs under ``logs``)."""
    planned = [p for e in entries
               for p in plan(None if e == "none" else e, extra, catchers=catchers, tag=tag)]
    if jobs > 1:
        # longest first, so that the last session to start is a short one (the previous run's
        # reports say how long each took; before one exists, the whole suite is long)
        planned = sorted(planned, key=lambda p: -p.expected_s)
        session_runs = run_concurrently(planned, jobs, logs)
    else:
        session_runs = [run(p) for p in planned]
    return rows(planned, session_runs, entries)


def retryable(r: Run) -> bool:
    """The row failed to prove its switch only because a catcher failed for another reason
    than the table's, or a session broke: no catcher passed against the bug."""
    if r.broken:
        return True
    expected = EXPECTED_FAILURES.get(r.switch, {})
    cases = [c for c in r.cases if c.outcome != "skipped" and any(is_case_of(c.id, t) for t in expected)]
    return bool(r.failed) and bool(unexpected(r)) and all(c.outcome in ("failed", "error") for c in cases)


def row_problems(r: Run) -> list[str]:
    """Why this row fails the run (empty: it proves what it should)."""
    if r.broken:
        return [f"{r.switch}: pytest exited {r.rc} without a usable report"]
    out = []
    if r.switch == "none" and r.failed:
        out.append(f"the suite is not green without a regression: {sorted(c.id for c in r.failed)}")
    elif r.switch != "none" and not r.failed:
        out.append(f"{r.switch}: not caught by any test (the suite passes against this bug)")
    return out + unexpected(r)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
