"""The ledger and the reaper, with real child processes (no fakes: signals and /proc are the point)."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from phd.core.reaper import Ledger, reap_dead_owners, start_time
from phd.core.wait import wait_until


def spawn(script: str = "sleep 60") -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def gone(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


def dead_owner_ledger(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> Ledger:
    """A ledger whose owner is a process that then dies, like a SIGKILLed pytest run."""
    owner = spawn()
    procs.append(owner)
    book = Ledger(tmp_path / "ledger", owner_pid=owner.pid)
    return book


def kill_owner(procs: list[subprocess.Popen[bytes]]) -> None:
    owner = procs[0]
    owner.kill()
    owner.wait()


def test_children_of_a_dead_owner_are_stopped_and_its_dirs_removed(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    book = dead_owner_ledger(tmp_path, procs)
    # The 2nd ignores SIGTERM - once its shell has set the trap: it says so in a file, and the
    # test waits for that (on a loaded machine the SIGTERM could come before the trap).
    trapped = tmp_path / "trapped"
    children = [spawn(), spawn(f"trap '' TERM; : > {trapped}; while :; do sleep 1; done")]
    wait_until(trapped.exists, lambda ok: ok, what="the child to ignore SIGTERM", timeout_s=30.0)
    paused = spawn()
    paused.send_signal(signal.SIGSTOP)
    procs.extend([*children, paused])
    for i, child in enumerate([*children, paused]):
        book.record_process(child.pid, f"child {i}")
    run_dir = tmp_path / "run"
    (run_dir / "sub").mkdir(parents=True)
    book.record_dir(run_dir)

    assert reap_dead_owners(tmp_path / "ledger", grace_s=1.0) == []  # the owner still lives
    assert not any(gone(c) for c in [*children, paused])

    kill_owner(procs)
    done = reap_dead_owners(tmp_path / "ledger", grace_s=1.0)
    for child in [*children, paused]:
        wait_until(lambda c=child: gone(c), lambda g: g, what=f"pid {child.pid} to exit", timeout_s=5.0)
    assert f"stopped child 0 (pid {children[0].pid})" in done
    assert f"killed child 0 (pid {children[0].pid}): it ignored SIGTERM" not in done
    assert any(line.startswith("killed child 1") for line in done), done
    assert f"stopped child 2 (pid {paused.pid})" in done
    assert not run_dir.exists()
    assert not book.dir.exists()
    assert reap_dead_owners(tmp_path / "ledger") == []  # nothing twice


def test_a_reused_pid_is_never_signalled(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    book = dead_owner_ledger(tmp_path, procs)
    bystander = spawn()
    procs.append(bystander)
    entry = book.record_process(bystander.pid, "recycled")
    record = json.loads(entry.read_text())
    # The entry names the pid with ANOTHER start time: the process it meant is gone and the
    # pid now belongs to someone else.
    record["start"] = int(record["start"]) - 1
    entry.write_text(json.dumps(record))
    kill_owner(procs)
    assert reap_dead_owners(tmp_path / "ledger", grace_s=0.5) == []
    assert bystander.poll() is None


def test_forgotten_entries_are_left_alone(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    book = dead_owner_ledger(tmp_path, procs)
    child = spawn()
    procs.append(child)
    book.forget(book.record_process(child.pid, "handed over"))
    kill_owner(procs)
    reap_dead_owners(tmp_path / "ledger", grace_s=0.5)
    assert child.poll() is None


def test_start_time_tells_a_running_process_from_its_zombie() -> None:
    proc = spawn()
    started = start_time(proc.pid)
    assert started is not None and start_time(proc.pid) == started
    proc.kill()
    # Not yet collected: only the zombie is left, which must not count as running.
    wait_until(lambda: start_time(proc.pid), lambda s: s is None, what="the zombie", timeout_s=5.0)
    proc.wait()


def test_tidy_removes_a_ledger_with_nothing_alive_and_keeps_one_with_live_children(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    book = Ledger(tmp_path / "ledger")  # owned by this (live) test process
    done = spawn("exit 0")
    done.wait()
    book.record_process(done.pid, "exited child")
    book.tidy()
    assert not book.dir.exists(), "a ledger of exited children only must not be left in /tmp"
    live = spawn()
    procs.append(live)
    book.record_process(live.pid, "kept child")
    book.tidy()
    assert book.dir.exists(), "a ledger naming a live child must stay for the reaper"
