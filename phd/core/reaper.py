"""What a killed run leaves behind: a ledger of this process's children, and the reaper.

Containers carry labels, so `sweep_leftovers` finds them. Processes carry nothing, so every
process the framework starts (server under test, process downstairs) is written to a ledger
file the moment it starts, together with the directories it owns. A run killed with SIGKILL
cannot clean up; the next run (or `phd sweep`) finds ledgers whose owner is gone and stops
what they list.

A PID alone is not an identity (PIDs are reused), so every entry also records the process's
start time from /proc/<pid>/stat; an entry whose PID now belongs to another process is
skipped, never signalled.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Ledger", "ledger", "reap_dead_owners"]

TERM_GRACE_S = 10.0  # a server stops its VM on SIGTERM; give it time to quit QEMU


def default_root() -> Path:
    """Shared by every run on this machine, whatever --phd-tmp-dir says, so runs find each other."""
    return Path(tempfile.gettempdir()) / "phd-ledger"


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None if there is no such process
    or only its zombie is left (it has exited; its parent just has not collected it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):  # field 3, the state: zombie or dead
        return None
    return int(fields[19])  # field 22 of stat(5), counted from field 3


@dataclass(frozen=True)
class Entry:
    pid: int
    start: int
    what: str

    def alive(self) -> bool:
        return start_time(self.pid) == self.start


class Ledger:
    """The ledger of ONE owner process: one JSON file per child plus one per owned directory."""

    def __init__(self, root: Path | None = None, owner_pid: int | None = None) -> None:
        pid = os.getpid() if owner_pid is None else owner_pid
        start = start_time(pid)
        if start is None:
            raise RuntimeError(f"no process {pid} to own a ledger")
        self.owner = Entry(pid, start, "owner")
        self.dir = (root or default_root()) / f"{os.uname().nodename}-{pid}-{start}"
        self._lock = threading.Lock()
        self._seq = 0

    def _write(self, name: str, record: dict[str, object]) -> Path:
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            owner = self.dir / "owner.json"
            if not owner.exists():
                owner.write_text(json.dumps({"pid": self.owner.pid, "start": self.owner.start}))
                atexit.register(self.tidy)
            self._seq += 1
            path = self.dir / f"{name}-{self._seq}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.rename(path)  # a reader never sees half an entry
            return path

    def record_process(self, pid: int, what: str) -> Path:
        """Call right after the child started; returns the entry to `forget` once it is reaped."""
        start = start_time(pid)
        return self._write("proc", {"pid": pid, "start": start if start is not None else -1, "what": what})

    def record_dir(self, path: Path) -> Path:
        return self._write("dir", {"path": str(path)})

    def forget(self, entry: Path) -> None:
        with self._lock:
            entry.unlink(missing_ok=True)

    def tidy(self) -> None:
        """At a normal exit: drop entries of processes that are gone; remove the ledger when
        nothing is left in it (what is left, e.g. VMs kept by --phd-keep-on-failure, stays
        for `phd sweep` or the next run)."""
        with self._lock:
            procs, dirs = _read_book(self.dir)
            if dirs or any(entry.alive() for entry in procs):
                return
            shutil.rmtree(self.dir, ignore_errors=True)


_ledger: Ledger | None = None
_ledger_lock = threading.Lock()


def ledger() -> Ledger:
    """This process's ledger (created on first use; a forked child gets its own)."""
    global _ledger
    with _ledger_lock:
        if _ledger is None or _ledger.owner.pid != os.getpid():
            _ledger = Ledger()
        return _ledger


def reap_dead_owners(root: Path | None = None, *, grace_s: float = TERM_GRACE_S) -> list[str]:
    """Stop the processes and remove the directories of every ledger whose owner is gone.

    Returns what was done, one line per process or directory, for the session log.
    """
    base = root or default_root()
    done: list[str] = []
    if not base.is_dir():
        return done
    host = os.uname().nodename + "-"
    for book in sorted(base.iterdir()):
        if not book.name.startswith(host):
            continue  # another machine's ledger on a shared /tmp: not ours to judge
        try:
            owner = json.loads((book / "owner.json").read_text())
        except (OSError, ValueError):
            owner = None
        if owner is not None and Entry(int(owner["pid"]), int(owner["start"]), "owner").alive():
            continue
        procs, dirs = _read_book(book)
        victims = [e for e in procs if e.alive()]
        for entry in victims:
            _signal_group(entry, signal.SIGTERM)
            _signal_group(entry, signal.SIGCONT)  # a paused downstairs acts on SIGTERM only then
            done.append(f"stopped {entry.what} (pid {entry.pid})")
        deadline = time.monotonic() + grace_s
        for entry in victims:
            while entry.alive() and time.monotonic() < deadline:
                time.sleep(0.05)  # poll interval of a deadline-bounded wait for exit
            if entry.alive():
                _signal_group(entry, signal.SIGKILL)
                done.append(f"killed {entry.what} (pid {entry.pid}): it ignored SIGTERM")
        for path in dirs:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {path}")
        shutil.rmtree(book, ignore_errors=True)
    return done


def _read_book(book: Path) -> tuple[list[Entry], list[Path]]:
    procs: list[Entry] = []
    dirs: list[Path] = []
    for item in sorted(book.glob("*.json")):
        try:
            record = json.loads(item.read_text())
        except (OSError, ValueError):
            continue
        if item.name.startswith("proc-"):
            procs.append(Entry(int(record["pid"]), int(record["start"]), str(record["what"])))
        elif item.name.startswith("dir-"):
            dirs.append(Path(record["path"]))
    return procs, dirs


def _signal_group(entry: Entry, sig: signal.Signals) -> None:
    # Children are started in their own session (start_new_session=True), so the group id is
    # the pid and the signal reaches the whole group; fall back to the process alone.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        try:
            os.killpg(entry.pid, sig)
        except ProcessLookupError:
            os.kill(entry.pid, sig)
