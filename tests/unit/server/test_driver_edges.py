"""The state driver's edges (issue 14: tests that a mutant of driver.py fails).

test_driver.py follows the lifecycle; these pin what a changed line there would break
without changing a published state: the order of QEMU's quit and the backends' close, the
regression switches handed to the queue, the texts of the errors and log records, the names
of the tasks (what `asyncio.all_tasks()` shows when a run hangs), and teardown going on past
fakes that fail while they are being cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from sut.server import driver as driver_module
from sut.server.driver import InstanceGoneError, NoSuchBackendError, StateDriver
from sut.server.qemu import GuestEvent
from sut.server.regressions import Regressions
from sut.server.request_queue import DenyReason, QueueState, RequestDeniedError, RequestKind
from sut.server.states import InstanceState as S

from .fakes import FakeBackend, FakeVm

DEAD, LIVE, OTHER = "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"
BID = "d0-backend"
DEADLINE_S = 5.0
LOGGER = "sut.server.driver"


class OrderedBackend(FakeBackend):
    """Writes its close into the shared event list, beside the VM's calls."""

    def __init__(self, events: list[str], *, healthy: bool) -> None:
        super().__init__(BID, [LIVE if healthy else DEAD, OTHER], good_target=LIVE)
        self.events = events

    async def close(self) -> None:
        self.events.append("backend:close")
        await super().close()


class CancelRaisingBackend(OrderedBackend):
    """An activation that fails while it is being cancelled (a connection torn down under it)."""

    async def activate(self, *, handover: bool = False) -> None:
        try:
            await super().activate(handover=handover)
        except asyncio.CancelledError:
            raise RuntimeError("activation broke while cancelled") from None


class CancelRaisingVm(FakeVm):
    """A VM whose event waits fail when cancelled (QMP closing under them)."""

    async def wait_exit(self) -> int:
        try:
            return await super().wait_exit()
        except asyncio.CancelledError:
            raise ConnectionError("QMP closed while waiting for the exit") from None

    async def guest_event(self) -> GuestEvent:
        try:
            return await super().guest_event()
        except asyncio.CancelledError:
            raise ConnectionError("QMP closed while waiting for a guest event") from None


class Rig:
    """A driver over one backend and one VM class, with every VM call and close in order."""

    def __init__(self, *regressions: str, healthy: bool = False,
                 backend_cls: type[OrderedBackend] = OrderedBackend, vm_cls: type[FakeVm] = FakeVm,
                 on_destroyed: Callable[[], Awaitable[None]] | None = None) -> None:
        self.events: list[str] = []
        self.backend = backend_cls(self.events, healthy=healthy)
        self.vms: list[FakeVm] = []
        self.vm_cls = vm_cls
        self.driver = StateDriver(backends={BID: self.backend}, vm_factory=self._make_vm,
                                  regressions=Regressions(frozenset(regressions)), on_destroyed=on_destroyed)

    def _make_vm(self) -> FakeVm:
        vm = self.vm_cls(on_call=lambda name: self.events.append(f"vm:{name}"))
        self.vms.append(vm)
        return vm

    @property
    def vm(self) -> FakeVm:
        (vm,) = self.vms
        return vm

    def start(self) -> None:
        self.driver.start()
        self.driver.request_state(RequestKind.START)

    async def reach(self, state: S) -> None:
        async def follow() -> None:
            gen = 0
            while True:
                snapshot = await self.driver.monitor.wait_for_gen(gen + 1)
                if snapshot.state is state:
                    return
                if snapshot.state.final or snapshot.gen == gen:
                    raise AssertionError(f"reached {snapshot.state}, never {state}")
                gen = snapshot.gen

        await asyncio.wait_for(follow(), DEADLINE_S)

    def states(self) -> list[S]:
        return [s.state for s in self.driver.monitor.history]


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


def driver_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in driver_records(caplog)]


def record(caplog: pytest.LogCaptureFixture, message: str) -> logging.LogRecord:
    found = [r for r in driver_records(caplog) if r.getMessage() == message]
    assert len(found) == 1, f"{message!r} logged {len(found)} times; the driver logged {messages(caplog)}"
    return found[0]


def task_names() -> set[str]:
    return {t.get_name() for t in asyncio.all_tasks()}


@pytest.fixture(autouse=True)
def _driver_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)


# --- QEMU's quit and the backends' close ----------------------------------------------------------
def test_a_stop_during_startup_closes_the_backends_before_qemu_quits() -> None:
    """No vCPU ran, so no guest data is at stake: an export that never activated must not
    hold QEMU's flush on quit."""

    async def body() -> None:
        rig = Rig()
        rig.start()
        await rig.reach(S.STARTING)
        rig.driver.request_state(RequestKind.STOP)
        await rig.reach(S.DESTROYED)
        assert rig.events[:2] == ["vm:launch", "backend:close"]
        assert rig.events.index("backend:close") < rig.events.index("vm:shutdown")
        assert "vm:cont" not in rig.events

    run(body)


def test_a_stop_while_running_lets_qemu_flush_before_the_backends_close() -> None:
    async def body() -> None:
        rig = Rig(healthy=True)
        rig.start()
        await rig.reach(S.RUNNING)
        rig.driver.request_state(RequestKind.STOP)
        await rig.reach(S.DESTROYED)
        # (the teardown repeats both, idempotent, after Stopped)
        assert rig.events[:4] == ["vm:launch", "vm:cont", "vm:shutdown", "backend:close"]

    run(body)


def test_on_destroyed_runs_once_after_the_final_state() -> None:
    async def body() -> None:
        seen: list[S] = []

        async def on_destroyed() -> None:
            seen.append(rig.driver.state.state)

        rig = Rig(healthy=True, on_destroyed=on_destroyed)
        rig.start()
        await rig.reach(S.RUNNING)
        rig.driver.request_state(RequestKind.STOP)
        await rig.reach(S.DESTROYED)
        await rig.driver.shutdown()
        assert seen == [S.DESTROYED]

    run(body)


# --- the regression switches reach the queue ------------------------------------------------------
def test_vcr_denied_while_starting_switch_refuses_a_replacement_while_starting() -> None:
    async def body() -> None:
        rig = Rig("vcr-denied-while-starting")
        rig.start()
        await rig.reach(S.STARTING)
        with pytest.raises(RequestDeniedError) as info:
            await rig.driver.replace_vcr(BID, f"{DEAD}->{LIVE}")
        assert info.value.reason is DenyReason.NOT_RUNNING
        await rig.driver.shutdown()

    run(body)


def test_vcr_denied_after_stop_switch_refuses_a_replacement_behind_a_stop() -> None:
    async def body() -> None:
        # stop-ignored-while-starting keeps the stop queued while activation waits
        rig = Rig("stop-ignored-while-starting", "vcr-denied-after-stop")
        rig.start()
        await rig.reach(S.STARTING)
        rig.driver.request_state(RequestKind.STOP)
        with pytest.raises(RequestDeniedError) as info:
            await rig.driver.replace_vcr(BID, f"{DEAD}->{LIVE}")
        assert info.value.reason is DenyReason.STOP_PENDING
        rig.backend.heal()  # startup ends; the deferred stop is served then
        await rig.reach(S.DESTROYED)

    run(body)


# --- errors and log records, word for word ---------------------------------------------------------
def test_api_errors_name_what_went_wrong() -> None:
    async def body() -> None:
        rig = Rig(healthy=True)
        with pytest.raises(ValueError) as bad_kind:
            rig.driver.request_state(RequestKind.REPLACE)
        assert str(bad_kind.value) == f"{RequestKind.REPLACE} is not a state change"
        with pytest.raises(NoSuchBackendError) as unknown:
            await rig.driver.replace_vcr("nope-backend", "x->y")
        assert unknown.value.args == ("nope-backend",)
        assert rig.driver.backend_status(BID) == {"targets": [LIVE, OTHER]}
        with pytest.raises(NoSuchBackendError) as unknown:
            rig.driver.backend_status("other-backend")
        assert unknown.value.args == ("other-backend",)
        rig.start()
        await rig.reach(S.RUNNING)
        rig.driver.request_state(RequestKind.STOP)
        await rig.reach(S.DESTROYED)
        with pytest.raises(InstanceGoneError) as gone:
            await rig.driver.replace_vcr(BID, f"{OTHER}->127.0.0.1:5")
        assert str(gone.value) == "the instance has stopped; nothing to replace"

    run(body)


def test_a_replacement_left_in_the_queue_is_told_the_vm_is_gone() -> None:
    async def body() -> None:
        rig = Rig()
        rig.start()
        await rig.reach(S.STARTING)
        rig.driver.request_state(RequestKind.STOP)
        pending = asyncio.create_task(rig.driver.replace_vcr(BID, f"{DEAD}->{LIVE}"))
        with pytest.raises(InstanceGoneError) as gone:
            await asyncio.wait_for(pending, DEADLINE_S)
        assert str(gone.value) == "the VM was destroyed before this request was handled"

    run(body)


def test_a_replacement_is_logged_with_its_backend_and_result(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        rig = Rig()
        rig.start()
        await rig.reach(S.STARTING)
        assert await rig.driver.replace_vcr(BID, f"{DEAD}->{LIVE}") == "started"
        await rig.reach(S.RUNNING)
        await rig.driver.shutdown()

    run(body)
    assert record(caplog, "applying VCR replacement").backend_id == BID  # type: ignore[attr-defined]
    assert record(caplog, "VCR replacement applied").result == "started"  # type: ignore[attr-defined]
    published = [(r.state, r.gen) for r in driver_records(caplog)  # type: ignore[attr-defined]
                 if r.getMessage() == "instance state"]
    assert published == [("Starting", 2), ("Running", 3), ("Stopping", 4), ("Stopped", 5), ("Destroyed", 6)]


def test_a_backend_error_goes_to_the_caller_and_the_instance_lives_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        rig = Rig(healthy=True)
        broken = OSError("the backend's socket is gone")

        async def replace(new_vcr_json: str) -> str:
            raise broken

        rig.backend.replace = replace  # type: ignore[method-assign]
        rig.start()
        await rig.reach(S.RUNNING)
        with pytest.raises(OSError) as info:
            await rig.driver.replace_vcr(BID, f"{OTHER}->127.0.0.1:5")
        assert info.value is broken
        assert rig.driver.state.state is S.RUNNING
        await rig.driver.shutdown()

    run(body)
    failed = record(caplog, "VCR replacement failed")
    assert failed.levelno == logging.ERROR and failed.exc_info is not None
    assert failed.error == repr(OSError("the backend's socket is gone"))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("backend_cls", "code"),
    # the second backend raises when its activation is cancelled: that must not hide why
    [(OrderedBackend, 1), (CancelRaisingBackend, 3)], ids=["backend", "backend-raising-on-cancel"],
)
def test_qemu_exiting_during_startup_fails_the_instance_and_says_so(
    caplog: pytest.LogCaptureFixture, backend_cls: type[OrderedBackend], code: int
) -> None:
    async def body() -> None:
        rig = Rig(backend_cls=backend_cls)
        rig.start()
        await rig.reach(S.STARTING)
        rig.vm.crash(code)
        await rig.reach(S.FAILED)
        assert rig.backend.activation_cancelled
        assert "vm:cont" not in rig.events and "backend:close" in rig.events

    run(body)
    failed = record(caplog, "instance failed")
    assert failed.error == repr(RuntimeError(f"QEMU exited during startup (code {code})"))  # type: ignore[attr-defined]


def test_qemu_exiting_while_running_is_logged_with_its_exit_code(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        rig = Rig(healthy=True)
        rig.start()
        await rig.reach(S.RUNNING)
        rig.vm.crash(139)
        await rig.reach(S.FAILED)

    run(body)
    exited = record(caplog, "QEMU exited unexpectedly")
    assert (exited.levelno, exited.exit_code) == (logging.ERROR, 139)  # type: ignore[attr-defined]


def test_stop_during_startup_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        rig = Rig()
        rig.start()
        await rig.reach(S.STARTING)
        rig.driver.request_state(RequestKind.STOP)
        await rig.reach(S.DESTROYED)

    run(body)
    assert record(caplog, "stop requested during startup; aborting activation").levelno == logging.INFO


@pytest.fixture
def fast_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver_module, "REBOOT_SETTLE_S", 0.2)


@pytest.mark.usefixtures("fast_settle")
def test_guest_reboots_and_poweroff_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        rig = Rig(healthy=True)
        rig.start()
        await rig.reach(S.RUNNING)
        rig.vm.guest_reset()
        rig.vm.guest_reset()  # the firmware's reset right after: absorbed
        await rig.reach(S.REBOOTING)
        await rig.reach(S.RUNNING)
        rig.vm.guest_poweroff()
        await rig.reach(S.DESTROYED)

    run(body)
    assert [m for m in messages(caplog) if m != "instance state"] == [
        "guest-initiated reboot", "reset absorbed into the current reboot", "guest powered off",
    ]


# --- task names: what a hung run's task dump shows -----------------------------------------------
def test_the_driver_names_its_tasks_while_starting() -> None:
    async def body() -> None:
        rig = Rig()
        rig.start()
        await rig.reach(S.STARTING)
        await asyncio.sleep(0)  # let the activation start its per-backend task
        assert {"state-driver", "activate-backends", f"activate-{BID}", "qemu-exit"} <= task_names()
        await rig.driver.shutdown()

    run(body)


@pytest.mark.usefixtures("fast_settle")
@pytest.mark.parametrize("resets", [1, 2])
def test_the_driver_names_its_tasks_while_running(resets: int) -> None:
    async def body() -> None:
        rig = Rig(healthy=True)
        rig.start()
        await rig.reach(S.RUNNING)
        assert {"state-driver", "qemu-exit", "guest-event"} <= task_names()
        for _ in range(resets):  # the second one is absorbed by the settle loop's own wait
            rig.vm.guest_reset()
        await rig.reach(S.REBOOTING)
        await rig.reach(S.RUNNING)
        # the guest-event wait made after the reset (or by the settle loop after the second)
        assert [t.get_name() for t in asyncio.all_tasks()].count("guest-event") == 1
        await rig.driver.shutdown()

    run(body)


# --- waits that must not wait too long ------------------------------------------------------------
def test_a_stop_during_a_reboot_is_served_before_the_settle_window_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(driver_module, "REBOOT_SETTLE_S", 60.0)

    async def body() -> None:
        rig = Rig(healthy=True)
        rig.start()
        await rig.reach(S.RUNNING)
        rig.driver.request_state(RequestKind.REBOOT)
        await rig.reach(S.REBOOTING)
        rig.driver.request_state(RequestKind.STOP)
        await rig.reach(S.DESTROYED)  # within DEADLINE_S, not the 60 s window

    run(body)


# --- shutdown -------------------------------------------------------------------------------------
def test_shutdown_before_start_releases_long_polls() -> None:
    async def body() -> None:
        rig = Rig()
        poll = asyncio.create_task(rig.driver.monitor.wait_for_gen(5))
        await asyncio.sleep(0)
        await rig.driver.shutdown()
        snapshot = await asyncio.wait_for(poll, DEADLINE_S)
        assert snapshot.state is S.CREATING and rig.vms == []

    run(body)


def test_a_stuck_driver_is_cancelled_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        rig = Rig("blocking-start")
        rig.start()
        await rig.reach(S.STARTING)
        await rig.driver.shutdown(timeout_s=0.2)
        assert rig.driver.state.state is S.DESTROYED

    run(body)
    warning = record(caplog, "state driver did not stop in time; cancelling it")
    assert warning.levelno == logging.WARNING
    assert record(caplog, "state driver cancelled; tearing the instance down").levelno == logging.WARNING


# --- teardown goes on past fakes that fail while cancelled ------------------------------------------
def test_an_activation_failing_as_it_is_cancelled_does_not_hide_the_stop() -> None:
    async def body() -> None:
        rig = Rig(backend_cls=CancelRaisingBackend)
        rig.start()
        await rig.reach(S.STARTING)
        rig.driver.request_state(RequestKind.STOP)
        await rig.reach(S.DESTROYED)
        assert rig.states() == [S.CREATING, S.STARTING, S.STOPPED, S.DESTROYED]

    run(body)


def test_event_waits_failing_as_they_are_cancelled_do_not_fail_the_instance() -> None:
    async def body() -> None:
        rig = Rig(vm_cls=CancelRaisingVm)
        rig.start()
        await rig.reach(S.STARTING)
        rig.backend.heal()  # activation completes: the startup's exit wait is cancelled
        await rig.reach(S.RUNNING)
        rig.driver.request_state(RequestKind.STOP)  # the running loop's guest-event wait is cancelled
        await rig.reach(S.DESTROYED)
        assert rig.states() == [S.CREATING, S.STARTING, S.RUNNING, S.STOPPING, S.STOPPED, S.DESTROYED]

    run(body)


class CloseFailingBackend(OrderedBackend):
    async def close(self) -> None:
        await super().close()
        raise OSError("the export's socket would not close")


def test_a_backend_failing_to_close_is_logged_and_teardown_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        rig = Rig(healthy=True, backend_cls=CloseFailingBackend)
        rig.start()
        await rig.reach(S.RUNNING)
        rig.driver.request_state(RequestKind.STOP)
        await rig.reach(S.DESTROYED)
        assert rig.events[:4] == ["vm:launch", "vm:cont", "vm:shutdown", "backend:close"]

    run(body)
    failures = [r for r in driver_records(caplog) if r.getMessage() == "closing backend failed"]
    assert failures and all(r.levelno == logging.ERROR for r in failures)
    assert {r.error for r in failures} == {repr(OSError("the export's socket would not close"))}  # type: ignore[attr-defined]


@pytest.mark.parametrize(("end", "queue_state"), [("stop", QueueState.STOPPED), ("crash", QueueState.FAILED),
                                                   ("stop-while-creating", QueueState.STOPPED)])
def test_the_queue_ends_in_the_instance_s_terminal_state(end: str, queue_state: QueueState) -> None:
    """The queue keeps Propolis's distinction between an instance that stopped and one that
    failed (white box: the driver's API answers both the same way)."""

    async def body() -> None:
        rig = Rig(healthy=True)
        if end == "stop-while-creating":  # no QEMU: only the teardown tells the queue
            rig.driver.start()
            rig.driver.request_state(RequestKind.STOP)
            await rig.reach(S.DESTROYED)
            await rig.driver.shutdown()
            assert rig.driver._queue.state is queue_state
            return
        rig.start()
        await rig.reach(S.RUNNING)
        if end == "stop":
            rig.driver.request_state(RequestKind.STOP)
        else:
            rig.vm.crash()
        await rig.reach(S.DESTROYED if end == "stop" else S.FAILED)
        await rig.driver.shutdown()
        assert rig.driver._queue.state is queue_state

    run(body)
