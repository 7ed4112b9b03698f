"""ManagedProcess with real short-lived children (`python -c` stand-ins): a start that fails
at once when the process exits, the ready check, one life, TERM -> KILL, the context manager
and the ledger entries. The ledger is a private one."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from phd.core import reaper
from phd.core.errors import HarnessError, ProcessStartFailure
from phd.core.process import ManagedProcess, ProcessState, ready_when_logged

# A stand-in that ignores SIGTERM; it says so only once the handler is in place.
STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ignoring TERM', flush=True); time.sleep(60)")
SLEEPER = "import time; print('up', flush=True); time.sleep(60)"


@pytest.fixture
def book(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> reaper.Ledger:
    ledger = reaper.Ledger(tmp_path / "ledger")
    monkeypatch.setattr("phd.core.process.ledger", lambda: ledger)
    return ledger


def entries(book: reaper.Ledger) -> dict[str, list[dict[str, object]]]:
    found: dict[str, list[dict[str, object]]] = {"proc": [], "dir": []}
    for path in sorted(book.dir.glob("*-*.json")) if book.dir.exists() else []:
        kind = path.name.split("-", 1)[0]
        if kind in found:
            found[kind].append(json.loads(path.read_text()))
    return found


def python(tmp_path: Path, script: str, **kwargs: object) -> ManagedProcess:
    return ManagedProcess([sys.executable, "-c", script], name="stand-in",
                          log_path=tmp_path / "proc.log", **kwargs)  # type: ignore[arg-type]


@pytest.mark.usefixtures("book")
def test_an_exit_during_start_fails_at_once_with_the_exit_code_and_log(tmp_path: Path) -> None:
    proc = python(tmp_path, "import sys; print('bad flag --frobnicate', flush=True); sys.exit(3)",
                  ready=ready_when_logged("never said"), ready_timeout_s=30.0)
    t0 = time.monotonic()
    with pytest.raises(ProcessStartFailure, match="stand-in exited while starting") as info:
        proc.start()
    assert time.monotonic() - t0 < 10.0, "the exit must end the wait, not the 30 s timeout"
    assert info.value.exit_code == 3
    assert "bad flag --frobnicate" in info.value.log_tail
    assert info.value.argv[:2] == [sys.executable, "-c"]
    assert proc.state is ProcessState.EXITED and not proc.alive()


@pytest.mark.usefixtures("book")
def test_the_start_error_type_places_the_blame(tmp_path: Path) -> None:
    class Mine(ProcessStartFailure, HarnessError):
        pass

    proc = python(tmp_path, "import sys; sys.exit(5)", ready=lambda _p: False, start_error=Mine)
    with pytest.raises(Mine) as info:
        proc.start()
    assert isinstance(info.value, HarnessError) and info.value.exit_code == 5


@pytest.mark.usefixtures("book")
def test_start_waits_for_the_ready_check_then_runs(tmp_path: Path) -> None:
    script = "import time; time.sleep(0.3); print('listening', flush=True); time.sleep(60)"
    with python(tmp_path, script, ready=ready_when_logged("listening")) as proc:
        assert proc.state is ProcessState.RUNNING
        assert "listening" in proc.output()
    assert proc.state is ProcessState.STOPPED and proc.exit_code == -signal.SIGTERM


@pytest.mark.usefixtures("book")
def test_a_process_never_ready_times_out_and_is_stopped(tmp_path: Path) -> None:
    proc = python(tmp_path, SLEEPER, ready=lambda _p: False, ready_timeout_s=0.5)
    with pytest.raises(ProcessStartFailure, match=r"not ready within 0\.5s") as info:
        proc.start()
    assert info.value.exit_code is None  # it was running when the wait gave up
    assert "up" in info.value.log_tail
    assert proc.state is ProcessState.STOPPED and not proc.alive()


@pytest.mark.usefixtures("book")
def test_a_second_start_is_refused(tmp_path: Path) -> None:
    proc = python(tmp_path, SLEEPER).start()
    try:
        with pytest.raises(HarnessError, match="one life"):
            proc.start()
    finally:
        proc.stop()
    with pytest.raises(HarnessError, match="started before"):
        proc.start()


@pytest.mark.usefixtures("book")
def test_a_start_after_a_failed_start_names_the_failure(tmp_path: Path) -> None:
    proc = python(tmp_path, "import sys; sys.exit(7)", ready=lambda _p: False)
    with pytest.raises(ProcessStartFailure):
        proc.start()
    with pytest.raises(HarnessError, match=r"its start failed: .*exit code 7"):
        proc.start()


@pytest.mark.usefixtures("book")
def test_stop_escalates_to_sigkill_for_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    proc = python(tmp_path, STUBBORN, ready=ready_when_logged("ignoring TERM")).start()
    t0 = time.monotonic()
    code = proc.stop(timeout_s=0.5)
    assert code == -signal.SIGKILL and proc.killed
    assert 0.4 < time.monotonic() - t0 < 10.0
    assert proc.stop() == -signal.SIGKILL, "stop is idempotent"


@pytest.mark.usefixtures("book")
def test_kill_is_a_crash_and_stop_after_it_is_harmless(tmp_path: Path) -> None:
    proc = python(tmp_path, SLEEPER, ready=ready_when_logged("up")).start()
    assert proc.kill() == -signal.SIGKILL and not proc.killed
    assert proc.state is ProcessState.STOPPED
    assert proc.stop() == -signal.SIGKILL


@pytest.mark.usefixtures("book")
def test_a_process_that_exits_on_its_own_reads_exited(tmp_path: Path) -> None:
    proc = python(tmp_path, "import sys; sys.exit(0)").start()
    os.waitid(os.P_PID, proc.pid or 0, os.WEXITED | os.WNOWAIT)  # it has exited (not reaped)
    assert proc.state is ProcessState.EXITED
    assert proc.stop() == 0 and proc.state is ProcessState.EXITED


@pytest.mark.usefixtures("book")
def test_the_context_manager_stops_it_even_when_the_body_fails(tmp_path: Path) -> None:
    proc = python(tmp_path, SLEEPER, ready=ready_when_logged("up"))
    seen: list[bool] = []

    def body() -> None:
        with proc:
            seen.append(proc.alive())
            raise ValueError("body")

    with pytest.raises(ValueError, match="body"):
        body()
    assert seen == [True]
    assert not proc.alive() and proc.state is ProcessState.STOPPED


def test_the_ledger_entry_is_written_at_start_and_removed_at_stop(tmp_path: Path,
                                                                  book: reaper.Ledger) -> None:
    owned = tmp_path / "run"
    proc = python(tmp_path, SLEEPER, ready=ready_when_logged("up"), owns_dirs=(owned,)).start()
    found = entries(book)
    assert [e["pid"] for e in found["proc"]] == [proc.pid]
    assert found["proc"][0]["what"] == "stand-in"
    assert [e["path"] for e in found["dir"]] == [str(owned)]
    proc.stop()
    assert entries(book) == {"proc": [], "dir": []}


def test_a_failed_start_leaves_no_ledger_entry(tmp_path: Path, book: reaper.Ledger) -> None:
    proc = python(tmp_path, "import sys; sys.exit(1)", ready=lambda _p: False)
    with pytest.raises(ProcessStartFailure):
        proc.start()
    assert entries(book) == {"proc": [], "dir": []}


@pytest.mark.usefixtures("book")
def test_it_runs_in_a_session_of_its_own_and_signals_reach_its_group(tmp_path: Path) -> None:
    # A wrapper whose child prints its pid: stopping the wrapper's group takes the child too.
    child = "import os, time; print('child', os.getpid(), flush=True); time.sleep(60)"
    script = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); "
              "time.sleep(60)")
    with python(tmp_path, script, ready=ready_when_logged("child")) as proc:
        assert proc.pid is not None and os.getsid(proc.pid) == proc.pid
        child_pid = int(proc.output().split()[1])
        assert os.getpgid(child_pid) == proc.pid
    deadline = time.monotonic() + 10
    while reaper.start_time(child_pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # poll interval of a deadline-bounded wait for the orphan's exit
    assert reaper.start_time(child_pid) is None, "the wrapper's child outlived its group's SIGTERM"


def test_a_shell_string_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="list of arguments"):
        ManagedProcess("sleep 1", name="x", log_path=None)  # type: ignore[arg-type]


@pytest.mark.usefixtures("book")
def test_without_a_log_the_tail_says_so(tmp_path: Path) -> None:
    proc = ManagedProcess([sys.executable, "-c", "import sys; sys.exit(2)"], name="quiet",
                          log_path=None, ready=lambda _p: False)
    with pytest.raises(ProcessStartFailure, match="no log") as info:
        proc.start()
    assert info.value.exit_code == 2
