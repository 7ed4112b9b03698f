"""What the HTTP fronts share: the controller of the single instance, the error type every
4xx/5xx answer comes from, the boot path's answer models and the handlers' logic.

Two fronts serve the API, propolis-server 5.0.0's (its published OpenAPI document). api.py
is the FastAPI app: every route, the /openapi.json document, every validation error.
front.py answers the handful of well-formed requests a VM's launch makes (GET/PUT
/instance, PUT /instance/state, the state monitor,
the serial websocket) without FastAPI, whose import takes some 0.2 s, and hands every other
request to the FastAPI app, which it builds on the first one. Both call the functions here,
so an answer's logic exists once. This module imports neither FastAPI nor Starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from sut.path_policy import PathPolicyError
from sut.server.backends import BackendError, ReplacementRejectedError
from sut.server.defaults import DEFAULT_BODY_TIMEOUT_S, DEFAULT_LONG_POLL_MAX_S, DEFAULT_MAX_BODY_BYTES
from sut.server.instance import Instance, VmConfig
from sut.server.migration import Link, MigrationError, MigrationPhase
from sut.server.policy import TargetNotAllowedError
from sut.server.qemu import QemuError
from sut.server.request_queue import RequestDeniedError, RequestKind
from sut.server.serial import SerialNotConnectedError
from sut.server.spec import InstanceEnsureRequest
from sut.server.states import InstanceState

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

# Generations, offsets and byte counts are 64-bit in Propolis and never get near the
# largest signed 64-bit value; a larger query value is a client bug, answered 400.
MAX_QUERY_INT = 2**63 - 1
# A JSON body this big takes milliseconds to check and parse, all of it on the event loop:
# api.py parses such bodies one at a time, taking turns with other requests.
TAKE_TURNS_BYTES = 64 * 1024


class ApiError(Exception):
    """An error answered as the document's Error body, ``error_code`` being ``code``.

    Where the document only says "4XX", the code says most: 400 malformed or unsupported,
    403 the request queue denied a state change, 404 no instance / no such disk, 409 an
    instance exists, 410 the instance stopped before the request was handled, 424 no live
    instance for a state change.
    """

    def __init__(self, status: int, code: str, message: str, extra: dict[str, object] | None = None) -> None:
        self.status = status
        # A rule (a VCR rejection's, the path policy's) goes into error_code, the Error
        # body's one machine-readable field: "ReplacementRejected:two-targets-changed".
        rule = (extra or {}).get("rule")
        self.code = f"{code}:{rule}" if rule else code
        self.message = message
        super().__init__(message)


class RequestedState(enum.StrEnum):
    RUN = "Run"
    STOP = "Stop"
    REBOOT = "Reboot"


_KIND = {
    RequestedState.RUN: RequestKind.START,
    RequestedState.STOP: RequestKind.STOP,
    RequestedState.REBOOT: RequestKind.REBOOT,
}


class InstanceView(BaseModel):
    properties: dict[str, Any]
    state: InstanceState


class InstanceResponse(BaseModel):
    """The document's InstanceGetResponse: ``{instance: {properties, state}}``."""

    instance: InstanceView


class InstanceMigrateInitiateResponse(BaseModel):
    migration_id: uuid.UUID


class InstanceEnsureResponse(BaseModel):
    """The document's InstanceEnsureResponse: ``migrate`` names a target's migration."""

    migrate: InstanceMigrateInitiateResponse | None = None


class MigrationStatusView(BaseModel):
    """The document's InstanceMigrationStatus."""

    id: uuid.UUID
    state: MigrationPhase


class MigrateStatus(BaseModel):
    """The document's InstanceMigrateStatusResponse: the latest migration in and out."""

    migration_in: MigrationStatusView | None = None
    migration_out: MigrationStatusView | None = None


class StateMonitorResponse(BaseModel):
    gen: int = Field(ge=1)
    state: InstanceState
    migration: MigrateStatus = Field(default_factory=MigrateStatus)


class ServerController:
    """Holds the (single) instance of this server, like propolis-server."""

    def __init__(
        self,
        config: VmConfig,
        logger: logging.Logger,
        *,
        long_poll_max_s: float = DEFAULT_LONG_POLL_MAX_S,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        if not long_poll_max_s > 0:
            raise ValueError(f"long_poll_max_s must be positive, got {long_poll_max_s}")
        self.config = config
        self.log = logger
        self.long_poll_max_s = long_poll_max_s
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.instance: Instance | None = None
        self._create_lock = asyncio.Lock()

    def require(self) -> Instance:
        if self.instance is None:
            raise ApiError(404, "NoInstance", "no instance exists; create one with PUT /instance")
        return self.instance

    def require_live(self) -> Instance:
        instance = self.instance
        if instance is None or instance.driver.destroyed:
            raise ApiError(
                424,
                "NoLiveInstance",
                "no live instance (never created or already Destroyed); create a new server",
            )
        return instance

    async def ensure(self, request: InstanceEnsureRequest) -> Instance:
        async with self._create_lock:
            if self.instance is not None:
                raise ApiError(409, "InstanceExists", "this server already has an instance")
            try:
                self.instance = await Instance.create(request, self.config, self.log)
            except PathPolicyError as exc:
                raise ApiError(400, "PathNotAllowed", str(exc), {"rule": exc.rule}) from exc
            except ReplacementRejectedError as exc:
                extra: dict[str, object] | None = {"rule": exc.rule} if exc.rule else None
                raise ApiError(400, "BadInstanceSpec", str(exc), extra) from exc
            except (QemuError, BackendError) as exc:
                raise ApiError(400, "BadInstanceSpec", str(exc)) from exc
            except TargetNotAllowedError as exc:
                raise ApiError(400, "MigrationSourceNotAllowed", str(exc), {"rule": exc.rule}) from exc
            except MigrationError as exc:
                # Checked before anything was created: the source is unreachable, refused,
                # or its spec does not take the replacements.
                raise ApiError(400, "MigrationSyncFailed", str(exc)) from exc
            return self.instance

    async def shutdown(self) -> None:
        if self.instance is not None:
            await self.instance.driver.shutdown()


def error_json(code: str, message: str, request_id: str | None = None) -> dict[str, object]:
    """The document's Error: ``{message, request_id, error_code}`` (a fresh request id)."""
    return {"message": message, "request_id": request_id or uuid.uuid4().hex, "error_code": code}


def error_body(exc: ApiError) -> dict[str, object]:
    """The JSON of an :class:`ApiError` answer."""
    return error_json(exc.code, exc.message)


def internal_error_body(controller: ServerController, method: str, path: str,
                        exc: BaseException) -> dict[str, object]:
    """A 500's JSON; logs the exception under the id the answer names.

    The detail goes to the log, never to the client (it can carry paths, values of other
    requests, internals); the id ties the answer to the log line.
    """
    error_id = uuid.uuid4().hex[:12]
    controller.log.error("unhandled error in request", exc_info=exc,
                         extra={"error_id": error_id, "method": method, "path": path})
    message = f"internal server error {error_id}; the server log has the detail"
    return error_json("Internal", message, error_id)


def ensure_response(instance: Instance) -> InstanceEnsureResponse:
    target = instance.request.migration_target
    if target is None:
        return InstanceEnsureResponse()
    return InstanceEnsureResponse(migrate=InstanceMigrateInitiateResponse(migration_id=target.migration_id))


def migrate_status(instance: Instance) -> MigrateStatus:
    return MigrateStatus.model_validate(instance.migration.status.json())


def instance_response(instance: Instance) -> InstanceResponse:
    return InstanceResponse.model_validate({"instance": instance.describe()})


def request_state(controller: ServerController, requested: RequestedState) -> None:
    """PUT /instance/state: queue the change; ApiError 424 (no live instance) or 403 (denied)."""
    instance = controller.require_live()
    try:
        instance.driver.request_state(_KIND[requested])
    except RequestDeniedError as exc:
        raise ApiError(403, "RequestDenied", str(exc)) from exc


async def state_monitor(controller: ServerController, gen: int) -> StateMonitorResponse:
    """GET /instance/state-monitor: the state once its generation is >= gen."""
    instance = controller.require()
    monitor = instance.driver.monitor
    # A long-poll is bounded (like a Kubernetes watch timeout): a client
    # that went away, or asked for a generation that never comes, holds a
    # request for at most long_poll_max_s.
    try:
        async with asyncio.timeout(controller.long_poll_max_s):
            snapshot = await monitor.wait_for_gen(gen)
    except TimeoutError:
        snapshot = monitor.current
    return StateMonitorResponse(gen=snapshot.gen, state=snapshot.state, migration=migrate_status(instance))


async def serial_session(controller: ServerController, ws: WebSocket) -> None:
    """The serial console websocket (``/instance/serial``), behind both fronts."""
    from starlette.websockets import WebSocketDisconnect

    instance = controller.instance
    params = ws.query_params
    try:
        from_start = int(params["from_start"]) if "from_start" in params else None
        most_recent = int(params["most_recent"]) if "most_recent" in params else None
    except ValueError:
        await ws.close(code=1008, reason="from_start / most_recent must be integers")
        return
    # The same rules as GET /instance/serial/history.
    if any(value is not None and not 0 <= value <= MAX_QUERY_INT for value in (from_start, most_recent)):
        await ws.close(code=1008, reason=f"from_start / most_recent must be in 0..{MAX_QUERY_INT}")
        return
    if from_start is not None and most_recent is not None:
        await ws.close(code=1008, reason="from_start, most_recent: give one of them, not both")
        return
    if instance is None:
        await ws.close(code=1008, reason="no instance; create one with PUT /instance")
        return
    await ws.accept()
    if from_start is None and most_recent is None:
        from_start = 0
    sub = instance.serial.subscribe(from_start=from_start, most_recent=most_recent)

    async def to_client() -> None:
        async for chunk in sub:
            await ws.send_bytes(chunk)

    dropped = 0

    async def from_client() -> None:
        nonlocal dropped
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes") or (message.get("text") or "").encode()
            try:
                await instance.serial.write(data)
            except SerialNotConnectedError as exc:
                # One warning per session: a client typing into a VM that is not running
                # must not be able to flood the log; the count is logged when it ends.
                if not dropped:
                    controller.log.warning("serial input dropped", extra={"error": str(exc)})
                dropped += 1

    tasks = [asyncio.create_task(to_client()), asyncio.create_task(from_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sub.close()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, Exception):
                await task
        with contextlib.suppress(Exception):
            await ws.close(code=1000)
        controller.log.info("serial session ended", extra={"dropped_input_messages": dropped})


class _ServerLink:
    """The source's end of the migration control websocket (Starlette's WebSocket)."""

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws

    async def send_text(self, text: str) -> None:
        await self._ws.send_text(text)

    async def receive_text(self) -> str:
        return await self._ws.receive_text()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        with contextlib.suppress(Exception):
            await self._ws.close(code=code, reason=reason)


async def migration_source_session(controller: ServerController, ws: WebSocket,
                                   migration_id: uuid.UUID) -> None:
    """``GET /instance/migrate/{migration_id}/start`` upgraded: a target connected to take
    this instance over. The state driver runs the export (sut.server.migration); this
    handler keeps the connection open until it ended."""
    instance = controller.instance
    if instance is None or instance.driver.destroyed:
        await ws.close(code=1008, reason="no live instance to migrate")
        return
    await ws.accept()
    link: Link = _ServerLink(ws)
    try:
        migrated = await instance.driver.migrate_out(migration_id, link)
    except RequestDeniedError as exc:
        controller.log.warning("migration out refused", extra={"error": str(exc)})
        with contextlib.suppress(Exception):
            await ws.send_text(json.dumps({"msg": "error", "message": f"the source refused: {exc}"}))
        await link.close(1008, "refused")
        return
    controller.log.info("migration out ended",
                        extra={"migration_id": str(migration_id), "migrated": migrated})
    await link.close(1000, "done")
