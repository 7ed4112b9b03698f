"""The migration control protocol (sut.server.migration) between a source and a target, each
with a fake QEMU that answers QMP as QEMU does. The real thing, two servers and two QEMUs,
is tests/integration/server/test_migration.py; this covers the orders and failures a real
run reaches rarely: each phase seen by each side, the injectors, a silent or confused peer."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import pytest

from sut.server import migration
from sut.server.migration import (
    FailureInjector,
    MigrationError,
    MigrationPhase,
    MigrationStatus,
    SerialSnapshot,
    run_export,
    run_import,
)

LOG = logging.getLogger("test")
MID = uuid.uuid4()
SPEC = {"board": {"cpus": 1}, "components": {}}


class QueueLink:
    """One end of an in-memory websocket: text frames, in order."""

    def __init__(self, inbox: asyncio.Queue[str | None], outbox: asyncio.Queue[str | None]) -> None:
        self.inbox, self.outbox = inbox, outbox
        self.closed = False

    async def send_text(self, text: str) -> None:
        if self.closed:
            raise ConnectionError("closed")
        await self.outbox.put(text)

    async def receive_text(self) -> str:
        text = await self.inbox.get()
        if text is None:
            raise ConnectionError("the other end closed")
        return text

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            await self.outbox.put(None)


def link_pair() -> tuple[QueueLink, QueueLink]:
    a: asyncio.Queue[str | None] = asyncio.Queue()
    b: asyncio.Queue[str | None] = asyncio.Queue()
    return QueueLink(a, b), QueueLink(b, a)


class SourceQemu:
    """QMP as a migrating source QEMU answers it (pause-before-switchover on)."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.status = "none"
        self.running = True
        self.uri: str | None = None

    async def qmp(self, command: str, arguments: dict[str, object] | None = None) -> Any:
        self.commands.append(command)
        if command == "migrate":
            assert arguments is not None
            self.uri = str(arguments["uri"])
            self.status, self.running = "pre-switchover", False
        elif command == "migrate-continue":
            self.status = "completed"
        elif command == "migrate_cancel":
            # QEMU restarts a guest that ran before a migration it cancelled.
            self.status, self.running = "cancelled", True
        elif command == "query-migrate":
            return {"status": self.status}
        elif command == "query-status":
            return {"running": self.running}
        return {}

    async def cont(self) -> None:
        self.commands.append("cont")
        self.running = True


class TargetQemu:
    def __init__(self) -> None:
        self.commands: list[str] = []

    async def qmp(self, command: str, arguments: dict[str, object] | None = None) -> Any:
        self.commands.append(command)
        if command == "query-migrate":
            return {"status": "completed", "socket-address": [{"type": "inet", "host": "127.0.0.1",
                                                               "port": "40123"}]}
        return {}

    async def cont(self) -> None:
        self.commands.append("cont")


def phases(status: MigrationStatus, direction: str, log: list[str]) -> MigrationStatus:
    """Record every phase ``status`` takes on in ``direction``."""
    original = status.set

    def recording(d: str, mid: uuid.UUID, phase: MigrationPhase) -> None:
        if d == direction:
            log.append(str(phase))
        original(d, mid, phase)

    status.set = recording  # type: ignore[method-assign]
    return status


async def migrate(*, export_injector: FailureInjector | None = None,
                  import_injector: FailureInjector | None = None) -> dict[str, Any]:
    src_link, dst_link = link_pair()
    src_vm, dst_vm = SourceQemu(), TargetQemu()
    src_phases: list[str] = []
    dst_phases: list[str] = []
    taken: list[SerialSnapshot] = []
    resumed: list[bool] = []

    async def resume() -> None:
        resumed.append(True)
        await dst_vm.cont()

    # The target's half of Sync (connect_to_source) is a hello and the spec.
    await dst_link.send_text(json.dumps({"msg": "hello", "protocols": [migration.PROTOCOL]}))
    export = asyncio.create_task(run_export(
        vm=src_vm, link=src_link, migration_id=MID, spec_json=SPEC,
        status=phases(MigrationStatus(), "out", src_phases), injector=export_injector or FailureInjector(),
        serial=lambda: SerialSnapshot(100, b"login: root\n"), log=LOG))
    spec = json.loads(await dst_link.receive_text())
    assert spec == {"msg": "spec", "protocol": migration.PROTOCOL, "spec": SPEC}
    imported = asyncio.create_task(run_import(
        vm=dst_vm, link=dst_link, migration_id=MID, status=phases(MigrationStatus(), "in", dst_phases),
        injector=import_injector or FailureInjector(), take_serial=taken.append, resume=resume, log=LOG))
    results = await asyncio.gather(export, imported, return_exceptions=True)
    return {"export": results[0], "import": results[1], "src_phases": src_phases, "dst_phases": dst_phases,
            "src_vm": src_vm, "dst_vm": dst_vm, "taken": taken, "resumed": resumed}


def test_a_migration_goes_through_every_phase_in_order() -> None:
    out = asyncio.run(migrate())
    assert out["export"] is None and out["import"] is None
    assert out["src_phases"] == ["Sync", "RamPush", "Pause", "Device", "RamPushDirty", "Server", "Finish"]
    assert out["dst_phases"] == ["Sync", "RamPush", "Pause", "Device", "RamPushDirty", "Resume", "Server",
                                 "Finish"]
    # The source sends to the port the target's QEMU listens on, on loopback only.
    assert out["src_vm"].uri == "tcp:127.0.0.1:40123"
    assert out["src_vm"].commands[:2] == ["migrate-set-capabilities", "migrate"]
    assert "migrate-continue" in out["src_vm"].commands and "cont" not in out["src_vm"].commands
    assert out["dst_vm"].commands[:2] == ["migrate-set-capabilities", "migrate-incoming"]
    assert out["taken"] == [SerialSnapshot(100, b"login: root\n")]
    assert out["resumed"] == [True]


@pytest.mark.parametrize("side", ["export", "import"])
def test_an_injected_failure_cancels_before_the_switch_over(side: str) -> None:
    injector = FailureInjector(fail_exports=1) if side == "export" else FailureInjector(fail_imports=1)
    out = asyncio.run(migrate(export_injector=injector if side == "export" else None,
                              import_injector=injector if side == "import" else None))
    assert isinstance(out["export"], MigrationError) and isinstance(out["import"], MigrationError)
    assert f"{side} failed" in str(out[side])
    assert out["src_phases"][-2:] == ["Device", "Error"]
    assert out["dst_phases"][-1] == "Error"
    # Never switched over: QEMU's migration cancelled, the guest running again, the target
    # never resumed.
    assert "migrate-continue" not in out["src_vm"].commands
    assert "migrate_cancel" in out["src_vm"].commands and out["src_vm"].running
    assert out["resumed"] == []


def test_the_injector_counts_attempts() -> None:
    injector = FailureInjector(fail_exports=2)
    assert [injector.export_attempt() for _ in range(3)] == [True, True, False]
    assert not FailureInjector().import_attempt()


def test_a_silent_peer_ends_the_migration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migration, "STEP_TIMEOUT_S", 0.2)

    async def scenario() -> BaseException | None:
        src_link, _dst = link_pair()
        try:
            await run_export(vm=SourceQemu(), link=src_link, migration_id=MID, spec_json=SPEC,
                             status=MigrationStatus(), injector=FailureInjector(),
                             serial=lambda: SerialSnapshot(0, b""), log=LOG)
        except MigrationError as exc:
            return exc
        return None

    error = asyncio.run(scenario())
    assert isinstance(error, MigrationError) and "sent nothing" in str(error)


@pytest.mark.parametrize(("message", "reason"), [
    ("not json", "malformed"),
    ('["a list"]', "not a JSON object"),
    ('{"msg": "phase", "state": "Bogus"}', "unknown phase"),
    ('{"msg": "phase", "state": "Finish"}', "does not mirror"),
    ('{"msg": "completed"}', "expected phase or device"),
    ('{"msg": "error", "message": "the source broke"}', "the source broke"),
])
def test_a_confused_source_fails_the_import(message: str, reason: str) -> None:
    async def scenario() -> BaseException | None:
        src_link, dst_link = link_pair()
        await src_link.send_text(message)
        try:
            await run_import(vm=TargetQemu(), link=dst_link, migration_id=MID, status=MigrationStatus(),
                             injector=FailureInjector(), take_serial=lambda _: None,
                             resume=TargetQemu().cont, log=LOG)
        except MigrationError as exc:
            return exc
        return None

    error = asyncio.run(scenario())
    assert isinstance(error, MigrationError) and reason in str(error), error


@pytest.mark.parametrize("delay_s", [0.0, 0.05])
def test_a_source_that_refuses_at_once_is_a_migration_error_with_its_reason(delay_s: float) -> None:
    """The source answers a target it cannot serve with an error message and closes the
    websocket at once - possibly before the target's hello is out (seen in CI as a 500). The
    target must end with a MigrationError carrying the source's reason, whichever comes first."""
    from websockets.asyncio.server import ServerConnection, serve

    async def refuse(conn: ServerConnection) -> None:
        refusal = {"msg": "error", "message": "the source refused: it has not been started"}
        await conn.send(json.dumps(refusal))
        await conn.close(1008, "refused")

    async def scenario() -> list[str]:
        errors = []
        async with serve(refuse, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            for _ in range(10):
                await asyncio.sleep(delay_s)
                try:
                    await migration.connect_to_source(f"127.0.0.1:{port}", MID, timeout_s=5.0)
                except MigrationError as exc:
                    errors.append(str(exc))
        return errors

    errors = asyncio.run(scenario())
    assert len(errors) == 10
    assert all("has not been started" in e for e in errors), errors
