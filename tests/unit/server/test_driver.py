"""The state driver against fake VM and backend: startup serves the queue (PR 873)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from sut.server import driver as driver_module
from sut.server.backends import ReplacementRejectedError
from sut.server.driver import (
    STOPS_UNREAD_GRACE_S,
    InstanceGoneError,
    NoSuchBackendError,
    NotRunningError,
    StateDriver,
)
from sut.server.regressions import Regressions
from sut.server.request_queue import RequestDeniedError, RequestKind
from sut.server.states import InstanceState as S

from .fakes import FakeBackend, FakeVm

DEAD, LIVE, OTHER = "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"
DEADLINE_S = 5.0
BID = "d0-backend"


class Harness:
    def __init__(self, *regressions: str) -> None:
        self.backend = FakeBackend(BID, [DEAD, OTHER, "127.0.0.1:4"], good_target=LIVE)
        self.vms: list[FakeVm] = []
        self.driver = StateDriver(
            backends={BID: self.backend},
            vm_factory=self._make_vm,
            regressions=Regressions(frozenset(regressions)),
        )
        self.driver.start()

    def _make_vm(self) -> FakeVm:
        self.vms.append(FakeVm())
        return self.vms[-1]

    @property
    def vm(self) -> FakeVm:
        assert len(self.vms) == 1, "expected exactly one VM launch"
        return self.vms[0]

    async def states_until(self, final: S) -> list[S]:
        """Published states from the current one until ``final`` (bounded by a deadline)."""
        start = self.driver.state.gen

        async def follow() -> None:
            gen = start
            while (snapshot := await self.driver.monitor.wait_for_gen(gen + 1)).state is not final:
                if snapshot.gen == gen:
                    raise AssertionError(f"stuck at {snapshot.state}, never reached {final}")
                gen = snapshot.gen

        await asyncio.wait_for(follow(), DEADLINE_S)
        return [s.state for s in self.driver.monitor.history if s.gen >= start]

    def current(self) -> S:
        return self.driver.state.state

    async def wait_state(self, state: S) -> None:
        await self.states_until(state)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


def test_replacement_during_startup_unblocks_activation() -> None:
    async def body() -> None:
        h = Harness()
        h.driver.request_state(RequestKind.START)
        await h.wait_state(S.STARTING)
        assert h.current() is S.STARTING
        result = await asyncio.wait_for(h.driver.replace_vcr(BID, f"{DEAD}->{LIVE}"), DEADLINE_S)
        assert result == "started"
        assert await h.states_until(S.RUNNING) == [S.STARTING, S.RUNNING]
        assert h.vm.calls == ["launch", "cont"]
        # Replacement while Running is served too.
        assert await h.driver.replace_vcr(BID, f"{OTHER}->127.0.0.1:5") == "started"
        h.driver.request_state(RequestKind.STOP)
        assert await h.states_until(S.DESTROYED) == [S.RUNNING, S.STOPPING, S.STOPPED, S.DESTROYED]
        assert h.vm.calls[-1] == "shutdown"
        assert "close" in h.backend.calls

    run(body)


def test_stop_during_startup_aborts_activation_without_running_vcpus() -> None:
    async def body() -> None:
        h = Harness()
        h.driver.request_state(RequestKind.START)
        await h.wait_state(S.STARTING)
        h.driver.request_state(RequestKind.STOP)
        assert await h.states_until(S.DESTROYED) == [S.STARTING, S.STOPPED, S.DESTROYED]
        assert "cont" not in h.vm.calls
        assert "shutdown" in h.vm.calls
        assert h.backend.activation_cancelled
        assert h.backend.calls[-1] == "close"

    run(body)


def test_replacement_queued_behind_stop_is_answered_gone() -> None:
    async def body() -> None:
        h = Harness()
        h.driver.request_state(RequestKind.START)
        await h.wait_state(S.STARTING)
        # Both land in the queue before the driver runs again: the stop is
        # served first (state changes first), the replacement is then stale.
        h.driver.request_state(RequestKind.STOP)
        pending = asyncio.create_task(h.driver.replace_vcr(BID, f"{DEAD}->{LIVE}"))
        with pytest.raises(InstanceGoneError):
            await asyncio.wait_for(pending, DEADLINE_S)
        assert h.current() is S.DESTROYED
        assert not any(c.startswith("replace") for c in h.backend.calls)

    run(body)


def test_blocking_start_regression_reads_no_request_during_activation() -> None:
    async def body() -> None:
        h = Harness("blocking-start")
        h.driver.request_state(RequestKind.START)
        await h.wait_state(S.STARTING)
        replacement = asyncio.create_task(h.driver.replace_vcr(BID, f"{DEAD}->{LIVE}"))
        h.driver.request_state(RequestKind.STOP)
        # Proving a negative, best effort (as PHD does): the livelock holds
        # for a bounded window in which the fixed driver finishes at once.
        done, _ = await asyncio.wait({replacement}, timeout=0.5)
        assert not done
        assert h.current() is S.STARTING
        assert not any(c.startswith("replace") for c in h.backend.calls)
        await h.driver.shutdown(timeout_s=0.2)  # cancels the stuck driver
        assert h.current() is S.DESTROYED
        with pytest.raises(InstanceGoneError):
            await replacement
        assert "shutdown" in h.vm.calls

    run(body)


@pytest.mark.parametrize("regression", ["blocking-start", "stop-ignored-while-starting"])
def test_a_driver_reading_no_stop_is_shut_down_without_waiting_for_it(regression: str) -> None:
    """A server process ending while its driver reads no stop (its activation never ends) cancels
    it after a short grace, STOPS_UNREAD_GRACE_S: waiting the whole timeout for a stop that is
    not read only delays teardown."""
    async def body() -> None:
        h = Harness(regression)
        h.driver.request_state(RequestKind.START)
        await h.wait_state(S.STARTING)
        # the grace plus what cancelling takes, far below the 60 s asked for
        await asyncio.wait_for(h.driver.shutdown(timeout_s=60.0), STOPS_UNREAD_GRACE_S + 3.0)
        assert h.current() is S.DESTROYED
        assert "shutdown" in h.vm.calls

    run(body)


def test_stop_ignored_while_starting_regression_defers_stop() -> None:
    async def body() -> None:
        h = Harness("stop-ignored-while-starting")
        h.driver.request_state(RequestKind.START)
        await h.wait_state(S.STARTING)
        h.driver.request_state(RequestKind.STOP)
        done, _ = await asyncio.wait({asyncio.create_task(h.wait_state(S.STOPPED))}, timeout=0.5)
        assert not done
        # Replacements are still served; once Running, the deferred stop runs.
        assert await h.driver.replace_vcr(BID, f"{DEAD}->{LIVE}") == "started"
        await h.wait_state(S.DESTROYED)
        assert h.vm.calls[:2] == ["launch", "cont"]

    run(body)


def test_stop_while_creating_never_launches_qemu() -> None:
    async def body() -> None:
        h = Harness()
        h.driver.request_state(RequestKind.STOP)
        assert await h.states_until(S.DESTROYED) == [S.CREATING, S.STOPPED, S.DESTROYED]
        assert h.vms == []
        with pytest.raises(RequestDeniedError):
            h.driver.request_state(RequestKind.START)

    run(body)


def test_reboot_while_running_resets_the_vm() -> None:
    async def body() -> None:
        h = Harness()
        h.backend.targets[0] = LIVE
        with pytest.raises(RequestDeniedError):
            h.driver.request_state(RequestKind.REBOOT)  # not started yet
        h.driver.request_state(RequestKind.START)
        await h.wait_state(S.RUNNING)
        h.driver.request_state(RequestKind.REBOOT)
        assert await h.states_until(S.RUNNING) == [S.RUNNING, S.REBOOTING, S.RUNNING]
        assert h.vm.calls == ["launch", "cont", "reset"]
        await h.driver.shutdown()

    run(body)


def test_qemu_dying_while_running_is_failed() -> None:
    async def body() -> None:
        h = Harness()
        h.backend.targets[0] = LIVE
        h.driver.request_state(RequestKind.START)
        await h.wait_state(S.RUNNING)
        h.vm.crash()
        await h.wait_state(S.FAILED)
        assert "close" in h.backend.calls
        with pytest.raises(RequestDeniedError):
            h.driver.request_state(RequestKind.START)

    run(body)


def test_fatal_activation_is_failed() -> None:
    async def body() -> None:
        h = Harness()
        h.driver.request_state(RequestKind.START)
        await h.wait_state(S.STARTING)
        h.backend.fail("generation too low")
        await h.wait_state(S.FAILED)
        assert "cont" not in h.vm.calls
        assert "shutdown" in h.vm.calls

    run(body)


def test_rejected_replacement_and_unknown_backend() -> None:
    async def body() -> None:
        h = Harness()
        h.driver.request_state(RequestKind.START)
        await h.wait_state(S.STARTING)
        with pytest.raises(ReplacementRejectedError) as info:
            await h.driver.replace_vcr(BID, f"{DEAD}->{DEAD}")
        assert info.value.rule == "no-change"
        with pytest.raises(NoSuchBackendError):
            await h.driver.replace_vcr("nope-backend", "x->y")
        assert h.current() is S.STARTING  # a rejection does not hurt the VM
        await h.driver.shutdown()
        assert h.current() is S.DESTROYED

    run(body)


def test_guest_poweroff_is_an_orderly_stop() -> None:
    async def body() -> None:
        h = Harness()
        h.backend.targets[0] = LIVE
        h.driver.request_state(RequestKind.START)
        await h.wait_state(S.RUNNING)
        h.vm.guest_poweroff()
        assert await h.states_until(S.DESTROYED) == [
            S.RUNNING, S.STOPPING, S.STOPPED, S.DESTROYED,
        ]
        # QEMU was quit (it flushes) before the backend closed, and after
        # Destroyed state changes are refused like after a requested stop.
        assert h.vm.calls[-1] == "shutdown" and "close" in h.backend.calls
        with pytest.raises(RequestDeniedError):
            h.driver.request_state(RequestKind.START)
        with pytest.raises(InstanceGoneError):
            await h.driver.replace_vcr(BID, f"{DEAD}->{LIVE}")

    run(body)


@pytest.fixture
def fast_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver_module, "REBOOT_SETTLE_S", 0.2)


@pytest.mark.usefixtures("fast_settle")
def test_guest_reset_publishes_rebooting_then_running() -> None:
    async def body() -> None:
        h = Harness()
        h.backend.targets[0] = LIVE
        h.driver.request_state(RequestKind.START)
        await h.wait_state(S.RUNNING)
        # The kernel's reset and SeaBIOS's warm-boot reset right after it are
        # one reboot: one Rebooting -> Running pair.
        h.vm.guest_reset()
        h.vm.guest_reset()
        assert await h.states_until(S.RUNNING) == [S.RUNNING, S.REBOOTING, S.RUNNING]
        # QEMU resets the machine itself on a guest reboot: no second reset.
        assert "reset" not in h.vm.calls
        h.vm.guest_reset()  # and again: the driver keeps listening
        assert await h.states_until(S.RUNNING) == [S.RUNNING, S.REBOOTING, S.RUNNING]
        h.vm.guest_poweroff()
        await h.wait_state(S.DESTROYED)

    run(body)


@pytest.mark.usefixtures("fast_settle")
def test_firmware_reset_after_a_host_reboot_is_part_of_it() -> None:
    async def body() -> None:
        h = Harness()
        h.backend.targets[0] = LIVE
        h.driver.request_state(RequestKind.START)
        await h.wait_state(S.RUNNING)
        h.driver.request_state(RequestKind.REBOOT)
        await h.wait_state(S.REBOOTING)
        h.vm.guest_reset()  # SeaBIOS's own reset on the warm boot
        assert await h.states_until(S.RUNNING) == [S.REBOOTING, S.RUNNING]
        assert [s.state for s in h.driver.monitor.history].count(S.REBOOTING) == 1
        # A poweroff while a reboot settles still stops the instance.
        h.driver.request_state(RequestKind.REBOOT)
        await h.wait_state(S.REBOOTING)
        h.vm.guest_poweroff()
        assert await h.states_until(S.DESTROYED) == [S.REBOOTING, S.STOPPING, S.STOPPED, S.DESTROYED]

    run(body)


def test_an_nmi_reaches_the_vm_only_while_running() -> None:
    async def body() -> None:
        h = Harness()
        with pytest.raises(NotRunningError, match="is Creating: an NMI needs a Running instance"):
            await h.driver.inject_nmi()
        h.driver.request_state(RequestKind.START)
        await h.wait_state(S.STARTING)
        with pytest.raises(NotRunningError, match="is Starting"):
            await h.driver.inject_nmi()
        assert "nmi" not in h.vm.calls
        await asyncio.wait_for(h.driver.replace_vcr(BID, f"{DEAD}->{LIVE}"), DEADLINE_S)
        await h.wait_state(S.RUNNING)
        await h.driver.inject_nmi()
        assert h.vm.calls.count("nmi") == 1
        h.driver.request_state(RequestKind.STOP)
        await h.wait_state(S.DESTROYED)
        with pytest.raises(NotRunningError, match="is Destroyed"):
            await h.driver.inject_nmi()
        assert h.vm.calls.count("nmi") == 1

    run(body)
