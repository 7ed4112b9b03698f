from __future__ import annotations

import pytest

from phd.errors import WaitTimeout
from phd.wait import wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)


def test_returns_first_value_that_is_done() -> None:
    values = iter([1, 2, 3, 4])
    clock = FakeClock()
    assert wait_until(lambda: next(values), lambda v: v >= 3, what="three", timeout_s=5,
                      sleep=clock.sleep) == 3
    assert len(clock.sleeps) == 2


def test_exceptions_count_as_not_yet_and_are_reported() -> None:
    def probe() -> int:
        raise ConnectionRefusedError("nobody home")

    with pytest.raises(WaitTimeout) as info:
        wait_until(probe, lambda v: True, what="server", timeout_s=0.05, interval_s=0.01)
    assert "nobody home" in str(info.value)
    assert isinstance(info.value.last_seen, ConnectionRefusedError)


def test_timeout_reports_last_value_seen() -> None:
    with pytest.raises(WaitTimeout) as info:
        wait_until(lambda: "Starting", lambda v: v == "Running", what="Running",
                   timeout_s=0.05, interval_s=0.01)
    assert info.value.last_seen == "Starting"
    assert "Running" in str(info.value)
