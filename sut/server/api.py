"""The HTTP API, propolis-server 5.0.0's (its published OpenAPI document), on FastAPI.

Paths, bodies, state names, ReplaceResult values and the Error body ``{message,
request_id, error_code}`` are the document's; the status codes the document leaves to a
server ("4XX") are chosen in control.py (ApiError).
"""

from __future__ import annotations

import asyncio
import email.message
import uuid
import weakref
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal, cast

from fastapi import Body, FastAPI, HTTPException, Path, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from sut import bounded_json
from sut.server import control
from sut.server.backends import ReplacementRejectedError
from sut.server.control import (
    MAX_QUERY_INT,
    TAKE_TURNS_BYTES,
    ApiError,
    InstanceEnsureResponse,
    InstanceResponse,
    MigrateStatus,
    RequestedState,
    ServerController,
    StateMonitorResponse,
)
from sut.server.defaults import DEFAULT_LONG_POLL_MAX_S
from sut.server.driver import InstanceGoneError, NoSuchBackendError, NotRunningError
from sut.server.limits import BodyLimitMiddleware
from sut.server.request_queue import DenyReason, RequestDeniedError
from sut.server.spec import InstanceEnsureRequest, StateMonitorRequest, VcrReplaceRequest
from sut.server.states import InstanceState

__all__ = ["DEFAULT_LONG_POLL_MAX_S", "MAX_QUERY_INT", "ApiError", "ServerController", "create_app"]


# --- response bodies ---------------------------------------------------------------
# These describe the answers in /openapi.json. Handlers build them with validation, so
# an answer that drifts from the document is a 500 (which the fuzz test reports), not a
# silent surprise for a client.


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: the document's Error."""

    message: str
    request_id: str
    error_code: str | None = None


class SerialHistoryResponse(BaseModel):
    data: list[Annotated[int, Field(ge=0, le=255)]]
    last_byte_offset: int = Field(ge=0)


# The document's ReplaceResult (sut.server.backends.REPLACE_RESULTS's values).
ReplaceResult = Literal["started", "started_already", "completed_already", "missing", "vcr_matches"]


class VolumeStatusResponse(BaseModel):
    """The document's VolumeStatus: ``{"volume_info": VolumeInfo}`` (sut.server.volume_status)."""

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


def _integer_text(value: object) -> object:
    # The document says integer: "0.0" or "1e3" is not one, though pydantic would read it so.
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        raise ValueError(f"expected an integer, got {value[:40]!r}")
    return value


QueryInt = Annotated[int, BeforeValidator(_integer_text)]


BackendId = Annotated[
    str,
    Path(description="the key of the disk's storage backend component in the spec; an unknown one is 404",
         examples=["d0-backend"]),
]


class BoundedJsonRequest(Request):
    """A request whose JSON body goes through the one bounded parser (sut.bounded_json)."""

    limits = bounded_json.DEFAULT_LIMITS

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                if len(body) < TAKE_TURNS_BYTES:
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


# A body of TAKE_TURNS_BYTES or more takes milliseconds to check and parse (a 1 MiB one 25 ms), all of it on
# the event loop. A hundred of them arriving together were parsed back to back, and every
# other request - long-polls, a well-behaved client's GET - waited behind all of them. They
# take turns instead: one parse at a time, and a turn ends by going to the back of the loop's
# queue, so what was waiting runs between two parses. (A worker thread is worse: while it
# holds the GIL for a parse, each socket call of the loop thread waits for the GIL again.)
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


def create_app(controller: ServerController, *, body_limits: bool = True) -> FastAPI:
    """The FastAPI app of every route. body_limits=False leaves out the body limits
    (BodyLimitMiddleware): front.py applies them before it hands a request over."""
    app = FastAPI(title="phd reference VMM server", version="0.1.0")
    # This app's limits, in classes of its own (uvicorn and FastAPI want classes).
    limits = bounded_json.JsonLimits(max_bytes=controller.max_body_bytes)
    request_class = type("BoundedJsonRequest", (BoundedJsonRequest,), {"limits": limits})
    app.router.route_class = type("BoundedJsonRoute", (BoundedJsonRoute,),
                                  {"json_request_class": request_class})
    if body_limits:
        app.add_middleware(BodyLimitMiddleware, max_bytes=controller.max_body_bytes,
                           body_timeout_s=controller.body_timeout_s)
    app.state.controller = controller
    app.openapi = _bounded_openapi(app)  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(control.error_body(exc), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422; the CONTRACT says a malformed body is 400.
        message = _format_validation(exc, request)
        return JSONResponse(control.error_json("BadRequest", message), status_code=400)

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
        return JSONResponse(control.error_json(code, message), status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        body = control.internal_error_body(controller, request.method, request.url.path, exc)
        return JSONResponse(body, status_code=500)

    @app.put("/instance", status_code=201, responses=_errors(400, 409))
    async def instance_ensure(body: InstanceEnsureRequest) -> InstanceEnsureResponse:
        return control.ensure_response(await controller.ensure(body))

    @app.get("/instance", responses=_errors(404))
    async def instance_get() -> InstanceResponse:
        return control.instance_response(controller.require())

    @app.get("/instance/spec", responses=_errors(404))
    async def instance_spec_get() -> InstanceSpecGetResponse:
        return InstanceSpecGetResponse.model_validate(controller.require().describe_spec())

    @app.get("/instance/migration-status", responses=_errors(404))
    async def instance_migrate_status() -> MigrateStatus:
        return control.migrate_status(controller.require())

    @app.post("/instance/nmi", responses=_errors(400, 404))
    async def instance_issue_nmi() -> None:
        instance = controller.require()
        try:
            await instance.driver.inject_nmi()
        except NotRunningError as exc:
            raise ApiError(400, "NotRunning", str(exc)) from exc

    @app.put("/instance/state", status_code=204, responses=_errors(400, 403, 424))
    async def instance_state_put(requested: Annotated[RequestedState, Body()]) -> Response:
        control.request_state(controller, requested)
        return Response(status_code=204)

    @app.get("/instance/state-monitor", responses=_errors(400, 404))
    async def instance_state_monitor(body: StateMonitorRequest) -> StateMonitorResponse:
        """Wait until the state generation is >= gen; after the server's --long-poll-max-s
        the CURRENT state is answered (gen may be lower: poll again)."""
        return await control.state_monitor(controller, body.gen)

    @app.get("/instance/serial/history", responses=_errors(400, 404))
    async def serial_history(
        from_start: Annotated[QueryInt | None, Query(ge=0, le=MAX_QUERY_INT)] = None,
        most_recent: Annotated[QueryInt | None, Query(ge=0, le=MAX_QUERY_INT)] = None,
        max_bytes: Annotated[QueryInt | None, Query(ge=0, le=MAX_QUERY_INT)] = None,
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
        await control.serial_session(controller, ws)

    # The document's two websocket operations, asked over plain HTTP: a GET is 400 saying
    # so (any other method 405, from these routes), as the document allows ("4XX").
    @app.get("/instance/serial", responses=_errors(400))
    async def instance_serial() -> None:
        raise ApiError(400, "WebsocketRequired", "GET /instance/serial is a websocket: send the upgrade "
                       "headers (Connection: Upgrade, Upgrade: websocket)")

    @app.websocket("/instance/migrate/{migration_id}/start")
    async def instance_migrate_start_ws(ws: WebSocket, migration_id: uuid.UUID) -> None:
        await control.migration_source_session(controller, ws, migration_id)

    @app.get("/instance/migrate/{migration_id}/start", responses=_errors(400))
    async def instance_migrate_start(migration_id: uuid.UUID) -> None:
        raise ApiError(400, "WebsocketRequired", "GET /instance/migrate/{migration_id}/start is a websocket "
                       "that a migration target opens: send the upgrade headers")

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
        crucible = instance.known_backends(kind="crucible")
        if id not in crucible:
            raise ApiError(404, "NoSuchBackend", f"no Crucible backend {id!r}; Crucible backends: {crucible}")
        raise ApiError(400, "Unsupported", "snapshots are not supported by this server's storage")

    return app
