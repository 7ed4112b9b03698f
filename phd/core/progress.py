"""What a session builds or fetches before its tests, shown as it happens.

Guest builds, downloads and the downstairs image can take minutes on a fresh machine; a
`ProgressReporter` turns their steps into one-line reports - the step, the worker, the
elapsed time and, where known, a percentage::

    phd: build tiny [gw1] 2.9 s: tiny: downloading linux-image-6.1.0-57-amd64=6.1.192-3
    phd: build tiny [gw0] 15 s: waiting for gw1 (building since 15 s)
    phd: build downstairs image (ours) [gw0] 41 s 33%: [phd-downstairs image] Step 5/12 : COPY sut ...

Every line goes to the logger ``phd.progress`` and to the session's progress log
(``<phd tmp dir>/<session>/progress.log``), always. A step that ends within `SHOW_AFTER_S`
(a cache hit) stays there; one that runs longer is shown, with a line at least every
`HEARTBEAT_S`. The terminal gets it unless pytest runs
with ``-q``: directly in a plain run; under xdist, workers cannot write to the terminal
(xdist swallows their output), so they only append to the progress log and the controller
follows that file (`ProgressTail`) and prints what they wrote - once, since only the worker
holding a build's `build_lock` builds while the others report that they wait for it.

Implements ``phd.artifacts.store.Progress`` (begin / advance / line / end), so the artifact
store reports through it without knowing where lines go.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from filelock import FileLock, Timeout

__all__ = [
    "HEARTBEAT_S",
    "ProgressReporter",
    "ProgressTail",
    "StepSink",
    "build_lock",
    "format_elapsed",
    "parse_percent",
]

HEARTBEAT_S = 15.0  # a step silent this long still gets a line, so the terminal never looks hung
PERCENT_STEP = 10  # a byte count reports each time it crosses another 10 %
SHOW_AFTER_S = 3.0  # a step done sooner (a cache hit) is only logged, never shown
_SHOWN, _LOG_ONLY = "+", "."  # marks in the progress log: what the terminal shows, what it does not
LOGGER = logging.getLogger("phd.progress")

# docker build, legacy builder: "Step 3/7 : COPY ..."; BuildKit (--progress=plain):
# "#7 [3/4] RUN ..."; anything else that counts its steps as "[3/7]".
_STEP = re.compile(r"^(?:Step (\d+)/(\d+) :|#\d+ \[(?:[\w-]+ )?(\d+)/(\d+)\]|\[(\d+)/(\d+)\])")
# mmdebstrap's phases (its "I:" lines), in order, with how far in a typical run each starts.
_MMDEBSTRAP = (("I: running apt-get update", 5), ("I: downloading packages", 15),
               ("I: extracting archives", 40), ("I: installing essential packages", 50),
               ("I: installing remaining packages", 70), ("I: cleaning package lists", 85),
               ("I: creating tarball", 90), ("I: success", 100))


def format_elapsed(seconds: float) -> str:
    """`0.4 s`, `12 s`, `2 min 05 s`: tenths only while they matter."""
    if seconds < 10:
        return f"{max(seconds, 0.0):.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs:02d} s"


def parse_percent(line: str) -> int | None:
    """How far a build is, from one line of its output, or None if the line does not say.

    Step i of N counts as started, so (i - 1) / N is done; mmdebstrap's phases map to rough
    fractions of a typical run."""
    text = line.strip()
    # Recipes and the image builder prefix their lines ("tiny: ", "[phd-downstairs image] ").
    text = re.sub(r"^(?:\[[^\]/]*\] |[\w-]{2,}: )", "", text)
    match = _STEP.match(text)
    if match is not None:
        numbers = [int(g) for g in match.groups() if g is not None]
        step, total = numbers
        if 0 < step <= total:
            return (step - 1) * 100 // total
        return None
    for prefix, percent in _MMDEBSTRAP:
        if text.startswith(prefix):
            return percent
    return None


class StepSink(Protocol):
    """What `build_lock` reports to: `ProgressReporter`, or any ``phd.artifacts.store.Progress``."""

    def begin(self, key: str, what: str, total: int | None) -> None: ...

    def line(self, key: str, text: str) -> None: ...

    def end(self, key: str) -> None: ...


@dataclass
class _Step:
    what: str
    started: float
    total: int | None = None  # bytes, for downloads
    done: int = 0
    percent: int | None = None
    last_shown: float = 0.0
    shown_percent: int = 0
    public: bool = False  # shown on the terminal (it ran longer than show_after_s)
    held: list[str] = field(default_factory=list)  # its lines until then


class ProgressReporter:
    """One per pytest process. `terminal` writes one line to the terminal, or is None (a
    quiet run, an xdist worker); `log_path` is the session's progress log, shared by all of
    its processes (each line appended whole, so workers never interleave mid-line).

    A step that ends within `show_after_s` (a cached guest's recipe saying "up to date", an
    image already present) only goes to the logs: the terminal shows what takes time."""

    def __init__(self, *, terminal: Callable[[str], None] | None = None, log_path: Path | None = None,
                 worker: str | None = None, clock: Callable[[], float] = time.monotonic,
                 heartbeat_s: float = HEARTBEAT_S, show_after_s: float = SHOW_AFTER_S,
                 tick_s: float = 1.0) -> None:
        self.terminal = terminal
        self.log_path = log_path
        self.worker = worker if worker is not None else os.environ.get("PYTEST_XDIST_WORKER")
        self.clock = clock
        self.heartbeat_s = heartbeat_s
        self.show_after_s = show_after_s
        self.tick_s = tick_s
        self._steps: dict[str, _Step] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # --- phd.artifacts.store.Progress --------------------------------------------------------
    def begin(self, key: str, what: str, total: int | None) -> None:
        with self._lock:
            self._steps[key] = _Step(what, self.clock(), total)
            self._emit(key, "started")
            self._start_ticker()

    def advance(self, key: str, nbytes: int) -> None:
        with self._lock:
            step = self._steps.get(key)
            if step is None or not step.total:
                return
            step.done += nbytes
            step.percent = min(100, step.done * 100 // step.total)
            if step.percent >= step.shown_percent + PERCENT_STEP:
                step.shown_percent = step.percent - step.percent % PERCENT_STEP
                self._emit(key, f"{step.done / (1 << 20):.1f} of {step.total / (1 << 20):.1f} MiB")

    def line(self, key: str, text: str) -> None:
        with self._lock:
            step = self._steps.get(key)
            if step is not None:
                percent = parse_percent(text)
                if percent is not None:
                    step.percent = percent
            self._emit(key, text)

    def end(self, key: str, outcome: str = "finished") -> None:
        with self._lock:
            step = self._steps.get(key)
            if step is None:
                return
            step.percent = None
            self._emit(key, f"{outcome} in {format_elapsed(self.clock() - step.started)}")
            if not step.public:  # short: the logs get it all, the terminal nothing
                for line in step.held:
                    self._write(line, show=False, log=False)
            del self._steps[key]
            if not self._steps:
                self._stop_ticker()

    # --- steps outside the artifact store ------------------------------------------------------
    @contextlib.contextmanager
    def step(self, key: str, what: str) -> Iterator[None]:
        """`begin` ... `end`; the end line says "failed" when the body raises."""
        self.begin(key, what, None)
        outcome = "failed"
        try:
            yield
            outcome = "done"
        finally:
            self.end(key, outcome)

    def tick(self) -> None:
        """Show steps that have run `show_after_s`; give one silent for `heartbeat_s` a line.
        A thread calls this every `tick_s` while any step runs."""
        with self._lock:
            now = self.clock()
            for key, step in list(self._steps.items()):
                if not step.public and now - step.started >= self.show_after_s:
                    self._publish(step)
                elif step.public and now - step.last_shown >= self.heartbeat_s:
                    self._emit(key, "still running")

    def close(self) -> None:
        with self._lock:
            self._steps.clear()
            self._stop_ticker()

    # --- output ---------------------------------------------------------------------------------
    def _who(self) -> str:
        return f" [{self.worker}]" if self.worker else ""

    def _emit(self, key: str, text: str) -> None:
        step = self._steps.get(key)
        if step is None:
            self._write(f"phd: {key}{self._who()}: {text}", show=True, log=True)
            return
        now = self.clock()
        step.last_shown = now
        percent = "" if step.percent is None else f" {step.percent}%"
        line = f"phd: {step.what}{self._who()} {format_elapsed(now - step.started)}{percent}: {text}"
        LOGGER.info("%s", line)
        if step.public:
            self._write(line, show=True, log=False)
            return
        step.held.append(line)
        if now - step.started >= self.show_after_s:
            self._publish(step)

    def _publish(self, step: _Step) -> None:
        step.public = True
        step.last_shown = self.clock()
        for line in step.held:
            self._write(line, show=True, log=False)
        step.held.clear()

    def _write(self, line: str, *, show: bool, log: bool) -> None:
        """To the progress log (marked shown or not), the terminal if `show`, the logger if
        `log` (a held line was logged when it was made)."""
        if log:
            LOGGER.info("%s", line)
        if self.log_path is not None:
            with contextlib.suppress(OSError):  # a full disk must not break a build
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
                mark = _SHOWN if show else _LOG_ONLY
                data = f"{stamp} {mark} {line}\n".encode(errors="replace")
                fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    os.write(fd, data)  # one write with O_APPEND: whole lines, whatever other workers do
                finally:
                    os.close(fd)
        if show and self.terminal is not None:
            with contextlib.suppress(Exception):  # a broken terminal must not break a build
                self.terminal(line)

    def _start_ticker(self) -> None:
        if self._ticker is None or not self._ticker.is_alive():
            self._stop = threading.Event()
            self._ticker = threading.Thread(target=self._tick_loop, args=(self._stop,),
                                            name="phd-progress", daemon=True)
            self._ticker.start()

    def _stop_ticker(self) -> None:
        self._stop.set()
        self._ticker = None

    def _tick_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.tick_s):
            self.tick()


HOLDER_NOTE_GRACE_S = 1.0


def _holder_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".holder")


def _read_holder(lock_path: Path) -> tuple[str, float | None]:
    """Who holds a build lock ("gw0", "pid 123") and since when (time.time()), from the note
    its holder left; ("another process", None) when there is none."""
    try:
        who, since = _holder_path(lock_path).read_text().split("\t")[:2]
        return who, float(since)
    except (OSError, ValueError):
        return "another process", None


@contextlib.contextmanager
def build_lock(lock_path: Path, key: str, what: str, reporter: StepSink | None, *,
               timeout_s: float, poll_s: float = HEARTBEAT_S,
               on_timeout: Callable[[str], Exception]) -> Iterator[None]:
    """Hold the cross-process lock of one build. While another process holds it, report
    "waiting for gw0 (building since 20 s)" every `poll_s`; give up after `timeout_s` with
    `on_timeout(message)`. The holder leaves a note naming itself for the waiters."""
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        deadline = time.monotonic() + timeout_s
        waited = False
        named_wait = True  # one short wait for the holder's note before saying who holds it
        while True:
            who, since = _read_holder(lock_path)
            if since is None and named_wait:
                # The holder writes its note just after it takes the lock: a waiter that comes
                # in between would say "another process" and name the holder only a heartbeat
                # later. Give the note a moment first (or get the lock, if the build is over).
                named_wait = False
                try:
                    lock.acquire(timeout=max(0.0, min(HOLDER_NOTE_GRACE_S, deadline - time.monotonic())))
                    break
                except Timeout:
                    continue
            held = "" if since is None else f" (building since {format_elapsed(time.time() - since)})"
            if reporter is not None:
                if not waited:
                    reporter.begin(key, what, None)
                    waited = True
                reporter.line(key, f"waiting for {who}{held}")
            try:
                lock.acquire(timeout=max(0.0, min(poll_s, deadline - time.monotonic())))
                break
            except Timeout:
                if time.monotonic() >= deadline:
                    raise on_timeout(f"{who} has held {lock_path} for {timeout_s:.0f} s{held}") from None
        if reporter is not None and waited:
            reporter.line(key, f"{who} finished")
            reporter.end(key)
    try:
        worker = os.environ.get("PYTEST_XDIST_WORKER") or f"pid {os.getpid()}"
        with contextlib.suppress(OSError):
            _holder_path(lock_path).write_text(f"{worker}\t{time.time()}\n")
        yield
    finally:
        with contextlib.suppress(OSError):
            _holder_path(lock_path).unlink()
        lock.release()


class ProgressTail:
    """The xdist controller's view of its workers' builds: follows the session's progress
    log in a thread and hands each new line (without its time stamp) to `emit`."""

    def __init__(self, path: Path, emit: Callable[[str], None], *, interval_s: float = 0.5) -> None:
        self.path = path
        self.emit = emit
        self.interval_s = interval_s
        self._offset = path.stat().st_size if path.exists() else 0
        self._partial = b""
        self._reading = threading.Lock()  # the thread and the controller's hooks both poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="phd-progress-tail", daemon=True)

    def start(self) -> ProgressTail:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop following; what was written until now is still shown."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=10)
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        """Show every complete line written since the last poll."""
        with self._reading:
            self._poll()

    def _poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for raw in lines:
            parts = raw.decode(errors="replace").split(" ", 2)  # stamp, mark, line
            if len(parts) == 3 and parts[1] == _SHOWN:
                with contextlib.suppress(Exception):  # a broken terminal must not stop the tail
                    self.emit(parts[2])
