"""Stages of the CI pipelines (ci/test, ci/nightly) and the JUnit reading they share.

A stage is one command; every stage runs even when an earlier one failed (a failing unit test
must not hide the regression table), and the pipeline fails if any stage did. The summary at
the end gives stage -> pass/fail/duration and, for pytest stages, the outcome counts from the
stage's JUnit XML.

Usage (what ci/test runs): python ci/pipeline.py test [--stages a,b] [extra pytest args]
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from phd.vm.conformance import LOG_ENV

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
ALLURE = RESULTS / "allure"
PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
# The suite uses neither schemathesis nor hypothesis, whose pytest plugins (installed with the
# test extra, loaded by every session) import both: 1.3 of a suite session's 2.2 s of start-up
# CPU, paid by each xdist worker and each of the regression matrix's sessions.
LEAN = ["-p", "no:schemathesis", "-p", "no:hypothesispytest"]
SUITE_PYTEST = [*PYTEST, *LEAN]
NO_TESTS = 5  # pytest's ExitCode.NO_TESTS_COLLECTED (-k/-m/--phd-shard left nothing to run)


# --- JUnit -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str  # a pytest node id where the module is found (tests/x/test_y.py::test_z[tiny])
    outcome: str  # "passed" | "failed" | "error" | "skipped"
    message: str  # first line of the failure/error/skip message ("" when it passed)
    time_s: float
    full_message: str = ""  # the whole message attribute and text of the failure/error/skip


def node_id(classname: str, name: str) -> str:
    """The node id behind a JUnit (xunit2) classname: `tests.suite.test_x.TestY` ->
    `tests/suite/test_x.py::TestY`. The longest dotted prefix that is a .py file under the repo
    is the module; the rest are classes. Falls back to `classname::name`."""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        module = Path(*parts[:cut]).with_suffix(".py")
        if (ROOT / module).is_file():
            return "::".join([module.as_posix(), *parts[cut:], name])
    return f"{classname}::{name}"


def first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def junit_cases(path: Path) -> list[Case]:
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome, message, full = "passed", "", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = "failed" if tag == "failure" else tag
                message = first_line(el.get("message")) or first_line(el.text)
                full = f"{el.get('message') or ''}\n{el.text or ''}"
                break
        cases.append(Case(node_id(tc.get("classname") or "", tc.get("name") or ""), outcome,
                          message, float(tc.get("time") or 0.0), full))
    return cases


def counts(cases: Iterable[Case]) -> dict[str, int]:
    c = Counter(case.outcome for case in cases)
    return {k: c[k] for k in ("passed", "failed", "error", "skipped") if c[k]}


def regression_problems(tag: str = "", results: Path = RESULTS) -> Path:
    """Where ci/regressions writes why it failed, a line per problem (the pipelines' summaries
    repeat them); absent after a run that found none."""
    return results / (f"regressions-{tag}-problems.txt" if tag else "regressions-problems.txt")


# --- stages ------------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    argv: list[str]
    junit: Path | None = None  # the stage's JUnit XML, read for the summary
    # A file the stage writes when it fails, a line per reason (ci/regressions' problems): the
    # summary repeats them, as it repeats a pytest stage's failed tests, so that the end of a
    # CI log (often all a reader sees of it) says why, not only that.
    reasons: Path | None = None
    # pytest's "no tests collected" is fine when a selection (-k, --phd-shard) may leave a
    # stage nothing; otherwise it means the stage ran nothing and fails.
    empty_ok: bool = False
    env: dict[str, str] = field(default_factory=dict)
    on_sigterm: signal.Signals = signal.SIGINT  # see run_child
    # Stages of one lane run in order; lanes run side by side (run_pipeline). The first lane's
    # output streams to the terminal; another lane's stage writes results/logs/<stage>.log,
    # printed whole when the stage ends, so two stages' output never interleaves.
    lane: str = "main"


@dataclass
class StageResult:
    name: str
    status: str  # "pass" | "FAIL" | "interrupted" | "not run"
    duration_s: float
    rc: int | None
    counts: dict[str, int]
    command: str
    why: list[str] = field(default_factory=list)  # see Stage.reasons (empty when it passed)

    @property
    def ok(self) -> bool:
        return self.status == "pass"


def run_child(argv: Sequence[str], env: dict[str, str] | None = None, *,
              on_sigterm: signal.Signals = signal.SIGINT) -> int:
    """Run argv to its end and return its exit code, letting it clean up when interrupted.

    Ctrl-C reaches the child too (same process group): we wait for it to tear its VMs and
    containers down instead of killing it (subprocess.run would SIGKILL it, leaking them), then
    re-raise. SIGTERM (a CI job being cancelled) reaches only us: it is passed on as
    ``on_sigterm`` - SIGINT for pytest (its graceful stop), SIGTERM for a runner like
    ci/regressions that passes it on to its own pytest in turn - then handled the same way.
    """
    proc = subprocess.Popen(list(argv), cwd=ROOT, stdin=subprocess.DEVNULL,  # noqa: S603 - argv list
                            env={**os.environ, **(env or {})})

    def on_term(signum: int, frame: object) -> None:
        proc.send_signal(on_sigterm)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        let_clean_up([proc])
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def let_clean_up(procs: Iterable[subprocess.Popen[bytes]], grace_s: float = 300.0) -> None:
    """After an interrupt: wait for each child to tear its VMs and containers down (up to
    ``grace_s`` each), and terminate only one that takes longer."""
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()


MAX_WHY = 12  # reasons shown per failed stage; the stage's own output has them all


def forget_last_run(stage: Stage) -> None:
    """A crashed stage must not show the last run's counts or reasons."""
    for path in (stage.junit, stage.reasons):
        if path is not None:
            path.unlink(missing_ok=True)


def stage_result(stage: Stage, status: str, duration_s: float, rc: int | None) -> StageResult:
    cases = junit_cases(stage.junit) if stage.junit is not None and stage.junit.is_file() else []
    why: list[str] = []
    if status != "pass":
        if stage.reasons is not None and stage.reasons.is_file():
            why = [line for line in stage.reasons.read_text(errors="replace").splitlines() if line.strip()]
        why += [f"{c.id}: {c.outcome}: {c.message}" for c in cases if c.outcome in ("failed", "error")]
        if len(why) > MAX_WHY:
            why = [*why[:MAX_WHY], f"... and {len(why) - MAX_WHY} more (see the stage's output)"]
    return StageResult(stage.name, status, round(duration_s, 1), rc, counts(cases), shlex.join(stage.argv),
                       why)


def run_stage(stage: Stage) -> StageResult:
    print(f"\n===== {stage.name}: {shlex.join(stage.argv)}", flush=True)
    forget_last_run(stage)
    t0 = time.monotonic()
    rc = run_child(stage.argv, stage.env, on_sigterm=stage.on_sigterm)
    ok = rc == 0 or (rc == NO_TESTS and stage.empty_ok)
    return stage_result(stage, "pass" if ok else "FAIL", time.monotonic() - t0, rc)


def run_pipeline(name: str, stages: Sequence[Stage], out: Path, *,
                 summary: bool = True) -> tuple[list[StageResult], float]:
    """Every stage whatever the earlier ones did: the stages of a lane in order, the lanes side by
    side (see Lanes). Ctrl-C or SIGTERM stops the run: running stages are interrupted and waited
    for (they tear their VMs and containers down), the rest are "not run". Writes ``out`` (JSON),
    prints the summary table unless the caller prints it later itself (after its own report);
    returns the results in the order of ``stages`` and the wall time."""
    t0 = time.monotonic()
    results = Lanes(stages).run()
    wall = round(time.monotonic() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"pipeline": name, "wall_s": wall, "ok": all(r.ok for r in results),
                               "stages": [asdict(r) for r in results]}, indent=2) + "\n")
    if summary:
        print_summary(name, results, wall)
    return results, wall


class Lanes:
    """Runs the stages of each lane in order and the lanes side by side, one thread per lane.

    Why lanes: on two cores the suite keeps both busy with TCG guests, while the regression
    matrix and much of the unit/integration stage wait on wall-clock deadlines with the CPU
    idle. Run one after the other, the waits add up; side by side, one fills the other's idle
    time. A stage is still one command with its own result, duration and JUnit report.

    Signals: only the main thread may handle them, so the lane threads just start and wait for
    children. Ctrl-C reaches every child itself (one process group); SIGTERM reaches only us and
    is passed on as each running stage's ``on_sigterm``. Either way no lane starts another
    stage, every running child is waited for (let_clean_up), and the interrupted stages say so.
    """

    def __init__(self, stages: Sequence[Stage], log_dir: Path = RESULTS / "logs") -> None:
        self.stages = list(stages)
        self.log_dir = log_dir
        self.results: dict[str, StageResult] = {}
        self.running: dict[str, tuple[Stage, subprocess.Popen[bytes], float]] = {}
        self.stopping = threading.Event()
        self.logs: list[tuple[str, Path]] = []  # (stage, log) of the stages that did not stream
        self.lock = threading.Lock()
        lanes: dict[str, list[Stage]] = {}
        for stage in self.stages:
            lanes.setdefault(stage.lane, []).append(stage)
        self.lanes = list(lanes.values())

    def run(self) -> list[StageResult]:
        threads = [threading.Thread(target=self._lane, args=(lane, i == 0), daemon=True,
                                    name=f"lane-{lane[0].lane}") for i, lane in enumerate(self.lanes)]
        previous = signal.signal(signal.SIGTERM, self._on_term)
        try:
            for t in threads:
                t.start()
            try:
                for t in threads:
                    while t.is_alive():
                        t.join(timeout=0.5)  # a bare join() would not let Ctrl-C in
            except KeyboardInterrupt:
                self.stopping.set()
                with self.lock:
                    procs = [proc for _s, proc, _t in self.running.values()]
                print(f"\ninterrupted: waiting for {len(procs)} running stage(s) to clean up", flush=True)
                let_clean_up(procs)
                for t in threads:
                    t.join()
        finally:
            signal.signal(signal.SIGTERM, previous)
        for name, log in self.logs:
            print(f"\n===== output of {name} ({log})\n{log.read_text(errors='replace')}", flush=True)
        return [self.results.get(s.name) or StageResult(s.name, "not run", 0.0, None, {}, shlex.join(s.argv))
                for s in self.stages]

    def _on_term(self, signum: int, frame: object) -> None:
        self.stopping.set()
        with self.lock:
            for stage, proc, _t in self.running.values():
                proc.send_signal(stage.on_sigterm)
        raise KeyboardInterrupt

    def _lane(self, stages: list[Stage], streams: bool) -> None:
        for stage in stages:
            if self.stopping.is_set():
                return
            self.results[stage.name] = self._run(stage, streams)

    def _run(self, stage: Stage, streams: bool) -> StageResult:
        forget_last_run(stage)
        log = None if streams else self.log_dir / f"{stage.name}.log"
        where = "" if log is None else f" (lane {stage.lane}, side by side; output in {log})"
        print(f"\n===== {stage.name}: {shlex.join(stage.argv)}{where}", flush=True)
        t0 = time.monotonic()
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            out = None if log is None else stack.enter_context(log.open("wb"))
            with self.lock:
                if self.stopping.is_set():
                    return StageResult(stage.name, "not run", 0.0, None, {}, shlex.join(stage.argv))
                try:
                    proc = subprocess.Popen(  # noqa: S603 - argv list
                        stage.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                        stderr=None if out is None else subprocess.STDOUT, env={**os.environ, **stage.env})
                except OSError as exc:  # no such program: this stage fails, the lane goes on
                    print(f"\n===== {stage.name}: cannot run {stage.argv[0]!r}: {exc}", flush=True)
                    return StageResult(stage.name, "FAIL", 0.0, None, {}, shlex.join(stage.argv),
                                       [f"cannot run {stage.argv[0]!r}: {exc}"])
                self.running[stage.name] = (stage, proc, t0)
            rc = proc.wait()
            with self.lock:
                del self.running[stage.name]
        duration = time.monotonic() - t0
        if log is not None:
            # One line now (the streaming lane's output goes on around it); the whole log
            # after every lane has ended.
            print(f"\n===== {stage.name} ended: exit {rc} after {_fmt_duration(duration)} (output in {log})",
                  flush=True)
            self.logs.append((stage.name, log))
        if self.stopping.is_set() and rc != 0:
            status = "interrupted"
        else:
            status = "pass" if rc == 0 or (rc == NO_TESTS and stage.empty_ok) else "FAIL"
        return stage_result(stage, status, duration, rc)


def _fmt_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def print_summary(name: str, results: Sequence[StageResult], wall_s: float) -> None:
    width = max([len(r.name) for r in results] + [5])
    print(f"\n===== {name} summary")
    print(f"{'stage':<{width}}  {'result':<11}  {'duration':>8}  tests")
    for r in results:
        shown = ", ".join(f"{n} {k}" for k, n in r.counts.items()) or "-"
        if r.rc not in (0, None) and r.status == "FAIL":
            shown += f" (exit {r.rc})"
        print(f"{r.name:<{width}}  {r.status:<11}  {_fmt_duration(r.duration_s):>8}  {shown}")
    failed = [r.name for r in results if not r.ok]
    print(f"{'total':<{width}}  {'FAIL' if failed else 'pass':<11}  {_fmt_duration(wall_s):>8}"
          + (f"  failed/not run: {', '.join(failed)}" if failed else ""))
    for r in results:
        if r.why:
            print(f"\nwhy {r.name} failed:")
            for line in r.why:
                print(f"  {line[:300]}")


def report_stage() -> Stage:
    """The HTML report of results/ (ci/report.py), run after the pipeline's summary JSON is
    written: a report failure shows in the summary and fails the run, and hides no stage."""
    return Stage("report", [sys.executable, "-m", "ci.report", "--results", str(RESULTS)])


def select_stages(stages: list[Stage], wanted: str | None) -> list[Stage]:
    if not wanted:
        return stages
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = [n for n in names if n not in {s.name for s in stages}]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; stages: {[s.name for s in stages]}")
    return [s for s in stages if s.name in names]


def split_own_args(argv: list[str], own: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Pull `--name VALUE` / `--name=VALUE` for the pipeline's own options out of argv; the rest
    goes to pytest untouched (argparse would try to interpret pytest's options)."""
    found: dict[str, str] = {}
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        flag, eq, value = arg.partition("=")
        if flag in own:
            if not eq:
                value = next(it, "")
                if not value:
                    raise SystemExit(f"{flag} needs a value")
            found[flag] = value
        else:
            rest.append(arg)
    return found, rest


def fresh_allure_dir() -> Path:
    """Allure results of this run only: results of a previous run would show as its history."""
    shutil.rmtree(ALLURE, ignore_errors=True)
    ALLURE.mkdir(parents=True)
    return ALLURE


# --- ci/test -----------------------------------------------------------------------------------
PR_SUITE_GUESTS = "debian,tiny"
PR_SELECTION = "not nightly"
# A real crucible-downstairs for the interop tests and the suite-real stage (empty: skipped).
REAL_DOWNSTAIRS = os.environ.get("PHD_DOWNSTAIRS_BINARY", "")


# The lane beside the main one (Lanes): the unit/integration tests and the regression matrix
# wait on wall-clock deadlines much of the time (the CPU was 40-99 % idle in them), the suite's
# TCG guests keep both cores busy; side by side each fills the other's idle time.
SIDE_LANE = "side"
# Bytecode may be written in the pytest stages (PYTHONDONTWRITEBYTECODE, set on CI machines, is
# cleared): pytest keeps its assertion-rewritten test modules only as .pyc files, so without
# it every session and every xdist worker rewrites and compiles all of tests/ again (ci.regressions
# clears it for its sessions for the same reason). __pycache__ is git-ignored.
WRITE_BYTECODE = {"PYTHONDONTWRITEBYTECODE": ""}
SUITE_REQUESTS = RESULTS / "requests-suite.jsonl"
REGRESSION_JOBS = "6"


def test_stages(extra: list[str]) -> list[Stage]:
    """ci/test: what CI runs on every change. Main lane: ruff, mypy, actionlint, suite,
    suite-real, regressions (streamed); side lane: tests, regressions-real (logs). Measured:
    the suite and suite-real took 11.5 min, the tests stage 12.6 min beside them, so the
    regression matrix (2 min, mostly waiting) goes after suite-real, beside the tests' tail."""
    allure = f"--alluredir={ALLURE}"
    # A -k/-m of the caller's may leave a stage empty; that is not a failure then.
    narrowed = bool(extra) or bool(os.environ.get("PHD_SHARD"))
    return [
        Stage("ruff", ["ruff", "check", "phd", "sut", "tests", "guests", "ci"]),
        Stage("mypy", ["mypy"]),
        # .github/workflows/*.yml; passes with a note where actionlint is not installed (see
        # ci/actionlint.py), fails there too with PHD_REQUIRE_ACTIONLINT=1 (the workflows set it).
        Stage("actionlint", [sys.executable, str(ROOT / "ci" / "actionlint.py")]),
        # Two workers: every port, name and directory derives from the xdist worker id.
        # tests/meta/test_regressions_caught.py re-runs each switch's catching tests (and the
        # seed tests) under it; the regressions stage below runs the whole suite under every
        # switch and checks the same failure texts.
        Stage("tests", [*PYTEST, "tests", "--ignore=tests/suite",
                        "--ignore=tests/meta/test_regressions_caught.py", "-m", PR_SELECTION, "-n", "3",
                        # xdist's load scheduling hands each worker a quarter of its share as
                        # its first chunk (190 tests here), in collection order: one worker got
                        # the first 190 integration tests and ran 13 min while the others had
                        # ended at 7 and 9. At most 16 at a time: they ended within 1.2 min.
                        "--maxschedchunk", "16",
                        f"--junitxml={RESULTS / 'junit-tests.xml'}", allure, *extra],
              junit=RESULTS / "junit-tests.xml", empty_ok=narrowed, lane=SIDE_LANE, env=WRITE_BYTECODE),
        # Every request of the suite's clients is recorded (and checked as it is sent); the
        # conformance stage checks the whole log: what a nested run of six suite tests in the
        # tests stage proved before, now for every request of the suite (that test is nightly).
        Stage("suite", [*SUITE_PYTEST, "tests/suite", "--phd-guests", PR_SUITE_GUESTS, "-m", PR_SELECTION,
                        "-n", "2", f"--junitxml={RESULTS / 'junit-suite.xml'}", allure, *extra],
              junit=RESULTS / "junit-suite.xml", empty_ok=narrowed,
              env={**WRITE_BYTECODE, LOG_ENV: str(SUITE_REQUESTS)}),
        Stage("conformance", [sys.executable, "-m", "ci.conformance", str(SUITE_REQUESTS),
                              *(["--partial"] if narrowed else [])]),
        # The suite's Crucible tests on three REAL crucible-downstairs containers (issue 13), when
        # CI names the binary (.ci/run does when ../shared/crucible/crucible-downstairs exists).
        # Only the tests marked crucible: the others start no downstairs, so a second run of
        # them here would prove nothing the suite stage did not. Those marked real_nightly too
        # run here only in the nightly (ci/nightly's suite-real): 190 of this stage's 420
        # test-seconds for paths (encryption, repair, takeover, migration under writes) that
        # the suite proves per PR on our downstairs and the interop tests on the real one.
        *([Stage("suite-real", [*SUITE_PYTEST, "tests/suite", "--phd-downstairs-binary", REAL_DOWNSTAIRS,
                                "-m", f"crucible and not real_nightly and ({PR_SELECTION})", "-n", "2",
                                f"--junitxml={RESULTS / 'junit-suite-real.xml'}", allure, *extra],
                 junit=RESULTS / "junit-suite-real.xml", empty_ok=narrowed, env=WRITE_BYTECODE)]
          if REAL_DOWNSTAIRS else []),
        # Every switch proven caught by the tests that must catch it, with the failure text the
        # table names (--catchers); the whole suite under every switch is the nightly's
        # (ci/nightly). It writes results/junit-regression-<switch>.xml itself.
        # --jobs 6: six one-process sessions side by side. They are the run's tail and mostly wait
        # (a caught bug often shows as a deadline passing: the longest sessions are 60-70 s of
        # 15-20 s timeouts); measured with 4, the last minute of the run had 20-90 % of the CPU
        # idle.
        Stage("regressions", [sys.executable, "-m", "ci.regressions", "--catchers", "--jobs", REGRESSION_JOBS,
                              "-m", PR_SELECTION, *extra], on_sigterm=signal.SIGTERM,
              reasons=regression_problems()),
        # The storage switches are bugs of the upstairs: caught whichever downstairs run, so
        # proven again on three real crucible-downstairs when CI names the binary.
        *([Stage("regressions-real", [sys.executable, "-m", "ci.regressions", "--catchers", "--switches",
                                      "storage", "--tag", "real", "--phd-downstairs-binary", REAL_DOWNSTAIRS,
                                      "--jobs", REGRESSION_JOBS, "-m", PR_SELECTION, *extra],
                                on_sigterm=signal.SIGTERM, reasons=regression_problems("real"),
                                lane=SIDE_LANE)]
          if REAL_DOWNSTAIRS else []),
    ]


def main_test(argv: list[str]) -> int:
    own, extra = split_own_args(argv, ["--stages"])
    stages = select_stages(test_stages(extra), own.get("--stages"))
    RESULTS.mkdir(exist_ok=True)
    if any(stage.name == "suite" for stage in stages):
        SUITE_REQUESTS.unlink(missing_ok=True)  # the log of this run's suite only (it appends)
    fresh_allure_dir()
    results, wall = run_pipeline("ci/test", stages, RESULTS / "pipeline-test.json", summary=False)
    results.append(run_stage(report_stage()))  # results/report.html
    print_summary("ci/test", results, wall)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    if sys.argv[1:2] != ["test"]:
        raise SystemExit("usage: python ci/pipeline.py test [--stages a,b] [extra pytest args]")
    raise SystemExit(main_test(sys.argv[2:]))
