"""phd.core.progress: lines, elapsed times, percentages, quiet runs, the build lock, the tail."""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

import pytest

from phd.core.progress import ProgressReporter, ProgressTail, build_lock, format_elapsed, parse_percent


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.0, "0.0 s"), (0.44, "0.4 s"), (9.94, "9.9 s"), (12.4, "12 s"), (59.4, "59 s"),
    (60, "1 min 00 s"), (125.7, "2 min 05 s"), (3725, "62 min 05 s"), (-1, "0.0 s"),
])
def test_elapsed_keeps_tenths_only_while_they_matter(seconds: float, shown: str) -> None:
    assert format_elapsed(seconds) == shown


@pytest.mark.parametrize(("line", "percent"), [
    ("Step 1/6 : FROM phd-downstairs-base:abc", 0),
    ("[phd-downstairs image] Step 3/6 : COPY sut /opt/phd/sut", 33),
    ("Step 6/6 : LABEL x=y", 83),
    ("#7 [3/4] RUN useradd phd", 50),
    ("#5 [stage-1 2/4] COPY . .", 25),
    ("tiny: [2/5] downloading linux-image-amd64", 20),
    ("[phd-downstairs image] I: downloading packages with apt...", 15),
    ("I: extracting archives...", 40),
    ("I: creating tarball...", 90),
    ("I: success in 61.2 seconds", 100),
    ("tiny: downloading linux-image-6.1.0-28-amd64", None),
    ("Step 0/0 : nothing", None),
    ("Step 7/6 : more steps than there are", None),
    ("", None),
])
def test_percentages_come_from_docker_build_mmdebstrap_and_steps(line: str, percent: int | None) -> None:
    assert parse_percent(line) == percent


def reporter(tmp_path: Path, clock: Clock, shown: list[str] | None, **kw: object) -> ProgressReporter:
    return ProgressReporter(terminal=None if shown is None else shown.append,
                            log_path=tmp_path / "progress.log", worker="gw0", clock=clock,
                            tick_s=3600, **kw)  # type: ignore[arg-type]


def logged(tmp_path: Path) -> list[str]:
    return [line.split(" ", 1)[1] for line in (tmp_path / "progress.log").read_text().splitlines()]


def test_a_long_step_shows_its_lines_with_worker_elapsed_time_and_percentage(tmp_path: Path) -> None:
    clock, shown = Clock(), []  # type: ignore[var-annotated]
    rep = reporter(tmp_path, clock, shown)
    rep.begin("img", "build downstairs image", None)
    clock.now += 1
    rep.line("img", "Step 1/4 : FROM base")
    assert shown == []  # not yet: it may be a cache hit
    clock.now += 3
    rep.line("img", "Step 3/4 : COPY sut /opt")
    clock.now += 60.5
    rep.end("img")
    assert shown == [
        "phd: build downstairs image [gw0] 0.0 s: started",
        "phd: build downstairs image [gw0] 1.0 s 0%: Step 1/4 : FROM base",
        "phd: build downstairs image [gw0] 4.0 s 50%: Step 3/4 : COPY sut /opt",
        "phd: build downstairs image [gw0] 1 min 04 s: finished in 1 min 04 s",
    ]
    assert logged(tmp_path) == [f"+ {line}" for line in shown]


def test_a_short_step_goes_to_the_logs_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock, shown = Clock(), []  # type: ignore[var-annotated]
    rep = reporter(tmp_path, clock, shown)
    with caplog.at_level(logging.INFO, logger="phd.progress"):
        rep.begin("tiny", "build tiny", None)
        clock.now += 1.5
        rep.line("tiny", "tiny: /cache/guests/tiny is up to date (0123456789ab)")
        rep.end("tiny")
    assert shown == []
    assert logged(tmp_path) == [
        ". phd: build tiny [gw0] 0.0 s: started",
        ". phd: build tiny [gw0] 1.5 s: tiny: /cache/guests/tiny is up to date (0123456789ab)",
        ". phd: build tiny [gw0] 1.5 s: finished in 1.5 s",
    ]
    assert [r.getMessage() for r in caplog.records] == [line[2:] for line in logged(tmp_path)]


def test_quiet_shows_nothing_but_logs_everything(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    rep = reporter(tmp_path, clock, None)  # -q: no terminal
    with caplog.at_level(logging.INFO, logger="phd.progress"):
        rep.begin("tiny", "build tiny", None)
        clock.now += 5
        rep.line("tiny", "tiny: [2/2] writing initramfs")
        rep.end("tiny")
    assert logged(tmp_path) == ["+ phd: build tiny [gw0] 0.0 s: started",
                                "+ phd: build tiny [gw0] 5.0 s 50%: tiny: [2/2] writing initramfs",
                                "+ phd: build tiny [gw0] 5.0 s: finished in 5.0 s"]
    assert len(caplog.records) == 3


def test_the_ticker_shows_a_silent_step_then_keeps_it_alive(tmp_path: Path) -> None:
    clock, shown = Clock(), []  # type: ignore[var-annotated]
    rep = reporter(tmp_path, clock, shown, heartbeat_s=15.0)
    rep.begin("base", "build downstairs image", None)
    clock.now += 2
    rep.tick()
    assert shown == []
    clock.now += 1
    rep.tick()  # 3 s: shown from now on
    assert shown == ["phd: build downstairs image [gw0] 0.0 s: started"]
    clock.now += 14
    rep.tick()
    clock.now += 1
    rep.tick()
    assert shown[1:] == ["phd: build downstairs image [gw0] 18 s: still running"]
    rep.end("base")


def test_downloads_report_every_ten_percent(tmp_path: Path) -> None:
    clock, shown = Clock(), []  # type: ignore[var-annotated]
    rep = reporter(tmp_path, clock, shown, show_after_s=0)
    rep.begin("rootfs", "fetch rootfs", 10 << 20)
    for _ in range(40):
        clock.now += 0.25
        rep.advance("rootfs", 256 << 10)
    rep.end("rootfs")
    percents = [re.search(r" (\d+%): ", line).group(1) for line in shown[1:-1]]  # type: ignore[union-attr]
    assert percents == ["10%", "20%", "30%", "40%", "50%", "60%", "70%", "80%", "90%", "100%"]
    assert shown[3] == "phd: fetch rootfs [gw0] 3.0 s 30%: 3.0 of 10.0 MiB"


def test_a_step_that_raises_ends_failed(tmp_path: Path) -> None:
    clock, shown = Clock(), []  # type: ignore[var-annotated]
    rep = reporter(tmp_path, clock, shown, show_after_s=0)

    def build() -> None:
        with rep.step("img", "build downstairs image"):
            clock.now += 2
            raise OSError("docker is gone")

    with pytest.raises(OSError, match="docker is gone"):
        build()
    assert shown[-1] == "phd: build downstairs image [gw0] 2.0 s: failed in 2.0 s"


class Recorder:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def begin(self, key: str, what: str, total: int | None) -> None:
        self.lines.append(f"begin {what}")

    def line(self, key: str, text: str) -> None:
        self.lines.append(text)

    def end(self, key: str) -> None:
        self.lines.append("end")


def test_a_waiter_names_the_builder_and_how_long_it_has_been_building(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = tmp_path / ".tiny.lock"
    holding, release = threading.Event(), threading.Event()

    def builder() -> None:
        with build_lock(lock, "tiny", "build tiny", None, timeout_s=10, on_timeout=RuntimeError):
            holding.set()
            release.wait(10)

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    thread = threading.Thread(target=builder)
    thread.start()
    assert holding.wait(10)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    threading.Timer(0.3, release.set).start()
    sink = Recorder()
    with build_lock(lock, "tiny", "build tiny", sink, timeout_s=10, poll_s=0.1, on_timeout=RuntimeError):
        assert (tmp_path / ".tiny.lock.holder").read_text().startswith("gw1\t")
    thread.join()
    assert sink.lines[0] == "begin build tiny"
    assert sink.lines[1].startswith("waiting for gw0 (building since ") and sink.lines[1].endswith(" s)")
    assert sink.lines[-2:] == ["gw0 finished", "end"]
    assert not (tmp_path / ".tiny.lock.holder").exists()


def test_a_waiter_that_comes_before_the_holders_note_still_names_the_holder(tmp_path: Path) -> None:
    """The holder writes its note just after taking the lock; a waiter arriving in between
    waits a moment for it rather than saying "another process" (seen under load in CI)."""
    from filelock import FileLock

    lock = tmp_path / ".tiny.lock"
    note = tmp_path / ".tiny.lock.holder"
    holding = threading.Event()

    def holder() -> None:  # the lock without its note, as between acquire() and the note's write
        with FileLock(str(lock)):
            holding.set()
            time.sleep(0.3)  # the holder's own pace, not a synchronisation
            note.write_text(f"gw0\t{time.time()}\n")
            time.sleep(1.5)  # still building when the waiter's grace for the note is over

    thread = threading.Thread(target=holder)
    thread.start()
    assert holding.wait(10)
    sink = Recorder()
    with build_lock(lock, "tiny", "build tiny", sink, timeout_s=10, poll_s=5, on_timeout=RuntimeError):
        pass
    thread.join()
    waiting = [line for line in sink.lines if line.startswith("waiting")]
    assert waiting and waiting[0].startswith("waiting for gw0 (building since "), sink.lines
    assert not any("another process" in line for line in sink.lines), sink.lines


def test_a_waiter_gives_up_after_its_timeout(tmp_path: Path) -> None:
    lock = tmp_path / ".img.lock"
    with build_lock(lock, "img", "build image", None, timeout_s=10, on_timeout=RuntimeError):
        result: list[BaseException] = []

        def waiter() -> None:
            try:
                with build_lock(lock, "img", "build image", None, timeout_s=0.2, poll_s=0.05,
                                on_timeout=TimeoutError):
                    pass
            except BaseException as exc:  # noqa: BLE001 - checked below
                result.append(exc)

        thread = threading.Thread(target=waiter)
        thread.start()
        thread.join(10)
    assert len(result) == 1 and isinstance(result[0], TimeoutError)
    assert "has held" in str(result[0]) and str(lock) in str(result[0])


def test_the_tail_shows_what_workers_would_show_once_and_in_order(tmp_path: Path) -> None:
    clock = Clock()
    seen: list[str] = []
    tail = ProgressTail(tmp_path / "progress.log", seen.append)
    tail.poll()  # no file yet
    gw0 = reporter(tmp_path, clock, None)
    gw1 = ProgressReporter(log_path=tmp_path / "progress.log", worker="gw1", clock=clock, tick_s=3600)
    gw0.begin("tiny", "build tiny", None)
    clock.now += 4
    gw1.begin("tiny", "build tiny", None)
    gw1.line("tiny", "waiting for gw0 (building since 4.0 s)")
    tail.poll()
    gw1.end("tiny")  # short: log only
    gw0.end("tiny")
    tail.stop()  # never started: stop still reads what is left
    assert seen == ["phd: build tiny [gw0] 0.0 s: started",
                    "phd: build tiny [gw0] 4.0 s: finished in 4.0 s"]
