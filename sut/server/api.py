"""The HTTP API: propolis-server 5.0.0's (its published OpenAPI document), on FastAPI.

Paths, bodies, state names, ReplaceResult values and the Error body ``{message,
request_id, error_code}`` are the document's. Where the document only says "4XX", this
server picks the code that says most: 400 malformed or unsupported, 403 the request queue
denied a state change, 404 no instance / no such disk, 409 an instance exists, 410 the
instance stopped before the request was handled, 424 no live instance for a state change.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import enum
import logging
import uuid
import weakref
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal, cast

from fastapi import Body, FastAPI, HTTPException, Path, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from sut import bounded_json
from sut.path_policy import PathPolicyError
from sut.server.backends import BackendError, ReplacementRejectedError
from sut.server.driver import InstanceGoneError, NoSuchBackendError, NotRunningError
from sut.server.instance import Instance, VmConfig
from sut.server.limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware
from sut.server.qemu import QemuError
from sut.server.request_queue import DenyReason, RequestDeniedError, RequestKind
from sut.server.serial import SerialNotConnectedError
from sut.server.spec import InstanceEnsureRequest, StateMonitorRequest, VcrReplaceRequest
from sut.server.states import InstanceState

# Generations, offsets and byte counts are 64-bit in Propolis and never get near the
# largest signed 64-bit value; a larger query value is a client bug, answered 400.
MAX_QUERY_INT = 2**63 - 1
DEFAULT_LONG_POLL_MAX_S = 60.0


class ApiError(Exception):
    """An error answered as the document's Error body, ``error_code`` being ``code``."""

    def __init__(self, status: int, code: str, message: str, extra: dict[str, object] | None = None) -> None:
        self.status = status
        self.code = code
        # A VCR rejection's rule goes into error_code (the Error body has no other field
        # for it): "ReplacementRejected:two-targets-changed".
        rule = (extra or {}).get("rule")
        if rule:
            self.code = f"{code}:{rule}"
        self.message = message
        super().__init__(message)


def error_body(code: str, message: str) -> dict[str, str]:
    """The document's Error: ``{message, request_id, error_code}`` (a fresh request id)."""
    return {"message": message, "request_id": uuid.uuid4().hex, "error_code": code}


class RequestedState(enum.StrEnum):
    RUN = "Run"
    STOP = "Stop"
    REBOOT = "Reboot"


_KIND = {
    RequestedState.RUN: RequestKind.START,
    RequestedState.STOP: RequestKind.STOP,
    RequestedState.REBOOT: RequestKind.REBOOT,
}


# --- response bodies ---------------------------------------------------------------
# These describe the answers in /openapi.json. Handlers build them with validation, so
# an answer that drifts from the document is a 500 (which the fuzz test reports), not a
# silent surprise for a client.


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: the document's Error."""

    message: str
    request_id: str
    error_code: str | None = None


class InstanceView(BaseModel):
    properties: dict[str, Any]
    state: InstanceState


class InstanceGetResponse(BaseModel):
    instance: InstanceView


class InstanceEnsureResponse(BaseModel):
    migrate: None = None


class MigrateStatus(BaseModel):
    migration_in: None = None
    migration_out: None = None


class StateMonitorResponse(BaseModel):
    gen: int = Field(ge=1)
    state: InstanceState
    migration: MigrateStatus = Field(default_factory=MigrateStatus)


class SerialHistoryResponse(BaseModel):
    data: list[Annotated[int, Field(ge=0, le=255)]]
    last_byte_offset: int = Field(ge=0)


ReplaceResult = Literal["started", "started_already", "completed_already", "missing", "vcr_matches"]


class VolumeStatusResponse(BaseModel):
    # The document's VolumeStatus: {"volume_info": VolumeInfo} (sut.server.volume_status).
    volume_info: dict[str, Any]


class SpecStatus(BaseModel):
    type: Literal["Present"]
    value: dict[str, Any]


class InstanceSpecGetResponse(BaseModel):
    properties: dict[str, Any]
    spec: SpecStatus
    state: InstanceState


_ERROR_DESCRIPTIONS = {
    400: "Malformed request: the message names the field and the reason",
    403: "The request queue denied the request; the message says why",
    404: "No instance, or no disk with this backend id",
    405: "Method not allowed",
    409: "This server already has an instance",
    410: "The instance stopped before the request was handled",
    424: "No live instance (never created or already Destroyed)",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[code]} for code in codes}


BackendId = Annotated[
    str,
    Path(description="the key of the disk's storage backend component in the spec; "
         "an unknown one is 404", examples=["d0-backend"]),
]


class BoundedJsonRequest(Request):
    """A request whose JSON body goes through the one bounded parser (sut.bounded_json)."""

    limits = bounded_json.DEFAULT_LIMITS

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                if len(body) < _TAKE_TURNS_BYTES:
                    self._json = bounded_json.loads(body, self.limits)
                else:
                    async with _parse_turn():
                        self._json = bounded_json.loads(body, self.limits)
                        # End the turn at the back of the loop's queue, still holding it: the
                        # next big body waits, whatever was queued meanwhile runs first. A
                        # small request takes a few steps (read, route, answer): three rounds.
                        for _ in range(3):
                            await asyncio.sleep(0)
            except bounded_json.JsonLimitError as exc:
                raise HTTPException(400, f"body: {exc}") from None
        return self._json


# A body this big takes milliseconds to check and parse (a 1 MiB one about 25 ms), all of it on
# the event loop. A hundred of them arriving together were parsed back to back, and every
# other request - long-polls, a well-behaved client's GET - waited behind all of them. They
# take turns instead: one parse at a time, and a turn ends by going to the back of the loop's
# queue, so what was waiting runs between two parses. (A worker thread is worse: while it
# holds the GIL for a parse, each socket call of the loop thread waits for the GIL again.)
_TAKE_TURNS_BYTES = 64 * 1024
_parse_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _parse_turn() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _parse_locks.get(loop)
    if lock is None:
        lock = _parse_locks[loop] = asyncio.Lock()
    return lock


class BoundedJsonRoute(APIRoute):
    """Every route of the app parses its body with :class:`BoundedJsonRequest`."""

    json_request_class: type[BoundedJsonRequest] = BoundedJsonRequest

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        request_class = self.json_request_class

        async def bounded(request: Request) -> Response:
            return await handler(request_class(request.scope, request.receive))

        return bounded


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
            return self.instance

    async def shutdown(self) -> None:
        if self.instance is not None:
            await self.instance.driver.shutdown()


def _shown_input(value: object) -> str:
    # Scalars are what the client sent for this one field; an object or array
    # can be a whole body: name its kind instead of repeating it.
    if isinstance(value, dict):
        return " (got a JSON object)"
    if isinstance(value, list):
        return " (got a JSON array)"
    if value is None:
        return " (got null)"
    text = repr(value)
    return f" (got {text[:77]}...)" if len(text) > 80 else f" (got {text})"


def _json_content_type(request: Request) -> bool:
    value = request.headers.get("content-type")
    if not value:
        return False
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    is_json = subtype == "json" or subtype.endswith("+json")
    return message.get_content_maintype() == "application" and is_json


def _format_validation(exc: RequestValidationError, request: Request) -> str:
    """One ``field: reason (got value)`` per error, for a human reading a test log."""
    if isinstance(exc.body, bytes | bytearray) and exc.body and not _json_content_type(request):
        # FastAPI leaves a body it did not parse as bytes; the pydantic
        # error ("should be a valid dictionary") would hide the real cause.
        got = request.headers.get("content-type") or "no Content-Type"
        return f"body: send JSON with Content-Type: application/json (got {got!r})"
    parts = []
    for error in exc.errors():
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "json_invalid":
            position = loc[1] if len(loc) > 1 else "?"
            reason = error.get("ctx", {}).get("error", "invalid JSON")
            parts.append(f"body: invalid JSON at character {position}: {reason}")
            continue
        field = ".".join(str(p) for p in loc if p != "body") or "body"
        if error.get("type") == "missing":
            # The input of a missing field is its parent: nothing to show.
            reason = "a JSON body is required" if field == "body" else error.get("msg", "missing")
        else:
            reason = error.get("msg", "invalid") + _shown_input(error.get("input"))
        parts.append(f"{field}: {reason}")
    return "; ".join(parts)


def _allowed_methods(app: FastAPI, request: Request) -> str:
    # Starlette's own 405 lists only the first route of the path; /instance has
    # a GET route and a PUT route, so collect the methods of every match.
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(request.scope)
            if match is not Match.NONE:
                methods |= route.methods
    return ", ".join(sorted(methods))


def _bounded_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document without FastAPI's 422 answers (this server answers 400)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path_item in doc.get("paths", {}).values():
                for operation in path_item.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = doc.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = doc
        return app.openapi_schema

    return openapi


def create_app(controller: ServerController) -> FastAPI:
    app = FastAPI(title="phd reference VMM server", version="0.1.0")
    # This app's limits, in classes of its own (uvicorn and FastAPI want classes).
    limits = bounded_json.JsonLimits(max_bytes=controller.max_body_bytes)
    request_class = type("BoundedJsonRequest", (BoundedJsonRequest,), {"limits": limits})
    app.router.route_class = type("BoundedJsonRoute", (BoundedJsonRoute,),
                                  {"json_request_class": request_class})
    app.add_middleware(BodyLimitMiddleware, max_bytes=controller.max_body_bytes,
                       body_timeout_s=controller.body_timeout_s)
    app.state.controller = controller
    app.openapi = _bounded_openapi(app)  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422; the CONTRACT says a malformed body is 400.
        message = _format_validation(exc, request)
        return JSONResponse(error_body("BadRequest", message), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            message = f"no route {request.url.path!r}; see /openapi.json"
        elif exc.status_code == 405:
            headers["Allow"] = _allowed_methods(app, request)
            message = f"{request.method} is not allowed on {request.url.path!r}; allowed: {headers['Allow']}"
        elif exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's "There was an error parsing the body" hides the reason, for
            # instance an integer with more digits than Python will convert.
            message = f"body: {exc.detail}: {exc.__cause__}"
        else:
            message = str(exc.detail)
        code = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HttpError")
        return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # The detail goes to the log, never to the client (it can carry paths, values of
        # other requests, internals); the id ties the answer to the log line.
        error_id = uuid.uuid4().hex[:12]
        controller.log.error("unhandled error in request", exc_info=exc,
                             extra={"error_id": error_id, "method": request.method, "path": request.url.path})
        body = error_body("Internal", f"internal server error {error_id}; the server log has the detail")
        body["request_id"] = error_id
        return JSONResponse(body, status_code=500)

    @app.put("/instance", status_code=201, responses=_errors(400, 409))
    async def instance_ensure(body: InstanceEnsureRequest) -> InstanceEnsureResponse:
        await controller.ensure(body)
        return InstanceEnsureResponse()

    @app.get("/instance", responses=_errors(404))
    async def instance_get() -> InstanceGetResponse:
        return InstanceGetResponse.model_validate({"instance": controller.require().describe()})

    @app.get("/instance/spec", responses=_errors(404))
    async def instance_spec_get() -> InstanceSpecGetResponse:
        return InstanceSpecGetResponse.model_validate(controller.require().describe_spec())

    @app.get("/instance/migration-status", responses=_errors(404))
    async def instance_migrate_status() -> MigrateStatus:
        controller.require()
        return MigrateStatus()  # this server migrates nothing: never a migration in or out

    @app.put("/instance/state", status_code=204, responses=_errors(400, 403, 424))
    async def instance_state_put(requested: Annotated[RequestedState, Body()]) -> Response:
        instance = controller.require_live()
        try:
            instance.driver.request_state(_KIND[requested])
        except RequestDeniedError as exc:
            raise ApiError(403, "RequestDenied", str(exc)) from exc
        return Response(status_code=204)

    @app.get("/instance/state-monitor", responses=_errors(400, 404))
    async def instance_state_monitor(body: StateMonitorRequest) -> StateMonitorResponse:
        """Wait until the state generation is >= gen; after the server's --long-poll-max-s
        the CURRENT state is answered (gen may be lower: poll again)."""
        monitor = controller.require().driver.monitor
        # A long-poll is bounded (like a Kubernetes watch timeout): a client
        # that went away, or asked for a generation that never comes, holds a
        # request for at most long_poll_max_s.
        try:
            async with asyncio.timeout(controller.long_poll_max_s):
                snapshot = await monitor.wait_for_gen(body.gen)
        except TimeoutError:
            snapshot = monitor.current
        return StateMonitorResponse(gen=snapshot.gen, state=snapshot.state)

    @app.post("/instance/nmi", responses=_errors(400, 404))
    async def instance_issue_nmi() -> None:
        instance = controller.require()
        try:
            await instance.driver.inject_nmi()
        except NotRunningError as exc:
            raise ApiError(400, "NotRunning", str(exc)) from exc
        return None

    @app.get("/instance/serial/history", responses=_errors(400, 404))
    async def serial_history(
        from_start: Annotated[int | None, Query(ge=0, le=MAX_QUERY_INT)] = None,
        most_recent: Annotated[int | None, Query(ge=0, le=MAX_QUERY_INT)] = None,
        max_bytes: Annotated[int | None, Query(ge=0, le=MAX_QUERY_INT)] = None,
    ) -> SerialHistoryResponse:
        if from_start is not None and most_recent is not None:
            raise ApiError(400, "BadRequest", "from_start, most_recent: give one of them, not both")
        piece = controller.require().serial.history(
            from_start=from_start, most_recent=most_recent, max_bytes=max_bytes
        )
        # Propolis's shape: raw bytes as a list of integers plus the offset
        # just past them (the next from_start). Bytes are 0..255 by construction;
        # validating up to 1 MiB of them would triple the cost of the answer.
        return SerialHistoryResponse.model_construct(data=list(piece.data), last_byte_offset=piece.end_offset)

    @app.websocket("/instance/serial")
    async def serial_ws(ws: WebSocket) -> None:
        await _serial_session(controller, ws)

    @app.put("/instance/disk/{id}/vcr", responses=_errors(400, 403, 404, 410))
    async def instance_issue_crucible_vcr_request(
        id: BackendId, body: VcrReplaceRequest
    ) -> ReplaceResult:
        instance = controller.require()
        try:
            result = await instance.driver.replace_vcr(id, body.vcr_json)
        except NoSuchBackendError as exc:
            crucible = instance.known_backends(kind="crucible")
            if id in instance.known_backends():
                message = f"{id} is not a Crucible backend, so it has no VCR; Crucible backends: {crucible}"
            else:
                message = f"no Crucible backend {id!r}; Crucible backends: {crucible}"
            raise ApiError(404, "NoSuchBackend", message) from exc
        except InstanceGoneError as exc:
            raise ApiError(410, "InstanceGone", str(exc)) from exc
        except RequestDeniedError as exc:
            if exc.reason is DenyReason.TERMINAL:
                raise ApiError(410, "InstanceGone", str(exc)) from exc
            raise ApiError(403, "RequestDenied", str(exc)) from exc
        except ReplacementRejectedError as exc:
            raise ApiError(400, "ReplacementRejected", str(exc), {"rule": exc.rule}) from exc
        return cast(ReplaceResult, result)

    @app.get("/instance/disk/{id}/status", responses=_errors(404))
    async def disk_volume_status(id: BackendId) -> VolumeStatusResponse:
        instance = controller.require()
        try:
            return VolumeStatusResponse.model_validate(instance.volume_status(id))
        except NoSuchBackendError as exc:
            raise ApiError(
                404, "NoSuchBackend",
                f"no Crucible backend {id!r}; Crucible backends: {instance.known_backends(kind='crucible')}",
            ) from exc

    @app.post("/instance/disk/{id}/snapshot/{snapshot_id}", responses=_errors(400, 404))
    async def instance_issue_crucible_snapshot_request(
        id: BackendId, snapshot_id: uuid.UUID
    ) -> None:
        instance = controller.require()
        if id not in instance.known_backends(kind="crucible"):
            raise ApiError(404, "NoSuchBackend", f"no Crucible backend {id!r}; Crucible backends: "
                           f"{instance.known_backends(kind='crucible')}")
        raise ApiError(400, "Unsupported", "snapshots are not supported by this server's storage")

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
