"""One managed child process: the server under test, a process downstairs, a benchmark's helper.

    proc = ManagedProcess([sys.executable, "-m", "sut.server", ...], name="server on port 4100",
                          log_path=test_dir / "server.log", ready=ready_when_connects(4100))
    with proc:            # start(): launch, ledger entry, wait until ready
        ...
                          # stop(): SIGTERM, then SIGKILL; the log stays

Every process is started from an argv list (never a shell string), stdin closed, stdout and
stderr into ONE log file (appended: a restart's output follows the last one's), in a session
of its own: a Ctrl-C at the terminal reaches only the harness, which then stops its children
in order, and every signal goes to the process group, so a wrapper script dies with its child.

The moment it runs, it is written to this run's ledger (`phd.core.reaper`), with the directories
it owns, so the next run reaps it if this one is SIGKILLed; `stop()` forgets the entries once
the process is reaped. Readiness is a pluggable check polled by `phd.core.wait.wait_until` with a
fatal condition: a process that exits while starting fails its start AT ONCE with its exit
code and log tail, never after the whole timeout. A failed start undoes itself.

A process has ONE life: its lifecycle is an explicit `ProcessState`, and a second `start()` is
refused (make a new ManagedProcess to run the command again, as a restarted downstairs does).

    NEW --start--> STARTING --ready--> RUNNING --stop/kill--> STOPPING --> STOPPED
                       |                  |
                       | (failed start:   | (it exits on its own)
                       v  stopped, raised) v
                    STOPPED            EXITED --stop--> EXITED (entries forgotten)
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from signal import SIGCONT, SIGKILL, SIGTERM, Signals
from types import TracebackType
from typing import IO

from phd.core.errors import HarnessError, ProcessStartFailure, WaitTimeout
from phd.core.reaper import Ledger, ledger
from phd.core.wait import SYSTEM_CLOCK, Clock, wait_until

__all__ = [
    "ManagedProcess",
    "ProcessState",
    "ReadyCheck",
    "ready_when_connects",
    "ready_when_logged",
    "ready_when_unix_socket",
]

STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 30

# Whether the process is ready; called with the process, so a check can read its output.
ReadyCheck = Callable[["ManagedProcess"], bool]


class ProcessState(enum.StrEnum):
    NEW = "new"  # made, never started
    STARTING = "starting"  # launched, waiting for its ready check
    RUNNING = "running"
    STOPPING = "stopping"  # SIGTERM sent (or SIGKILL), waiting for it to exit
    STOPPED = "stopped"  # stopped by the harness (stop, kill, a failed start undone)
    EXITED = "exited"  # exited on its own after it was ready (a crash, or its work done)


_ENDED = (ProcessState.STOPPED, ProcessState.EXITED)


class ManagedProcess:
    """A child process with one life: start (until ready), signal, stop (TERM -> KILL).

    argv: the command, a list (never a shell string). log_path: where stdout and stderr go,
    appended (None: discarded, the `null` output mode). env: variables added to the harness's
    own environment. ready: polled until it returns True (None: ready once launched).
    owns_dirs: directories the reaper removes if this run is killed before it stops the process.
    start_error: what a failed start raises (a ProcessStartFailure subclass placing the blame).
    die_with_parent: PR_SET_PDEATHSIG=SIGKILL, so even a SIGKILLed harness takes the child with
    it; the kernel ties it to the starting THREAD, so only for processes started from a thread
    that outlives them (not from a pool thread).
    pipe_stdio: stdin and stdout are pipes the caller reads and writes (a serial console on
    stdio); stderr still goes to the log.
    """

    def __init__(self, argv: Sequence[str], *, name: str, log_path: Path | None,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 ready: ReadyCheck | None = None, ready_timeout_s: float = 30.0,
                 ready_interval_s: float = 0.05, stop_timeout_s: float = STOP_TIMEOUT_S,
                 owns_dirs: Sequence[Path] = (),
                 start_error: type[ProcessStartFailure] = ProcessStartFailure,
                 die_with_parent: bool = False, pipe_stdio: bool = False,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        if isinstance(argv, str):
            raise HarnessError(f"{name}: argv must be a list of arguments, not the string {argv!r}")
        if not argv:
            raise HarnessError(f"{name}: argv is empty")
        self.argv = [str(arg) for arg in argv]
        self.name = name
        self.log_path = log_path
        self.env = dict(env or {})
        self.cwd = cwd
        self.ready = ready
        self.ready_timeout_s = ready_timeout_s
        self.ready_interval_s = ready_interval_s
        self.stop_timeout_s = stop_timeout_s
        self.owns_dirs = tuple(owns_dirs)
        self.start_error = start_error
        self.die_with_parent = die_with_parent
        self.pipe_stdio = pipe_stdio
        self.clock = clock
        self.killed = False  # whether stopping it took a SIGKILL (it ignored SIGTERM)
        self.start_failure: BaseException | None = None
        self._state = ProcessState.NEW
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # where this life's output begins in the (appended) log
        self._ledger: list[Path] = []
        self._book: Ledger | None = None
        self._lock = threading.RLock()

    # --- what it is ---------------------------------------------------------------------
    @property
    def state(self) -> ProcessState:
        """The lifecycle state; a RUNNING process that has exited on its own reads EXITED."""
        with self._lock:
            if self._state is ProcessState.RUNNING and self._proc is not None \
                    and self._proc.poll() is not None:
                self._state = ProcessState.EXITED
            return self._state

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def exit_code(self) -> int | None:
        """The exit status once it has exited (negative: the signal that ended it), else None."""
        return None if self._proc is None else self._proc.poll()

    @property
    def stdin(self) -> IO[bytes]:
        if self._proc is None or self._proc.stdin is None:
            raise HarnessError(f"{self.name} has no stdin pipe (pipe_stdio=False, or not started)")
        return self._proc.stdin

    @property
    def stdout(self) -> IO[bytes]:
        if self._proc is None or self._proc.stdout is None:
            raise HarnessError(f"{self.name} has no stdout pipe (pipe_stdio=False, or not started)")
        return self._proc.stdout

    def alive(self) -> bool:
        """Launched and not yet exited (a frozen process is alive)."""
        return self._proc is not None and self._proc.poll() is None

    def output(self) -> str:
        """What this life of the process has written to its log so far ("" without a log)."""
        if self.log_path is None:
            return ""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self.log_path is None:
            return "<no log (output mode null)>"
        text = self.output().splitlines()
        return "\n".join(text[-lines:]) if text else "<the log is empty>"

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid}, state={self._state})"

    # --- start --------------------------------------------------------------------------
    def start(self) -> ManagedProcess:
        """Launch, write the ledger entries, wait until ready; undo everything if that fails."""
        self.spawn()
        return self.finish_start()

    def spawn(self) -> ManagedProcess:
        """The first half of start(): launch and write the ledger entries, without waiting for
        ready (state STARTING); finish_start() waits. A spare server is spawned ahead of its
        use and finished by whoever takes it."""
        with self._lock:
            if self._state is not ProcessState.NEW:
                why = f"; its start failed: {self.start_failure}" if self.start_failure else ""
                raise HarnessError(f"cannot start {self.name}: it was started before (now {self.state}"
                                   f"{why}); a managed process has one life - make a new one")
            self._state = ProcessState.STARTING
            try:
                self._launch()
            except BaseException:
                self._state = ProcessState.STOPPED
                raise
        return self

    def finish_start(self) -> ManagedProcess:
        """The second half of start(): wait until ready (at once if it already is); a failed
        start undoes itself and raises. Only after spawn()."""
        with self._lock:
            if self._state is ProcessState.RUNNING:
                return self
            if self._state is not ProcessState.STARTING:
                raise HarnessError(f"cannot finish starting {self.name}: it is {self.state}")
        try:
            self._wait_ready()
        except BaseException as exc:
            self.start_failure = exc
            self.stop()  # a failed start undoes itself: process, ledger entries
            raise
        with self._lock:
            if self._state is ProcessState.STARTING:
                self._state = ProcessState.RUNNING
        return self

    def move_log(self, path: Path) -> None:
        """Rename the log file to `path` (same filesystem) while the process writes on: it keeps
        its descriptor, and log_tail()/output() read the new name."""
        with self._lock:
            if self.log_path is None:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.log_path, path)
            self.log_path = path

    def _launch(self) -> None:
        log: IO[bytes] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = self.log_path.open("ab")
            self._log_offset = log.tell()
        sink: IO[bytes] | int = log if log is not None else subprocess.DEVNULL
        pipe = subprocess.PIPE if self.pipe_stdio else None
        try:
            self._proc = subprocess.Popen(  # noqa: S603 - an argv list, no shell
                self.argv, stdin=pipe if pipe is not None else subprocess.DEVNULL,
                stdout=pipe if pipe is not None else sink, stderr=sink,
                env={**os.environ, **self.env} if self.env else None, cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None)
        except OSError as exc:
            raise self.start_error(f"cannot start {self.name} ({exc})", self.argv, None,
                                   "<it never ran>") from exc
        finally:
            if log is not None:
                log.close()  # the child holds its own copy of the descriptor
        # Before anything can fail: if this run is SIGKILLed, the next one stops it.
        self._book = ledger()
        self._ledger = [self._book.record_process(self._proc.pid, self.name),
                        *(self._book.record_dir(path) for path in self.owns_dirs)]

    def _wait_ready(self) -> None:
        check = self.ready
        if check is None:
            self._raise_if_exited()
            return
        try:
            wait_until(lambda: check(self), lambda ok: ok, what=f"{self.name} to be ready",
                       timeout_s=self.ready_timeout_s, interval_s=self.ready_interval_s,
                       fatal=self._raise_if_exited, clock=self.clock)
        except WaitTimeout as exc:
            raise self.start_error(
                f"{self.name} was not ready within {self.ready_timeout_s:g}s (it was running; "
                "phd stopped it)", self.argv, None, self.log_tail()) from exc

    def _raise_if_exited(self) -> None:
        assert self._proc is not None  # only while starting
        code = self._proc.poll()
        if code is not None:
            raise self.start_error(f"{self.name} exited while starting", self.argv, code,
                                   self.log_tail())

    # --- signals and stop -----------------------------------------------------------------
    def signal(self, sig: Signals) -> None:
        """Send `sig` to the process group; nothing once it has exited (its pid may be reused)."""
        if self._proc is None:
            raise HarnessError(f"cannot signal {self.name}: it was never started")
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM (graceful), then SIGKILL after `timeout_s`; returns the exit code (None if
        it never ran). Idempotent; the log stays."""
        return self._end(SIGTERM, self.stop_timeout_s if timeout_s is None else timeout_s)

    def kill(self) -> int | None:
        """SIGKILL at once (a crash: no chance to clean up) and reap it; idempotent."""
        return self._end(SIGKILL, 0.0)

    def _end(self, first: Signals, grace_s: float) -> int | None:
        with self._lock:
            proc = self._proc
            if proc is None:
                self._state = ProcessState.STOPPED  # never ran: nothing to stop, no second life
                return None
            if proc.poll() is None:
                before = self._state
                self._state = ProcessState.STOPPING
                self.signal(first)
                if first is not SIGKILL:
                    self.signal(SIGCONT)  # a frozen process acts on SIGTERM only once continued
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    self.killed = first is not SIGKILL
                    self.signal(SIGKILL)
                    proc.wait()
                self._state = ProcessState.STOPPED if before is not ProcessState.EXITED \
                    else ProcessState.EXITED
            elif self._state is not ProcessState.STOPPED:
                self._state = ProcessState.EXITED
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):  # a dead child's stdin: EPIPE on the flush
                        pipe.close()
            self._forget()
            return proc.returncode

    def _forget(self) -> None:
        # Reaped: the reaper must not look for it (its directories are their owner's to remove).
        entries, self._ledger = self._ledger, []
        if self._book is not None:
            for entry in entries:
                self._book.forget(entry)

    # --- context manager ----------------------------------------------------------------
    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# --- ready checks ----------------------------------------------------------------------------
def ready_when_logged(text: str) -> ReadyCheck:
    """Ready once this life of the process has logged `text` (e.g. `"event": "listening"`)."""
    return lambda proc: text in proc.output()


def ready_when_connects(port: int, host: str = "127.0.0.1") -> ReadyCheck:
    """Ready once a TCP connect to host:port succeeds."""
    def connects(_proc: ManagedProcess) -> bool:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            return False
    return connects


def ready_when_unix_socket(path: Path) -> ReadyCheck:
    """Ready once a connect to the unix socket at `path` succeeds."""
    def connects(_proc: ManagedProcess) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(path))
                return True
        except OSError:
            return False
    return connects


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: the kernel SIGKILLs it when the thread that started it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
