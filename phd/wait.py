"""The one polling helper every wait in the framework goes through.

Waits poll a predicate against a monotonic deadline (tenacity's `stop_after_delay` uses
`time.monotonic`) and, on timeout, report what they last saw - never a bare sleep.
The sleep is injectable so the framework's own unit tests never really wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import tenacity

from phd.errors import WaitTimeout

__all__ = ["wait_until"]

T = TypeVar("T")


class _NotYet(Exception):
    def __init__(self, seen: object) -> None:
        super().__init__(repr(seen))
        self.seen = seen


def wait_until(
    probe: Callable[[], T],
    done: Callable[[T], bool],
    *,
    what: str,
    timeout_s: float,
    interval_s: float = 0.1,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `probe` until `done(value)` holds; return that value.

    Exceptions from `probe` count as "not yet" (a server still starting refuses
    connections) and the last one is reported if the deadline passes.
    """
    last: list[object] = ["<never probed>"]

    def attempt() -> T:
        try:
            value = probe()
        except Exception as exc:
            last[0] = exc
            raise _NotYet(exc) from exc
        last[0] = value
        if not done(value):
            raise _NotYet(value)
        return value

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout_s),
        wait=tenacity.wait_fixed(interval_s),
        retry=tenacity.retry_if_exception_type(_NotYet),
        sleep=sleep,
        reraise=False,
    )
    try:
        return retrying(attempt)
    except tenacity.RetryError:
        raise WaitTimeout(what, timeout_s, last[0]) from None
