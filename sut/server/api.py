"""The HTTP API (CONTRACT: Propolis paths and state names) on FastAPI."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from typing import Annotated

from fastapi import Body, FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sut.server.backends import BackendError, ReplacementRejectedError
from sut.server.driver import InstanceGoneError, NoSuchBackendError
from sut.server.instance import Instance, VmConfig
from sut.server.qemu import QemuError
from sut.server.request_queue import DenyReason, RequestDeniedError, RequestKind
from sut.server.serial import SerialNotConnectedError
from sut.server.spec import InstanceEnsureRequest, VcrReplaceRequest


class ApiError(Exception):
    """An error answered as ``{"error": code, "message": message}``."""

    def __init__(self, status: int, code: str, message: str, extra: dict[str, object] | None = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra or {}
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


class ServerController:
    """Holds the (single) instance of this server, like propolis-server."""

    def __init__(self, config: VmConfig, logger: logging.Logger) -> None:
        self.config = config
        self.log = logger
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
            except (QemuError, BackendError) as exc:
                raise ApiError(400, "BadInstanceSpec", str(exc)) from exc
            return self.instance

    async def shutdown(self) -> None:
        if self.instance is not None:
            await self.instance.driver.shutdown()


def _format_validation(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(controller: ServerController) -> FastAPI:
    app = FastAPI(title="phd reference VMM server", version="0.1.0")
    app.state.controller = controller

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        body = {"error": exc.code, "message": exc.message, **exc.extra}
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422; the CONTRACT says a malformed body is 400.
        return JSONResponse({"error": "BadRequest", "message": _format_validation(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HttpError")
        return JSONResponse({"error": code, "message": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        controller.log.exception("unhandled error in request", exc_info=exc)
        return JSONResponse({"error": "Internal", "message": repr(exc)}, status_code=500)

    @app.put("/instance", status_code=201)
    async def instance_ensure(body: InstanceEnsureRequest) -> dict[str, object]:
        instance = await controller.ensure(body)
        return {"instance": instance.describe()}

    @app.get("/instance")
    async def instance_get() -> dict[str, object]:
        return {"instance": controller.require().describe()}

    @app.put("/instance/state", status_code=204)
    async def instance_state_put(requested: Annotated[RequestedState, Body()]) -> Response:
        instance = controller.require_live()
        try:
            instance.driver.request_state(_KIND[requested])
        except RequestDeniedError as exc:
            raise ApiError(403, "RequestDenied", str(exc)) from exc
        return Response(status_code=204)

    @app.get("/instance/state-monitor")
    async def state_monitor(gen: Annotated[int, Query(ge=0)] = 0) -> dict[str, object]:
        snapshot = await controller.require().driver.monitor.wait_for_gen(gen)
        return {"gen": snapshot.gen, "state": str(snapshot.state)}

    @app.get("/instance/serial/history")
    async def serial_history(
        from_start: Annotated[int | None, Query(ge=0)] = None,
        most_recent: Annotated[int | None, Query(ge=0)] = None,
        max_bytes: Annotated[int | None, Query(ge=0)] = None,
    ) -> dict[str, object]:
        if from_start is not None and most_recent is not None:
            raise ApiError(400, "BadRequest", "give from_start or most_recent, not both")
        piece = controller.require().serial.history(
            from_start=from_start, most_recent=most_recent, max_bytes=max_bytes
        )
        # Propolis's shape: raw bytes as a list of integers plus the offset
        # just past them (the next from_start).
        return {"data": list(piece.data), "last_byte_offset": piece.end_offset}

    @app.websocket("/instance/serial")
    async def serial_ws(ws: WebSocket) -> None:
        await _serial_session(controller, ws)

    @app.put("/instance/disk/{backend_id}/vcr")
    async def vcr_replace(backend_id: str, body: VcrReplaceRequest) -> dict[str, object]:
        instance = controller.require()
        try:
            result = await instance.driver.replace_vcr(backend_id, body.vcr_json)
        except NoSuchBackendError as exc:
            raise ApiError(
                404,
                "NoSuchBackend",
                f"no crucible disk with backend id {backend_id!r}; disks: {instance.known_backends()}",
            ) from exc
        except InstanceGoneError as exc:
            raise ApiError(410, "InstanceGone", str(exc)) from exc
        except RequestDeniedError as exc:
            if exc.reason is DenyReason.TERMINAL:
                raise ApiError(410, "InstanceGone", str(exc)) from exc
            raise ApiError(403, "RequestDenied", str(exc)) from exc
        except ReplacementRejectedError as exc:
            raise ApiError(400, "ReplacementRejected", str(exc), {"rule": exc.rule}) from exc
        return {"result": result}

    @app.get("/instance/disk/{backend_id}/status")
    async def disk_status(backend_id: str) -> dict[str, object]:
        instance = controller.require()
        try:
            return instance.disk_status(backend_id)
        except NoSuchBackendError as exc:
            raise ApiError(
                404,
                "NoSuchBackend",
                f"no disk with backend id {backend_id!r}; disks: {instance.known_backends()}",
            ) from exc

    return app


async def _serial_session(controller: ServerController, ws: WebSocket) -> None:
    instance = controller.instance
    params = ws.query_params
    try:
        from_start = int(params["from_start"]) if "from_start" in params else None
        most_recent = int(params["most_recent"]) if "most_recent" in params else None
    except ValueError:
        await ws.close(code=1008, reason="from_start / most_recent must be integers")
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

    async def from_client() -> None:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes") or (message.get("text") or "").encode()
            try:
                await instance.serial.write(data)
            except SerialNotConnectedError as exc:
                controller.log.warning("serial input dropped", extra={"error": str(exc)})

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
