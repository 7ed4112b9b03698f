"""The per-instance state driver (asyncio task), after Propolis PR 873.

The driver is the only code that changes the instance: HTTP handlers put
requests on the :class:`RequestQueue` and the driver serves them. During
startup it waits on BOTH "block backends activated" and "next request", so a
VCR replacement can unblock a stuck activation and a stop can abort it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sut import regressions as table
from sut.server.backends import BlockBackend, ReplacementRejectedError
from sut.server.migration import (
    FailureInjector,
    Link,
    MigratableVm,
    MigrationError,
    MigrationPhase,
    MigrationStatus,
    SerialSnapshot,
    abandon,
    run_export,
    run_import,
)
from sut.server.qemu import GuestEvent
from sut.server.regressions import NO_REGRESSIONS, Regressions
from sut.server.request_queue import (
    DenyReason,
    QueuedRequest,
    QueueRegressions,
    RequestDeniedError,
    RequestKind,
    RequestQueue,
)
from sut.server.states import InstanceState, StateMonitor, StateSnapshot

__all__ = [
    "InstanceGoneError",
    "NoSuchBackendError",
    "RequestDeniedError",
    "StateDriver",
    "Vm",
]


# How long a reboot waits for follow-up resets before it publishes Running
# (SeaBIOS's own warm-boot reset comes within ~100 ms under TCG).
REBOOT_SETTLE_S = 1.0


class Vm(Protocol):
    """What the driver needs from a VM process (``QemuVm``, or a fake in unit tests)."""

    async def launch(self) -> None: ...

    async def cont(self) -> None: ...

    async def reset(self) -> None: ...

    async def nmi(self) -> None: ...

    async def wait_exit(self) -> int: ...

    async def guest_event(self) -> GuestEvent: ...

    async def shutdown(self) -> None: ...


class InstanceGoneError(Exception):
    """The VM was destroyed before the request was handled (HTTP 410)."""


class NoSuchBackendError(KeyError):
    """No disk has this backend id (HTTP 404)."""


class NotRunningError(Exception):
    """The request needs running vCPUs (an NMI); the instance has none (HTTP 400)."""


@dataclass
class _Replacement:
    backend_id: str
    vcr_json: str
    answer: asyncio.Future[str]


@dataclass
class _MigrateOut:
    migration_id: uuid.UUID
    link: Link
    # True once the target runs the guest, False when the migration failed (the guest runs here).
    answer: asyncio.Future[bool]


@dataclass
class MigrationSetup:
    """What the driver needs to migrate: the instance's spec as a source sends it, its
    serial console, its failure injector; ``incoming`` for a migration target."""

    spec_json: dict[str, Any]
    snapshot_serial: Callable[[], SerialSnapshot]
    take_serial: Callable[[SerialSnapshot], None]
    injector: FailureInjector = field(default_factory=FailureInjector)
    status: MigrationStatus = field(default_factory=MigrationStatus)
    incoming: tuple[uuid.UUID, Link] | None = None


# How long server shutdown waits for a driver that reads no stop until its activation ends
# (the blocking-start and stop-ignored-while-starting regressions) before cancelling it.
STOPS_UNREAD_GRACE_S = 2.0

# A migration target activates its Crucible disks after the source has let go of them; the
# downstairs answer at once then, so this bounds a hand-over that went wrong.
HANDOVER_ACTIVATION_TIMEOUT_S = 120.0


class _StartupAborted(Exception):
    """A stop was served during startup; the instance is already torn down."""


class StateDriver:
    def __init__(
        self,
        *,
        backends: dict[str, BlockBackend],
        vm_factory: Callable[[], Vm],
        regressions: Regressions = NO_REGRESSIONS,
        logger: logging.Logger | None = None,
        on_destroyed: Callable[[], Awaitable[None]] | None = None,
        migration: MigrationSetup | None = None,
    ) -> None:
        self._backends = backends
        self._vm_factory = vm_factory
        self._vm: Vm | None = None
        self._vcpus_started = False
        self._regressions = regressions
        self._log = logger or logging.getLogger(__name__)
        self._on_destroyed = on_destroyed
        self.monitor = StateMonitor()
        self.migration = migration
        self._queue: RequestQueue[_Replacement | _MigrateOut] = RequestQueue(
            QueueRegressions(
                vcr_denied_while_starting=regressions.enabled(table.VCR_DENIED_WHILE_STARTING),
                vcr_denied_after_stop=regressions.enabled(table.VCR_DENIED_AFTER_STOP),
            )
        )
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # True while the driver reads no stop from its queue (only the blocking-start and
        # stop-ignored-while-starting regressions do that, until activation ends).
        self._stops_unread = False

    # -- API side -------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="state-driver")

    @property
    def state(self) -> StateSnapshot:
        return self.monitor.current

    @property
    def destroyed(self) -> bool:
        return self.monitor.current.state is InstanceState.DESTROYED

    def request_state(self, kind: RequestKind) -> None:
        """Queue Start/Stop/Reboot; raises RequestDeniedError (403) when denied."""
        if not kind.is_state_change:
            raise ValueError(f"{kind} is not a state change")
        self._queue.try_queue(kind)
        self._wakeup.set()

    async def replace_vcr(self, backend_id: str, vcr_json: str) -> str:
        """Queue a VCR replacement and wait for the driver to apply it."""
        if backend_id not in self._backends:
            raise NoSuchBackendError(backend_id)
        if self._queue.state.terminal:
            raise InstanceGoneError("the instance has stopped; nothing to replace")
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.try_queue(RequestKind.REPLACE, _Replacement(backend_id, vcr_json, answer))
        self._wakeup.set()
        return await answer

    async def migrate_out(self, migration_id: uuid.UUID, link: Link) -> bool:
        """Queue a migration out over ``link`` (a target connected) and wait until it ended:
        True if the target runs the guest now. Raises RequestDeniedError when the instance
        cannot migrate (not running, stopping, already migrating)."""
        if self.migration is None:
            raise RequestDeniedError(RequestKind.MIGRATE_OUT, DenyReason.NOT_STARTED)
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.try_queue(RequestKind.MIGRATE_OUT, _MigrateOut(migration_id, link, answer))
        self._wakeup.set()
        return await answer

    async def inject_nmi(self) -> None:
        """An NMI to the guest (QMP inject-nmi); only while Running."""
        vm = self._vm
        state = self.monitor.current.state
        if vm is None or state is not InstanceState.RUNNING:
            raise NotRunningError(f"the instance is {state}: an NMI needs a Running instance")
        await vm.nmi()

    def backend_status(self, backend_id: str) -> dict[str, object]:
        backend = self._backends.get(backend_id)
        if backend is None:
            raise NoSuchBackendError(backend_id)
        return backend.status()

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Server shutdown: stop the instance through the queue, then force it."""
        if self._task is None or self._task.done():
            await self.monitor.release_waiters()
            return
        self.request_state(RequestKind.STOP)  # never denied: ignored when pending or terminal
        if self._stops_unread:
            # The stop is read only once activation ends: an activation about to end gets a
            # moment; waiting longer for one that never ends only delayed the process's end
            # (each VM of those regressions' catching tests waited out the 10 s).
            timeout_s = min(timeout_s, STOPS_UNREAD_GRACE_S)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            # blocking-start never reads the stop: cancelling still cleans up.
            self._log.warning("state driver did not stop in time; cancelling it")
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.monitor.release_waiters()

    # -- driver task ------------------------------------------------------------

    async def _publish(self, state: InstanceState) -> None:
        snapshot = await self.monitor.publish(state)
        self._log.info("instance state", extra={"state": str(state), "gen": snapshot.gen})

    async def _ready(self, *, state_changes: bool = True) -> None:
        # Only waits; the caller pops synchronously afterwards, so cancelling
        # this wait can never lose a request.
        while not self._queue.has_ready(state_changes=state_changes):
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _run(self) -> None:
        final = InstanceState.DESTROYED
        try:
            final = await self._serve()
        except asyncio.CancelledError:
            self._log.warning("state driver cancelled; tearing the instance down")
            raise
        except Exception as exc:  # noqa: BLE001 - any driver error means the VM failed
            self._log.exception("instance failed", extra={"error": repr(exc)})
            final = InstanceState.FAILED
        finally:
            await self._teardown(final)

    async def _serve(self) -> InstanceState:
        if self.migration is not None and self.migration.incoming is not None:
            # A migration target starts at once: its guest is already running elsewhere.
            self._queue.try_queue(RequestKind.START)
            self._queue.pop()
            try:
                await self._migrate_in(*self.migration.incoming)
            except _StartupAborted:
                return InstanceState.DESTROYED
            return await self._serve_running()
        # Creating: nothing runs until a Start (or a Stop) arrives.
        while True:
            await self._ready()
            request = self._queue.pop()
            assert request is not None
            if request.kind is RequestKind.STOP:
                return InstanceState.DESTROYED  # no QEMU was ever launched
            if request.kind is RequestKind.START:
                break
            await self._apply(request)
        try:
            await self._startup()
        except _StartupAborted:
            return InstanceState.DESTROYED
        return await self._serve_running()

    async def _startup(self) -> None:
        await self._publish(InstanceState.STARTING)
        for backend in self._backends.values():
            await backend.start_export()
        self._vm = self._vm_factory()
        await self._vm.launch()
        activation = asyncio.create_task(self._activate_all(), name="activate-backends")
        try:
            if self._regressions.enabled(table.BLOCKING_START):
                # REGRESSION blocking-start (Propolis issue 841): the driver
                # awaited "start block backends" before reading its queue, so
                # a corrected VCR or a stop queued behind an activation that
                # can never finish was never read: a livelock.
                self._stops_unread = True
                try:
                    await activation
                finally:
                    self._stops_unread = False
            else:
                await self._serve_during_activation(activation)
            activation.result()  # re-raises ActivationFatalError -> Failed
        finally:
            if not activation.done():
                activation.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await activation
        await self._vm.cont()
        self._vcpus_started = True
        self._queue.notify_running()
        await self._publish(InstanceState.RUNNING)

    async def _migrate_in(self, migration_id: uuid.UUID, link: Link) -> None:
        """Receive the guest from the source; on return it runs here (Running). A stop
        served meanwhile abandons the migration (the source runs on) and raises
        _StartupAborted, the instance already torn down."""
        try:
            await self._import(migration_id, link)
        except BaseException as exc:
            # Whatever ended the import here, the source must hear of it now rather than
            # wait out its step timeout (run_import tells it too when it got that far).
            reason = "the target was stopped" if isinstance(exc, _StartupAborted) else str(exc) or repr(exc)
            await abandon(link, f"the migration in ended: {reason}")
            raise

    async def _import(self, migration_id: uuid.UUID, link: Link) -> None:
        setup = self.migration
        assert setup is not None
        await self._publish(InstanceState.MIGRATING)
        for backend in self._backends.values():
            await backend.start_export()
        self._vm = self._vm_factory()
        await self._vm.launch()
        vm = self._vm
        if not isinstance(vm, MigratableVm):
            raise MigrationError("this VM cannot migrate (no QMP)")

        async def resume() -> None:
            # The source's QEMU completed: its guest is paused for good and its disks are
            # flushed. Activating ours now (Crucible: at the replacement VCR's higher
            # generation) fences the source's upstairs before our vCPUs run.
            # A downstairs that keeps refusing our promote fails this at once: the source
            # still holds the disk at our generation or above (say, a replacement VCR that
            # was not applied), and waiting cannot change that.
            async with asyncio.timeout(HANDOVER_ACTIVATION_TIMEOUT_S):
                await self._activate_all(handover=True)
            await vm.cont()
            self._vcpus_started = True

        importing = asyncio.create_task(run_import(
            vm=vm, link=link, migration_id=migration_id, status=setup.status, injector=setup.injector,
            take_serial=setup.take_serial, resume=resume, log=self._log), name="migrate-in")
        exited = asyncio.create_task(self._vm.wait_exit(), name="qemu-exit")
        try:
            while not (importing.done() or exited.done()):
                # The queue is served meanwhile, as during a start: a stop abandons the
                # migration, a VCR replacement goes to the pending backend.
                ready = asyncio.create_task(self._ready())
                try:
                    await asyncio.wait({importing, exited, ready}, return_when="FIRST_COMPLETED")
                finally:
                    ready.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await ready
                if importing.done() or exited.done():
                    break
                request = self._queue.pop()
                assert request is not None  # ready: has_ready() held, and only we pop
                if request.kind is RequestKind.STOP:
                    self._log.info("stop requested during the migration in; abandoning it")
                    importing.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await importing
                    setup.status.set("in", migration_id, MigrationPhase.ERROR)
                    await self._stop_vm()
                    raise _StartupAborted
                await self._apply(request)
            if not importing.done():
                # QEMU ends an incoming migration that failed by exiting; the control
                # connection usually says why first. Give it a moment to.
                await asyncio.wait({importing}, timeout=5.0)
            if not importing.done():
                importing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await importing
                raise MigrationError(f"QEMU exited during the migration in (code {exited.result()})")
            importing.result()
        finally:
            for task in (importing, exited):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._queue.notify_running()
        await self._publish(InstanceState.RUNNING)

    async def _migrate_out(self, request: _MigrateOut) -> bool:
        """Migrate the guest to the target on ``request.link``; True when it runs there. On
        False the export failed and the guest runs here again (still Migrating: the caller
        publishes what comes next)."""
        setup = self.migration
        vm = self._vm
        assert setup is not None and vm is not None
        await self._publish(InstanceState.MIGRATING)
        try:
            if not isinstance(vm, MigratableVm):
                raise MigrationError("this VM cannot migrate (no QMP)")
            await run_export(vm=vm, link=request.link, migration_id=request.migration_id,
                             spec_json=setup.spec_json, status=setup.status, injector=setup.injector,
                             serial=setup.snapshot_serial, log=self._log)
        except MigrationError as exc:
            self._log.warning("migration out failed; the guest runs on here", extra={"error": str(exc)})
            self._queue.notify_migration_failed()
            migrated = False
        else:
            migrated = True
        if not request.answer.done():
            request.answer.set_result(migrated)
        return migrated

    async def _serve_during_activation(self, activation: asyncio.Task[None]) -> None:
        assert self._vm is not None
        # REGRESSION stop-ignored-while-starting: stops stay queued until
        # startup ends (the pre-873 behaviour); replacements are still served.
        serve_stops = not self._regressions.enabled(table.STOP_IGNORED_WHILE_STARTING)
        self._stops_unread = not serve_stops
        exited = asyncio.create_task(self._vm.wait_exit(), name="qemu-exit")
        try:
            while not activation.done():
                ready = asyncio.create_task(self._ready(state_changes=serve_stops))
                try:
                    await asyncio.wait({activation, ready, exited}, return_when="FIRST_COMPLETED")
                finally:
                    ready.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await ready
                if activation.done():
                    return
                if exited.done():
                    raise RuntimeError(f"QEMU exited during startup (code {exited.result()})")
                request = self._queue.pop(state_changes=serve_stops)
                assert request is not None  # ready: has_ready() held, and only we pop
                if request.kind is RequestKind.STOP:
                    self._log.info("stop requested during startup; aborting activation")
                    activation.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await activation
                    await self._stop_vm()
                    raise _StartupAborted
                await self._apply(request)
        finally:
            self._stops_unread = False
            exited.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await exited

    async def _activate_all(self, *, handover: bool = False) -> None:
        # A TaskGroup cancels the other activations when one fails fatally.
        async with asyncio.TaskGroup() as group:
            for backend in self._backends.values():
                group.create_task(backend.activate(handover=handover), name=f"activate-{backend.backend_id}")

    async def _serve_running(self) -> InstanceState:
        assert self._vm is not None
        exited = asyncio.create_task(self._vm.wait_exit(), name="qemu-exit")
        guest = asyncio.create_task(self._vm.guest_event(), name="guest-event")
        try:
            while True:
                ready = asyncio.create_task(self._ready())
                try:
                    await asyncio.wait({ready, exited, guest}, return_when="FIRST_COMPLETED")
                finally:
                    ready.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await ready
                if exited.done():
                    self._log.error("QEMU exited unexpectedly", extra={"exit_code": exited.result()})
                    return InstanceState.FAILED
                # A poweroff is handled at once (nothing queued can apply to a machine that
                # is off); a reset waits behind queued requests, so a guest that resets
                # over and over cannot keep a Stop from being served.
                if guest.done() and (guest.result() is GuestEvent.POWEROFF or not self._queue.has_ready()):
                    event = guest.result()
                    guest = asyncio.create_task(self._vm.guest_event(), name="guest-event")
                    if event is GuestEvent.RESET:
                        # The guest rebooted itself; QEMU already reset the machine.
                        self._log.info("guest-initiated reboot")
                        await self._publish(InstanceState.REBOOTING)
                        guest = await self._settle_after_reset(guest)
                        if not guest.done():
                            await self._publish(InstanceState.RUNNING)
                        continue
                    # The guest powered itself off: an orderly stop, as if a
                    # Stop had been requested, so the queue answers as it does then
                    # (a Reboot now is refused; queued requests get 410).
                    self._log.info("guest powered off")
                    self._queue.try_queue(RequestKind.STOP)  # never denied (see shutdown)
                    await self._publish(InstanceState.STOPPING)
                    await self._stop_vm()
                    return InstanceState.DESTROYED
                request = self._queue.pop()
                assert request is not None  # ready (or a reset while has_ready()): see above
                if request.kind is RequestKind.STOP:
                    await self._publish(InstanceState.STOPPING)
                    await self._stop_vm()
                    return InstanceState.DESTROYED
                if request.kind is RequestKind.MIGRATE_OUT:
                    assert isinstance(request.payload, _MigrateOut)
                    migrated = await self._migrate_out(request.payload)
                    if migrated and self._regressions.enabled(table.SOURCE_RUNS_AFTER_MIGRATION):
                        # REGRESSION source-runs-after-migration: the source resumed its
                        # guest after the hand-over, so two copies of it ran.
                        await self._vm.cont()
                        self._queue.notify_migration_failed()
                        migrated = False
                    elif not migrated and self._regressions.enabled(table.FAILED_MIGRATION_STOPS_SOURCE):
                        # REGRESSION failed-migration-stops-source: a failed export tore the
                        # source down, and the guest with it.
                        migrated = True
                    if migrated:
                        # The guest runs on the target now: this instance is done.
                        await self._stop_vm()
                        return InstanceState.DESTROYED
                    await self._publish(InstanceState.RUNNING)
                    continue
                if request.kind is RequestKind.REBOOT:
                    await self._publish(InstanceState.REBOOTING)
                    await self._vm.reset()
                    guest = await self._settle_after_reset(guest)
                    self._queue.notify_running()
                    if not guest.done():
                        await self._publish(InstanceState.RUNNING)
                    continue
                await self._apply(request)
        finally:
            for task in (exited, guest):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _settle_after_reset(self, guest: asyncio.Task[GuestEvent]) -> asyncio.Task[GuestEvent]:
        """Absorb the burst of resets that one reboot causes; returns the pending event task.

        SeaBIOS resets the machine once more on every warm boot (a "hard
        reboot" after it finds that POST already ran), and a kernel may try
        several reset methods in a row. Those are all one reboot: it is over
        once no further reset came for REBOOT_SETTLE_S. A poweroff in the
        window is left in the returned (done) task for the caller to handle.
        """
        assert self._vm is not None
        while True:
            ready = asyncio.create_task(self._ready())
            try:
                await asyncio.wait({guest, ready}, timeout=REBOOT_SETTLE_S,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ready
            if guest.done() and guest.result() is GuestEvent.RESET:
                self._log.info("reset absorbed into the current reboot")
                guest = asyncio.create_task(self._vm.guest_event(), name="guest-event")
                if not self._queue.has_ready():
                    continue
            # Settled (no reset for the window), or a poweroff (left in the done task), or a
            # queued request: the reboot is over and the request (a Stop, say) is served
            # next, even while a guest in a reset loop keeps sending resets.
            return guest

    async def _apply(self, request: QueuedRequest[_Replacement | _MigrateOut]) -> None:
        # Only replacements get here (a Stop, a Start, a Reboot or a migration out is served by
        # the caller; the queue ignores duplicate Starts and denies migrations until Running).
        replacement = request.payload
        assert isinstance(replacement, _Replacement)
        if replacement.answer.done():
            return  # the HTTP caller went away
        backend = self._backends[replacement.backend_id]
        self._log.info("applying VCR replacement", extra={"backend_id": backend.backend_id})
        answer = replacement.answer
        try:
            result = await backend.replace(replacement.vcr_json)
        except ReplacementRejectedError as exc:
            outcome: BaseException | str = exc
        except Exception as exc:  # noqa: BLE001 - handed to the HTTP caller, not lost
            self._log.exception("VCR replacement failed", extra={"error": repr(exc)})
            outcome = exc
        else:
            self._log.info("VCR replacement applied", extra={"result": result})
            outcome = result
        # The caller may have gone while the backend worked (a client timeout, or uvicorn
        # cancelling handlers at shutdown): its answer is then already cancelled, and the
        # replacement stays applied; that must not fail the instance.
        if answer.done():
            return
        if isinstance(outcome, BaseException):
            answer.set_exception(outcome)
        else:
            answer.set_result(outcome)

    async def _stop_vm(self) -> None:
        """Quit QEMU and close backends; publishes Stopped (Destroyed comes last)."""
        await self._release_vm_and_backends()
        for leftover in self._queue.notify_stopped():
            _answer_gone(leftover)
        await self._publish(InstanceState.STOPPED)

    async def _release_vm_and_backends(self) -> None:
        if not self._vcpus_started:
            # QEMU flushes its disks on quit; an export that is not active
            # holds that flush forever. No vCPU ever ran, so no guest data is
            # at stake: close the backends first and QEMU's flush fails fast.
            await self._close_backends()
        if self._vm is not None:
            await self._vm.shutdown()
        await self._close_backends()  # idempotent; after QEMU flushed when it ran

    async def _close_backends(self) -> None:
        for backend in self._backends.values():
            try:
                await backend.close()
            except Exception as exc:  # noqa: BLE001 - teardown goes on past one failure
                self._log.exception("closing backend failed", extra={"error": repr(exc)})

    async def _teardown(self, final: InstanceState) -> None:
        # Runs on success, failure and cancellation; every step is idempotent.
        try:
            await self._release_vm_and_backends()
        finally:
            leftovers = (
                self._queue.notify_failed() if final is InstanceState.FAILED else self._queue.notify_stopped()
            )
            for leftover in leftovers:
                _answer_gone(leftover)
            if self.monitor.current.state is not final:
                if final is InstanceState.DESTROYED and (
                    self.monitor.current.state is not InstanceState.STOPPED
                ):
                    await self._publish(InstanceState.STOPPED)
                await self._publish(final)
            if self._on_destroyed is not None:
                await self._on_destroyed()


def _answer_gone(request: QueuedRequest[_Replacement | _MigrateOut]) -> None:
    if isinstance(request.payload, _MigrateOut):
        if not request.payload.answer.done():
            request.payload.answer.set_result(False)
        return
    if request.payload is not None and not request.payload.answer.done():
        request.payload.answer.set_exception(
            InstanceGoneError("the VM was destroyed before this request was handled")
        )
