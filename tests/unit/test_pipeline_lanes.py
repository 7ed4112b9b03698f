"""ci/pipeline.py's lanes: stages of a lane in order, lanes side by side, every stage's own result,
and an interrupt that stops every lane and waits for its children. Real child processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ci.pipeline import ROOT, Lanes, Stage, print_summary


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def wait_for(path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.05)


def test_lanes_run_side_by_side_and_each_lane_in_order(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # a1 can only end after b1 has started: it passes only if the two lanes overlap
    a_started, b_started = tmp_path / "a1", tmp_path / "b1"
    waits_for_b = f"""
        import pathlib, time
        pathlib.Path({str(a_started)!r}).touch()
        deadline = time.monotonic() + 30
        while not pathlib.Path({str(b_started)!r}).exists():
            assert time.monotonic() < deadline, "lane b never started beside lane a"
            time.sleep(0.05)
        print("a1 saw b1")
    """
    stages = [
        Stage("a1", py(waits_for_b)),
        Stage("b1", py(f"import pathlib; pathlib.Path({str(b_started)!r}).touch(); print('b1 out')"),
              lane="b"),
        Stage("a2", py("raise SystemExit(3)")),  # a failure does not stop its lane
        Stage("b2", py("print('b2 out')"), lane="b"),
        Stage("a3", py("print('a3 ran')")),
    ]
    results = Lanes(stages, log_dir=tmp_path / "logs").run()
    assert [(r.name, r.status, r.rc) for r in results] == [
        ("a1", "pass", 0), ("b1", "pass", 0), ("a2", "FAIL", 3), ("b2", "pass", 0), ("a3", "pass", 0)]
    # lane b did not stream: its output is in its logs and printed whole after the lanes ended
    assert (tmp_path / "logs" / "b1.log").read_text() == "b1 out\n"
    out = capsys.readouterr().out
    assert out.index("===== output of b1") > out.index("===== a3:")
    assert "b2 out" in out


def test_sigterm_interrupts_every_lane_and_waits_for_the_children(tmp_path: Path) -> None:
    """SIGTERM reaches the pipeline only: each running stage gets its on_sigterm (SIGINT here),
    is waited for while it cleans up, and no lane starts another stage."""
    child = f"""
        import pathlib, signal, sys, time
        name = sys.argv[1]
        def cleanup(signum, frame):
            time.sleep(0.5)  # a teardown that takes a moment
            pathlib.Path({str(tmp_path)!r}, name + ".cleaned").touch()
            raise SystemExit(130)
        signal.signal(signal.SIGINT, cleanup)
        pathlib.Path({str(tmp_path)!r}, name + ".started").touch()
        time.sleep(60)
    """
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(child))
    driver = f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from ci.pipeline import Lanes, Stage
        stages = [Stage("a1", [sys.executable, {str(script)!r}, "a1"]),
                  Stage("a2", [sys.executable, "-c", "open({str(tmp_path / 'a2.ran')!r}, 'w')"]),
                  Stage("b1", [sys.executable, {str(script)!r}, "b1"], lane="b")]
        results = Lanes(stages, log_dir=Path({str(tmp_path)!r}) / "logs").run()
        print(json.dumps([[r.name, r.status] for r in results]))
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(driver)], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)  # our own group: the SIGTERM reaches only it
    try:
        wait_for(tmp_path / "a1.started")
        wait_for(tmp_path / "b1.started")
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = out.strip().splitlines()[-1]
    assert json.loads(last) == [["a1", "interrupted"], ["a2", "not run"], ["b1", "interrupted"]]
    assert (tmp_path / "a1.cleaned").exists() and (tmp_path / "b1.cleaned").exists()
    assert not (tmp_path / "a2.ran").exists()


def test_a_stage_whose_program_is_missing_fails_and_its_lane_goes_on(tmp_path: Path) -> None:
    stages = [Stage("missing", [str(tmp_path / "no-such-program")]), Stage("next", py("print('next')"))]
    results = Lanes(stages, log_dir=tmp_path / "logs").run()
    assert [(r.name, r.status) for r in results] == [("missing", "FAIL"), ("next", "pass")]


def test_the_summary_says_why_a_stage_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A failed stage's reasons file and its JUnit failures are repeated under the summary (the
    end of a CI log is often all a reader sees); a passing stage's leftovers are not, and a
    reasons file from an earlier run is gone before the stage starts."""
    reasons, junit = tmp_path / "problems.txt", tmp_path / "junit.xml"
    stale = tmp_path / "stale.txt"
    stale.write_text("from the last run\n")
    junit_text = ('<testsuites><testsuite><testcase classname="tests.x" name="test_a">'
                  '<failure message="AssertionError: the disk rolled back&#10;more"/></testcase>'
                  '<testcase classname="tests.x" name="test_b"/></testsuite></testsuites>')
    writes_both = f"""
        import pathlib
        pathlib.Path({str(reasons)!r}).write_text("no-replay: not caught by any test\\n\\n")
        pathlib.Path({str(junit)!r}).write_text({junit_text!r})
        raise SystemExit(1)
    """
    stages = [Stage("regress", py(writes_both), junit=junit, reasons=reasons),
              Stage("quiet", py("raise SystemExit(2)"), reasons=stale),
              Stage("fine", py("print('ok')"), reasons=tmp_path / "never.txt")]
    results = Lanes(stages, log_dir=tmp_path / "logs").run()
    assert [r.why for r in results] == [
        ["no-replay: not caught by any test",
         "tests.x::test_a: failed: AssertionError: the disk rolled back"],
        [], []]
    assert not stale.exists()
    print_summary("t", results, 1.0)
    out = capsys.readouterr().out
    tail = out[out.index("===== t summary"):]
    assert "why regress failed:\n  no-replay: not caught by any test\n  tests.x::test_a: failed:" in tail
    assert "why quiet" not in tail and "why fine" not in tail
