"""The wait helper against a fake clock: no test here really sleeps."""

from __future__ import annotations

import pytest

from phd.core.errors import HarnessError, PhdError, SutError, SutTimeout, WaitTimeout
from phd.core.wait import wait_until


class FakeClock:
    """Time moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def test_returns_first_value_that_is_done() -> None:
    values = iter([1, 2, 3, 4])
    clock = FakeClock()
    assert wait_until(lambda: next(values), lambda v: v >= 3, what="three", timeout_s=5,
                      interval_s=0.5, clock=clock) == 3
    assert clock.sleeps == [0.5, 0.5]


def test_exceptions_count_as_not_yet_and_are_reported() -> None:
    def probe() -> int:
        raise ConnectionRefusedError("nobody home")

    with pytest.raises(WaitTimeout) as info:
        wait_until(probe, lambda v: True, what="server", timeout_s=1, interval_s=0.25,
                   clock=FakeClock())
    assert "nobody home" in str(info.value)
    assert isinstance(info.value.last_seen, ConnectionRefusedError)


def test_timeout_reports_what_and_last_value_seen() -> None:
    seen = iter(["Creating", "Starting", "Starting", "Starting", "Starting"])
    with pytest.raises(WaitTimeout) as info:
        wait_until(lambda: next(seen), lambda v: v == "Running", what="VM to reach Running",
                   timeout_s=1, interval_s=0.25, clock=FakeClock())
    assert info.value.last_seen == "Starting"
    assert info.value.what == "VM to reach Running" and info.value.timeout_s == 1
    assert "VM to reach Running" in str(info.value) and "'Starting'" in str(info.value)


def test_deadline_is_kept_on_the_given_clock_with_a_last_probe_at_it() -> None:
    clock = FakeClock()
    probed_at: list[float] = []
    with pytest.raises(WaitTimeout):
        wait_until(lambda: probed_at.append(clock.now), lambda v: False, what="never",
                   timeout_s=1.0, interval_s=0.4, clock=clock)
    # 0.4 s apart, the last sleep cut short so the final probe lands on the deadline.
    assert probed_at == pytest.approx([0.0, 0.4, 0.8, 1.0])
    assert clock.now == pytest.approx(1.0)


def test_fatal_ends_the_wait_at_once_with_its_own_error() -> None:
    clock = FakeClock()
    alive = iter([True, True, False])
    probes: list[float] = []

    def fatal() -> None:
        if not next(alive):
            raise HarnessError("server exited with 3")

    def probe() -> bool:
        probes.append(clock.now)
        raise ConnectionRefusedError("refused")

    with pytest.raises(HarnessError, match="exited with 3"):
        wait_until(probe, lambda ok: ok, what="server", timeout_s=30.0, interval_s=0.1,
                   fatal=fatal, clock=clock)
    assert len(probes) == 3, "fatal runs after each probe that is not done"
    assert clock.now == pytest.approx(0.2), "the wait stopped long before its 30 s"


def test_fatal_is_not_consulted_once_the_probe_is_done() -> None:
    def fatal() -> None:
        raise AssertionError("fatal must not run after success")

    assert wait_until(lambda: 7, lambda v: v == 7, what="seven", timeout_s=1, fatal=fatal,
                      clock=FakeClock()) == 7


def test_timeout_error_picks_who_is_blamed() -> None:
    with pytest.raises(SutTimeout) as info:
        wait_until(lambda: "Starting", lambda v: False, what="Running", timeout_s=0.5,
                   timeout_error=SutTimeout, clock=FakeClock())
    assert isinstance(info.value, SutError) and isinstance(info.value, WaitTimeout)
    assert info.value.last_seen == "Starting"


def test_a_plain_timeout_blames_neither_the_sut_nor_the_harness() -> None:
    with pytest.raises(WaitTimeout) as info:
        wait_until(lambda: 0, lambda v: False, what="x", timeout_s=0.1, clock=FakeClock())
    assert isinstance(info.value, PhdError)
    assert not isinstance(info.value, SutError | HarnessError)
