"""The nightly job: every guest, every test, the regression matrix, and the suite repeated to
find flaky tests.

Usage: ci/nightly [--repeat N] [--shard i/N] [--stages a,b] [extra pytest args]

Stages (all run, whatever fails; summary and exit status as in ci/test):
  ruff, mypy        as in ci/test (on shard 1 only: they are not pytest items)
  mutation          ci/mutation (shard 1 only): mutmut over the request queue, the VCR rules and
                    the state driver against their unit tests -> results/mutation.json; fails
                    when a module scores below 0.95
  tests             tests/ minus tests/suite, every guest of the manifest
  suite-1..N        the whole suite (nightly tests included) on every guest, --repeat times
                    (default 3): the runs give each test a pass rate
  suite-firmware    the whole suite on tiny booted through firmware (--phd-boot firmware; the
                    PR run boots tiny directly, debian through firmware)
  suite-real        every Crucible test (-m crucible) on three real crucible-downstairs, when
                    PHD_DOWNSTAIRS_BINARY names the binary (ci/test's suite-real leaves out the
                    tests marked real_nightly)
  regressions       ci/regressions over the whole suite on the default guest
Every guest key of the manifest (`kind = { guest_os = ... }`) is passed, available here or
not: a guest that cannot be had (alpine offline) makes its tests SKIP with the reason, so the
report says what was not covered and why.

--shard i/N (1-based) lets N machines share the night: the pytest stages get
`--phd-shard i/N` (each item runs on exactly one machine), the regression matrix is split by
switch (`ci/regressions --shard i/N`), ruff, mypy and mutation run on shard 1.

Writes results/nightly.json ({test id: {passed, failed, skipped, runs, pass_rate}}; pass_rate =
passed / (passed + failed), null when the test never ran, errors count as failed), JUnit XML
per stage under results/nightly/, allure results under results/allure (the repeats show as
retries there), results/pipeline-nightly.json, prints the pass-rate table, and ends with the
HTML report (ci/report.py -> results/report.html; a "report" row of the summary).
"""

from __future__ import annotations

import json
import signal
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline import (
    ALLURE,
    PYTEST,
    REAL_DOWNSTAIRS,
    RESULTS,
    ROOT,
    SUITE_PYTEST,
    Case,
    Stage,
    fresh_allure_dir,
    junit_cases,
    print_summary,
    regression_problems,
    report_stage,
    run_pipeline,
    run_stage,
    select_stages,
    split_own_args,
)

from phd.artifacts.manifest import load_manifest
from phd.artifacts.store import ArtifactStore
from phd.plugin import parse_shard

NIGHTLY = RESULTS / "nightly"
MANIFEST = ROOT / "artifacts" / "artifacts.toml"
NIGHTLY_FUZZ_EXAMPLES = "200"  # tests/integration/server/test_fuzz.py; a PR run takes 10
# tests/integration/storage/test_fault_runs.py: both flavours, each seed (a PR run: one seed each)
NIGHTLY_FAULT_SEEDS = "1,2,3"


def all_guests() -> list[str]:
    """Every bootable guest of the manifest, in manifest order, with what is cached here."""
    manifest = load_manifest(MANIFEST)
    guests = [key for key, entry in manifest.artifacts.items() if entry.kind.guest_os is not None]
    store = ArtifactStore(MANIFEST, Path.home() / ".cache" / "phd" / "artifacts", ROOT)
    for key in guests:
        print(f"guest {key}: {store.status(key)}")
    return guests


def stages(guests: list[str], repeat: int, shard: str | None, extra: list[str]) -> list[Stage]:
    matrix = ["--phd-guests", ",".join(guests)]
    sharded = ["--phd-shard", shard] if shard else []
    allure = f"--alluredir={ALLURE}"
    narrowed = bool(extra or shard)  # a shard or -k may leave a stage nothing to run
    out: list[Stage] = []
    if not shard or shard.split("/")[0].strip() == "1":
        out += [Stage("ruff", ["ruff", "check", "phd", "sut", "tests", "guests", "ci"]),
                Stage("mypy", ["mypy"]),
                # fails when a module's unit tests kill under 95% of its mutants
                Stage("mutation", [sys.executable, "ci/mutation.py"])]
    junit = NIGHTLY / "junit-tests.xml"
    out.append(Stage("tests", [*PYTEST, "tests", "--ignore=tests/suite", *matrix, "-n", "2", *sharded,
                               f"--junitxml={junit}", allure, *extra], junit=junit, empty_ok=narrowed,
                     env={"PHD_FUZZ_EXAMPLES": NIGHTLY_FUZZ_EXAMPLES,
                          "PHD_FAULT_SEEDS": NIGHTLY_FAULT_SEEDS}))
    for k in range(1, repeat + 1):
        junit = NIGHTLY / f"junit-suite-{k}.xml"
        out.append(Stage(f"suite-{k}", [*SUITE_PYTEST, "tests/suite", *matrix, "-n", "2", *sharded,
                                        f"--junitxml={junit}", allure, *extra],
                         junit=junit, empty_ok=narrowed))
    # The initramfs guests boot directly by default (--phd-boot auto); once a night they boot
    # through firmware (OVMF) too, the way Propolis boots everything. The report gives this
    # run its own column ("firmware", from the file name); in nightly.json it counts as one
    # more run of those tests.
    junit = NIGHTLY / "junit-suite-firmware.xml"
    out.append(Stage("suite-firmware", [*SUITE_PYTEST, "tests/suite", "--phd-guests", "tiny", "--phd-boot",
                                        "firmware", "-n", "2", *sharded, f"--junitxml={junit}", allure,
                                        *extra], junit=junit, empty_ok=narrowed))
    if REAL_DOWNSTAIRS:
        # every Crucible test on three real crucible-downstairs (ci/test's suite-real leaves out
        # those marked real_nightly), on the guests of the PR run
        junit = NIGHTLY / "junit-suite-real.xml"
        out.append(Stage("suite-real", [*SUITE_PYTEST, "tests/suite", "--phd-downstairs-binary",
                                        REAL_DOWNSTAIRS, "-m", "crucible", "-n", "2", *sharded,
                                        f"--junitxml={junit}", allure, *extra],
                         junit=junit, empty_ok=narrowed))
    regress = ["--shard", shard] if shard else []
    out.append(Stage("regressions", [sys.executable, "-m", "ci.regressions", *regress,
                                     "-n", "2", *extra], on_sigterm=signal.SIGTERM,
                     reasons=regression_problems()))
    return out


def pass_rates(junits: list[Path]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0,
                                                            "runs": 0, "pass_rate": None})
    for path in junits:
        if not path.is_file():
            continue  # a stage that crashed: its tests simply have fewer runs
        for case in junit_cases(path):
            row = table[case.id]
            row["runs"] += 1
            row["skipped" if case.outcome == "skipped" else
                "passed" if case.outcome == "passed" else "failed"] += 1
    for row in table.values():
        ran = row["passed"] + row["failed"]
        row["pass_rate"] = round(row["passed"] / ran, 3) if ran else None
    return dict(sorted(table.items()))


def skip_reasons(junits: list[Path]) -> dict[str, str]:
    reasons: dict[str, str] = {}
    for path in junits:
        if path.is_file():
            reasons.update({c.id: c.message for c in junit_cases(path) if c.outcome == "skipped"})
    return reasons


def failures(junits: list[Path]) -> dict[str, list[Case]]:
    out: dict[str, list[Case]] = defaultdict(list)
    for path in junits:
        if path.is_file():
            for c in junit_cases(path):
                if c.outcome in ("failed", "error"):
                    out[c.id].append(c)
    return out


def print_rates(rates: dict[str, dict[str, Any]], junits: list[Path]) -> None:
    """Every test that ran more than once (the suite) or did not always pass; the rest of the
    (single-run, green) tests only as a count."""
    shown = {t: r for t, r in rates.items() if r["runs"] > 1 or r["failed"]}
    width = max([len(t) for t in shown] + [4])
    print(f"\n{'test':<{width}}  runs  pass  fail  skip  pass rate")

    def order(item: tuple[str, dict[str, Any]]) -> tuple[float, str]:
        rate = item[1]["pass_rate"]
        return (2.0 if rate is None else rate, item[0])

    for test, r in sorted(shown.items(), key=order):
        rate = "-" if r["pass_rate"] is None else f"{100 * r['pass_rate']:.0f}%"
        flag = "  FLAKY" if r["pass_rate"] is not None and 0 < r["pass_rate"] < 1 else (
            "  FAILS" if r["pass_rate"] == 0 else "")
        print(f"{test:<{width}}  {r['runs']:>4}  {r['passed']:>4}  {r['failed']:>4}  {r['skipped']:>4}"
              f"  {rate:>9}{flag}")
    rest = len(rates) - len(shown)
    if rest:
        print(f"(+ {rest} tests that ran once and passed or skipped)")
    flaky = [t for t, r in rates.items() if r["pass_rate"] is not None and 0 < r["pass_rate"] < 1]
    failing = [t for t, r in rates.items() if r["pass_rate"] == 0]
    never = [t for t, r in rates.items() if r["pass_rate"] is None]
    print(f"\n{len(rates)} tests: {len(flaky)} flaky, {len(failing)} always failing, "
          f"{len(never)} never ran (skipped)")
    fails = failures(junits)
    for test in flaky + failing:
        messages = sorted({c.message[:200] for c in fails.get(test, [])})
        for m in messages:
            print(f"  {test}: {m}")
    reasons = skip_reasons(junits)
    by_reason: dict[str, int] = defaultdict(int)
    for test in never:
        by_reason[reasons.get(test, "?")[:500]] += 1
    for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1]):
        print(f"  {n} test(s) never ran: {reason}")


def main(argv: list[str]) -> int:
    own, extra = split_own_args(argv, ["--repeat", "--shard", "--stages"])
    try:
        repeat = int(own.get("--repeat", "3"))
    except ValueError:
        raise SystemExit(f"--repeat must be a whole number, got {own['--repeat']!r}") from None
    if repeat < 1:
        raise SystemExit(f"--repeat must be >= 1, got {repeat}")
    shard = own.get("--shard")
    if shard:
        try:
            parse_shard(shard)  # the plugin's own rule and message, before hours are spent
        except Exception as exc:  # noqa: BLE001 - pytest.UsageError, shown as a usage error
            raise SystemExit(str(exc)) from None
    guests = all_guests()
    plan = select_stages(stages(guests, repeat, shard, extra), own.get("--stages"))
    NIGHTLY.mkdir(parents=True, exist_ok=True)
    fresh_allure_dir()
    results, wall = run_pipeline("ci/nightly", plan, RESULTS / "pipeline-nightly.json", summary=False)

    junits = [s.junit for s in plan if s.junit is not None]  # tests and suite-1..N
    rates = pass_rates(junits)
    (RESULTS / "nightly.json").write_text(json.dumps(rates, indent=2) + "\n")
    print_rates(rates, junits)
    print(f"wrote {(RESULTS / 'nightly.json').relative_to(ROOT)}")
    results.append(run_stage(report_stage()))  # results/report.html, with nightly.json
    print_summary("ci/nightly", results, wall)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
