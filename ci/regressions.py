"""Run the PHD suite once per regression switch and once with none; tabulate the failures.

Usage: ci/regressions [--catchers] [--switches none,NAME,...|storage] [--tag T] [--shard i/N]
                      [extra pytest args, e.g. -n 2]
   or: python -m ci.regressions ... (from the repository root: it imports tests.meta)

Writes results/regressions.json ({switch: [node ids of failed tests]} plus "none"),
results/junit-regression-<switch>.xml and the failed tests' results directories under
results/regression-runs/<switch>/ (unless --phd-tmp-dir is given), and prints a table with the
first line of each failed test's failure message, so it shows that the failure names the broken
behaviour.

Exit status 1 when the run without a switch has failures, when a switch is caught by no test
(the suite stays green against a known bug, so it proves nothing about it), when a test that
tests/meta/test_regressions_caught.py expects to catch a switch ran but did not fail with the
text it names, or when a run produced no report; 0 otherwise.

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

--shard i/N runs every N-th entry of [none, switch, ...] (1-based i), so N machines share the
matrix. Sharding by switch, not by test, keeps "caught" decidable on each machine: a switch's
whole suite runs in one place.

The switches are sut.regressions' table; what each must make fail is the meta test's
EXPECTED_FAILURES (keyed by the same names), so both checks prove the same thing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import pytest

from ci.pipeline import PYTEST, RESULTS, ROOT, Case, junit_cases, run_child, split_own_args
from phd.plugin import parse_shard
from sut.regressions import ALL_REGRESSIONS, STORAGE_REGRESSIONS
from tests.meta.test_regressions_caught import EXPECTED_FAILURES, is_case_of


@dataclass
class Run:
    switch: str  # "none" for the run without a switch
    cases: list[Case]
    rc: int
    duration_s: float

    @property
    def failed(self) -> list[Case]:
        return [c for c in self.cases if c.outcome in ("failed", "error")]

    @property
    def broken(self) -> bool:
        """pytest did not get as far as a report, or stopped on an internal/usage error."""
        return not self.cases or self.rc in (2, 3, 4)


def catching_tests(switch: str) -> list[str]:
    """The node ids (files and test names, every parametrization) that must catch ``switch``."""
    return sorted(EXPECTED_FAILURES[switch])


def run(switch: str | None, extra: list[str], *, catchers: bool = False, tag: str = "") -> Run:
    name = switch or "none"
    suffix = f"-{tag}" if tag else ""
    junit = RESULTS / f"junit-regression-{name}{suffix}.xml"
    junit.unlink(missing_ok=True)  # a crashed run must not be read as last time's report
    targets = catching_tests(switch) if catchers and switch else ["tests/suite"]
    argv = [*PYTEST, *targets, "-q", f"--junitxml={junit}", *extra]
    if not any(a.startswith("--phd-tmp-dir") for a in extra) and not os.environ.get("PHD_TMP_DIR"):
        # The failures a switch causes are expected, and every failed test keeps its results
        # directory: under results/ (replaced by the next matrix run) they stay at hand as
        # evidence instead of piling up in $TMPDIR/phd run after run.
        kept = RESULTS / "regression-runs" / (f"{tag}/{name}" if tag else name)
        shutil.rmtree(kept, ignore_errors=True)
        argv.append(f"--phd-tmp-dir={kept}")
    if switch:
        argv.append(f"--phd-regression={switch}")
    print(f"== {name}: {' '.join(argv[3:])}", flush=True)
    t0 = time.monotonic()
    # Sharding is by switch here (see the docstring); a test shard from the environment would
    # make "not caught" mean "not in this shard".
    rc = run_child(argv, env={"PHD_SHARD": "", "PHD_REGRESSION": ""})
    cases = junit_cases(junit) if junit.is_file() else []
    return Run(name, cases, rc, round(time.monotonic() - t0, 1))


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
    own, extra = split_own_args(argv, ["--shard", "--switches", "--tag"])
    tag = own.get("--tag", "")
    if tag and not tag.replace("-", "").isalnum():
        raise SystemExit(f"--tag takes letters, digits and '-' (it names files); got {tag!r}")
    entries = shard_entries(selected_entries(own.get("--switches"), catchers=catchers), own.get("--shard"))
    RESULTS.mkdir(exist_ok=True)
    runs = [run(None if e == "none" else e, extra, catchers=catchers, tag=tag) for e in entries]

    table = {r.switch: sorted(c.id for c in r.failed) for r in runs}
    out = RESULTS / (f"regressions-{tag}.json" if tag else "regressions.json")
    out.write_text(json.dumps(table, indent=2) + "\n")
    print_table(runs)
    print(f"wrote {out.relative_to(ROOT)}")

    problems = []
    for r in runs:
        if r.broken:
            problems.append(f"{r.switch}: pytest exited {r.rc} without a usable report")
        elif r.switch == "none" and r.failed:
            problems.append(f"the suite is not green without a regression: {table['none']}")
        elif r.switch != "none" and not r.failed:
            problems.append(f"{r.switch}: not caught by any test (the suite passes against this bug)")
        problems += unexpected(r)
    for p in problems:
        print(f"FAIL: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
