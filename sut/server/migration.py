"""Live migration between two servers, on QEMU's own migration over a loopback socket.

Two channels, as in Propolis: the servers talk over a websocket (the target connects to the
source's ``GET /instance/migrate/{migration_id}/start``), and the guest's RAM and device state
go over QEMU's migration stream, from the source's QEMU (QMP ``migrate``) to the target's
(started with ``-incoming defer``, listening on 127.0.0.1 at a port QEMU picks). The websocket
carries what QEMU's stream does not: the source's instance spec (v5's MigrationTarget carries
none), the target's listening port, the phases as the source sees them, the failure
injectors' verdicts, the serial history, and the final "the target runs" that lets the source
go away.

Phases (the document's MigrationState), as each server reports them:

======================  =====================================  ==============================
state (in this order)   source                                 target
======================  =====================================  ==============================
Sync                    spec sent                              spec taken, QEMU listening
RamPush                 QMP migrate running, vCPUs running     (mirrors the source)
Pause                   vCPUs paused before the switch-over    (mirrors)
Device                  the export injector decides            the import injector decides
RamPushDirty            switch-over: dirty RAM, device state   (mirrors)
Resume                  -                                      disks activate (Crucible: at
                                                               the higher generation), cont
Server                  serial history sent                    "the guest runs here" sent
Finish                  the target runs: the source goes       the instance is Running
Error                   source resumes, Running                the instance is Failed
======================  =====================================  ==============================

Device comes before RamPushDirty here (Propolis has them the other way round): QEMU sends the
dirty RAM and the device state in one step after the switch-over, so the verdicts on the
device state - the failure injectors', the target's - are taken while the switch-over can
still be called off.

RamPull (post-copy) is never entered: QEMU's pre-copy moves all RAM before the switch-over.
The source pauses through QEMU's ``pause-before-switchover`` capability, so a failure at the
Device phase (an injector, a target that refuses) can still cancel the migration and the
source goes on running; the target uses ``late-block-activate``, so it never touches a disk
before it resumes.

Messages are JSON text frames ``{"msg": KIND, ...}``; see the ``_expect`` calls for the order.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sut import bounded_json

__all__ = [
    "PROTOCOL",
    "FailureInjector",
    "Link",
    "MigrationError",
    "MigrationPhase",
    "MigrationRecord",
    "MigrationStatus",
    "abandon",
    "connect_to_source",
    "run_export",
    "run_import",
]

PROTOCOL = "phd-qemu-migrate/1"
# How long one side waits for the other's next message outside of QEMU's RAM copy.
STEP_TIMEOUT_S = 60.0
# How long the whole QEMU transfer may take (a 512 MiB guest under TCG takes a few seconds).
TRANSFER_TIMEOUT_S = 600.0
# QMP query-migrate polls: the phases' stamps (and so the measured downtime) are this exact.
POLL_S = 0.01
# The serial history travels in one frame: 1 MiB of history is 1.4 MiB of base64.
MAX_FRAME_BYTES = 4 << 20
_LIMITS = bounded_json.JsonLimits(max_bytes=MAX_FRAME_BYTES)


class MigrationPhase(enum.StrEnum):
    SYNC = "Sync"
    RAM_PUSH = "RamPush"
    PAUSE = "Pause"
    RAM_PUSH_DIRTY = "RamPushDirty"
    DEVICE = "Device"
    RESUME = "Resume"
    RAM_PULL = "RamPull"
    SERVER = "Server"
    FINISH = "Finish"
    ERROR = "Error"


class MigrationError(Exception):
    """A migration failed; the message says in which phase and why."""


@dataclass
class MigrationRecord:
    id: uuid.UUID
    state: MigrationPhase

    def json(self) -> dict[str, str]:
        return {"id": str(self.id), "state": str(self.state)}


@dataclass
class MigrationStatus:
    """The most recent migration in and out (the document's InstanceMigrateStatusResponse)."""

    migration_in: MigrationRecord | None = None
    migration_out: MigrationRecord | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger(__name__))

    def set(self, direction: str, migration_id: uuid.UUID, phase: MigrationPhase) -> None:
        setattr(self, f"migration_{direction}", MigrationRecord(migration_id, phase))
        # CLOCK_MONOTONIC is one clock for every process of the host: a source's Pause and
        # its target's Server stamp bound the guest's downtime (ci/bench migration).
        self.log.info("migration phase", extra={"direction": direction, "migration_id": str(migration_id),
                                                "phase": str(phase), "monotonic": time.monotonic()})

    def json(self) -> dict[str, object]:
        return {"migration_in": None if self.migration_in is None else self.migration_in.json(),
                "migration_out": None if self.migration_out is None else self.migration_out.json()}


@dataclass
class FailureInjector:
    """The spec's migration_failure_injector: fail this many export / import attempts."""

    fail_exports: int = 0
    fail_imports: int = 0
    exports_tried: int = 0
    imports_tried: int = 0

    def export_attempt(self) -> bool:
        """Count an export attempt; True if the injector fails it."""
        self.exports_tried += 1
        return self.exports_tried <= self.fail_exports

    def import_attempt(self) -> bool:
        self.imports_tried += 1
        return self.imports_tried <= self.fail_imports


class Link(Protocol):
    """One side's end of the control websocket: text frames of JSON."""

    async def send_text(self, text: str) -> None: ...

    async def receive_text(self) -> str: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


@runtime_checkable
class MigratableVm(Protocol):
    """What the migration needs of a QEMU process (sut.server.qemu.QemuVm)."""

    async def qmp(self, command: str, arguments: dict[str, object] | None = None) -> Any: ...

    async def cont(self) -> None: ...


class ClientLink:
    """The target's end: a ``websockets`` client connection."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def send_text(self, text: str) -> None:
        await self._conn.send(text)

    async def receive_text(self) -> str:
        message = await self._conn.recv()
        return message if isinstance(message, str) else message.decode()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        with contextlib.suppress(Exception):
            await self._conn.close(code, reason)


async def _send(link: Link, kind: str, **body: object) -> None:
    try:
        await link.send_text(json.dumps({"msg": kind, **body}))
    except Exception as exc:  # the websocket closed under us: a migration error, never a 500
        raise MigrationError(f"the control connection ended while sending {kind}: {exc!r}") from exc


async def _expect(link: Link, *kinds: str, timeout_s: float | None = None) -> dict[str, Any]:
    """The next message, which must be one of ``kinds``; an ``error`` message raises.
    ``timeout_s``: STEP_TIMEOUT_S (read at the call, so a test can shorten it)."""
    timeout_s = STEP_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            text = await link.receive_text()
    except TimeoutError:
        raise MigrationError(f"the other server sent nothing for {timeout_s:.0f} s "
                             f"(waiting for {' or '.join(kinds)})") from None
    except Exception as exc:
        raise MigrationError(f"the control connection ended while waiting for {' or '.join(kinds)}: "
                             f"{exc!r}") from exc
    try:
        message = bounded_json.loads(text.encode(), _LIMITS)
    except Exception as exc:
        raise MigrationError(f"the other server sent a malformed message: {exc}") from exc
    if not isinstance(message, dict):
        raise MigrationError("the other server sent a message that is not a JSON object")
    kind = message.get("msg")
    if kind == "error":
        raise MigrationError(f"the other server failed: {message.get('message')}")
    if kind not in kinds:
        raise MigrationError(f"expected {' or '.join(kinds)} from the other server, got {kind!r}")
    result: dict[str, Any] = message
    return result


def _mirrored(message: dict[str, Any]) -> MigrationPhase:
    """The phase a source announced (one of those a target mirrors)."""
    try:
        phase = MigrationPhase(str(message.get("state")))
    except ValueError:
        raise MigrationError(f"the source announced an unknown phase {message.get('state')!r}") from None
    if phase not in (MigrationPhase.RAM_PUSH, MigrationPhase.PAUSE, MigrationPhase.RAM_PUSH_DIRTY):
        raise MigrationError(f"the source announced phase {phase}, which a target does not mirror")
    return phase


async def _send_error(link: Link, exc: BaseException) -> None:
    with contextlib.suppress(Exception):
        await _send(link, "error", message=str(exc) or repr(exc))


async def abandon(link: Link, reason: str) -> None:
    """Tell the other server the migration is over for this one, and close the link
    (best effort, safe to repeat: a closed link swallows both)."""
    with contextlib.suppress(Exception):
        await _send(link, "error", message=reason)
    await link.close(1011, "migration abandoned")


# --- target: connecting (during PUT /instance) ------------------------------------------


async def connect_to_source(src_addr: str, migration_id: uuid.UUID,
                            timeout_s: float = STEP_TIMEOUT_S) -> tuple[Link, dict[str, Any]]:
    """Open the control websocket to the source server and take its spec (the Sync phase's
    first half). Returns the link and the source's instance spec (v5 JSON)."""
    from websockets.asyncio.client import connect

    url = f"ws://{src_addr}/instance/migrate/{migration_id}/start"
    try:
        async with asyncio.timeout(timeout_s):
            conn = await connect(url, max_size=MAX_FRAME_BYTES, open_timeout=timeout_s,
                                 ping_interval=None)
    except TimeoutError:
        raise MigrationError(f"the source server at {src_addr} did not answer within "
                             f"{timeout_s:.0f} s") from None
    except Exception as exc:
        raise MigrationError(f"cannot open {url}: {exc}") from exc
    link = ClientLink(conn)
    try:
        with contextlib.suppress(MigrationError):
            # A source that refuses answers with an error message and closes at once, which
            # can beat this hello to the wire; its answer is still there to read below.
            await _send(link, "hello", protocols=[PROTOCOL])
        message = await _expect(link, "spec", timeout_s=timeout_s)
        if message.get("protocol") != PROTOCOL:
            raise MigrationError(f"the source chose protocol {message.get('protocol')!r}; this server "
                                 f"speaks {PROTOCOL}")
        spec = message.get("spec")
        if not isinstance(spec, dict):
            raise MigrationError("the source sent no instance spec")
    except BaseException:
        await link.close(1011, "sync failed")
        raise
    return link, spec


# --- the QEMU side ---------------------------------------------------------------------


async def _wait_status(vm: MigratableVm, wanted: set[str], deadline: float, what: str) -> str:
    """Poll QMP query-migrate until its status is one of ``wanted`` (or failed/cancelled)."""
    status = "none"
    while time.monotonic() < deadline:
        info = await vm.qmp("query-migrate")
        status = info.get("status", "none") if isinstance(info, dict) else "none"
        if status in wanted:
            return status
        if status in ("failed", "cancelled"):
            raise MigrationError(f"QEMU's migration {status} while {what}: {info.get('error-desc', '')}")
        await asyncio.sleep(POLL_S)
    raise MigrationError(f"timed out while {what} (QEMU migration status {status!r})")


async def _capabilities(vm: MigratableVm, **states: bool) -> None:
    await vm.qmp("migrate-set-capabilities", {"capabilities": [
        {"capability": name.replace("_", "-"), "state": state} for name, state in states.items()]})


# --- source ----------------------------------------------------------------------------


@dataclass
class SerialSnapshot:
    start: int
    data: bytes


async def run_export(
    *,
    vm: MigratableVm,
    link: Link,
    migration_id: uuid.UUID,
    spec_json: dict[str, Any],
    status: MigrationStatus,
    injector: FailureInjector,
    serial: Callable[[], SerialSnapshot],
    log: logging.Logger,
) -> None:
    """Migrate this instance out; on return the target runs it (the caller then stops ours).

    Raises MigrationError after making sure the guest runs here again: the QEMU migration
    cancelled (or never begun) and the vCPUs resumed.
    """

    def phase(p: MigrationPhase) -> None:
        status.set("out", migration_id, p)

    started = False
    try:
        phase(MigrationPhase.SYNC)
        hello = await _expect(link, "hello")
        if PROTOCOL not in (hello.get("protocols") or []):
            raise MigrationError(f"the target offers {hello.get('protocols')!r}; this server "
                                 f"speaks {PROTOCOL}")
        await _send(link, "spec", protocol=PROTOCOL, spec=spec_json)
        incoming = await _expect(link, "incoming")
        port = incoming.get("port")
        if type(port) is not int or not 0 < port < 65536:
            raise MigrationError(f"the target named no valid port: {port!r}")
        await _capabilities(vm, pause_before_switchover=True)
        phase(MigrationPhase.RAM_PUSH)
        await _send(link, "phase", state=str(MigrationPhase.RAM_PUSH))
        # The target's QEMU listens on loopback only (it bound 127.0.0.1 itself).
        await vm.qmp("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        started = True
        deadline = time.monotonic() + TRANSFER_TIMEOUT_S
        await _wait_status(vm, {"pre-switchover"}, deadline, "copying RAM")
        phase(MigrationPhase.PAUSE)
        await _send(link, "phase", state=str(MigrationPhase.PAUSE))
        phase(MigrationPhase.DEVICE)
        if injector.export_attempt():
            raise MigrationError(f"export failed: the migration failure injector fails the first "
                                 f"{injector.fail_exports} export(s) (this was attempt "
                                 f"{injector.exports_tried})")
        # The target decides whether it can import before anything is switched over.
        await _send(link, "device")
        await _expect(link, "device-ok")
        phase(MigrationPhase.RAM_PUSH_DIRTY)
        await _send(link, "phase", state=str(MigrationPhase.RAM_PUSH_DIRTY))
        await vm.qmp("migrate-continue", {"state": "pre-switchover"})
        await _wait_status(vm, {"completed"}, deadline, "sending dirty RAM and device state")
        info = await vm.qmp("query-migrate")
        log.info("QEMU migration completed", extra={
            "migration_id": str(migration_id), "qemu_downtime_ms": info.get("downtime"),
            "qemu_total_ms": info.get("total-time"), "ram": info.get("ram")})
        # QEMU completed: the guest is paused for good here and its disks flushed and
        # inactive. The serial history is final as well.
        phase(MigrationPhase.SERVER)
        snap = serial()
        await _send(link, "completed", serial={"start": snap.start,
                                               "data": base64.b64encode(snap.data).decode()})
        await _expect(link, "resumed")
        phase(MigrationPhase.FINISH)
        await link.close(1000, "migrated")
    except BaseException as exc:
        log.warning("migration out failed", extra={"migration_id": str(migration_id), "error": str(exc)})
        phase(MigrationPhase.ERROR)
        await _send_error(link, exc)
        await link.close(1011, "migration failed")
        if started:
            await _resume_after_failure(vm, log)
        if isinstance(exc, MigrationError) or not isinstance(exc, Exception):
            raise  # a MigrationError says why; a cancellation stays one
        raise MigrationError(f"migration out failed: {exc!r}") from exc


async def _resume_after_failure(vm: MigratableVm, log: logging.Logger) -> None:
    """Cancel QEMU's migration and run the guest here again."""
    with contextlib.suppress(Exception):
        await vm.qmp("migrate_cancel")
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline:
        info = await vm.qmp("query-migrate")
        if not isinstance(info, dict) or info.get("status") not in ("active", "pre-switchover", "device",
                                                                    "cancelling", "setup"):
            break
        await asyncio.sleep(POLL_S)
    # QEMU restarts a guest that ran before a cancelled migration by itself; one that
    # completed (the target failed after the hand-over) stays in postmigrate until cont.
    running = await vm.qmp("query-status")
    if not (isinstance(running, dict) and running.get("running")):
        log.info("resuming the guest after a failed migration out")
        await vm.cont()


# --- target ----------------------------------------------------------------------------


async def run_import(
    *,
    vm: MigratableVm,
    link: Link,
    migration_id: uuid.UUID,
    status: MigrationStatus,
    injector: FailureInjector,
    take_serial: Callable[[SerialSnapshot], None],
    resume: Callable[[], Awaitable[None]],
    log: logging.Logger,
) -> None:
    """Receive the instance; on return it runs here (``resume`` activated the disks and ran
    QMP cont). Raises MigrationError (the caller fails the instance)."""

    def phase(p: MigrationPhase) -> None:
        status.set("in", migration_id, p)

    try:
        phase(MigrationPhase.SYNC)
        await _capabilities(vm, late_block_activate=True)
        await vm.qmp("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        info = await vm.qmp("query-migrate")
        port = int(info["socket-address"][0]["port"])
        await _send(link, "incoming", port=port)
        deadline = time.monotonic() + TRANSFER_TIMEOUT_S
        while True:
            message = await _expect(link, "phase", "device",
                                    timeout_s=max(1.0, deadline - time.monotonic()))
            if message["msg"] == "device":
                break
            phase(_mirrored(message))
        phase(MigrationPhase.DEVICE)
        if injector.import_attempt():
            raise MigrationError(f"import failed: the migration failure injector fails the first "
                                 f"{injector.fail_imports} import(s)")
        await _send(link, "device-ok")
        message = await _expect(link, "phase")
        phase(_mirrored(message))
        completed = await _expect(link, "completed", timeout_s=max(1.0, deadline - time.monotonic()))
        await _wait_status(vm, {"completed"}, time.monotonic() + STEP_TIMEOUT_S, "receiving device state")
        serial = completed.get("serial") or {}
        snap = SerialSnapshot(int(serial.get("start", 0)), base64.b64decode(serial.get("data", "")))
        phase(MigrationPhase.RESUME)
        take_serial(snap)
        await resume()
        phase(MigrationPhase.SERVER)
        await _send(link, "resumed")
        phase(MigrationPhase.FINISH)
    except BaseException as exc:
        log.warning("migration in failed", extra={"migration_id": str(migration_id), "error": str(exc)})
        phase(MigrationPhase.ERROR)
        await _send_error(link, exc)
        if isinstance(exc, MigrationError) or not isinstance(exc, Exception):
            raise
        raise MigrationError(f"migration in failed: {exc!r}") from exc
    finally:
        await link.close(1000, "done")
