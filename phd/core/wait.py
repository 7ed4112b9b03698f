"""The one polling helper every wait in the framework goes through.

Waits poll a predicate against a monotonic deadline and, on timeout, report what they last
saw - never a bare sleep. Exceptions from the probe mean "not yet" (a server still starting
refuses connections); a `fatal` check is the way out for "never": a server process that has
exited will not start answering, so its start fails at once with its exit code instead of
after the whole timeout. The clock is injectable so the framework's own unit tests never
really wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import tenacity

from phd.core.errors import WaitTimeout

__all__ = ["SYSTEM_CLOCK", "Clock", "wait_until"]

T = TypeVar("T")


class Clock(Protocol):
    """Where a wait reads the time and how it sleeps; a fake one in unit tests."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


@dataclass(frozen=True)
class _SystemClock:
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


SYSTEM_CLOCK: Clock = _SystemClock()


class _NotYet(Exception):
    pass


def wait_until(
    probe: Callable[[], T],
    done: Callable[[T], bool],
    *,
    what: str,
    timeout_s: float,
    interval_s: float = 0.1,
    fatal: Callable[[], None] | None = None,
    timeout_error: type[WaitTimeout] = WaitTimeout,
    clock: Clock = SYSTEM_CLOCK,
) -> T:
    """Call `probe` until `done(value)` holds; return that value.

    Exceptions from `probe` count as "not yet" and the last one is reported if the deadline
    passes (as `timeout_error(what, timeout_s, last_seen)`: pass `SutTimeout` when the wait
    is on the system under test). After every probe that is not done, `fatal()` runs: what
    it raises ends the wait at once, unretried - the caller's own error, carrying its own
    diagnosis (an exit code, a log tail). The probe runs one last time at the deadline.
    """
    deadline = clock.monotonic() + timeout_s
    last: list[object] = ["<never probed>"]

    def attempt() -> T:
        try:
            value = probe()
        except Exception as exc:  # noqa: BLE001 - "not yet"; reported if the deadline passes
            last[0] = exc
        else:
            last[0] = value
            if done(value):
                return value
        if fatal is not None:
            fatal()  # raises past tenacity: only _NotYet is retried
        raise _NotYet

    retrying = tenacity.Retrying(
        # Our own clock, not tenacity's (which reads time.monotonic itself), so a fake clock
        # drives the deadline too; the last sleep is cut short to land on the deadline.
        stop=lambda _state: clock.monotonic() >= deadline,
        wait=lambda _state: max(0.0, min(interval_s, deadline - clock.monotonic())),
        retry=tenacity.retry_if_exception_type(_NotYet),
        sleep=clock.sleep,
        reraise=False,
    )
    try:
        return retrying(attempt)
    except tenacity.RetryError:
        raise timeout_error(what, timeout_s, last[0]) from None
