"""The server's ASGI app: the launch path's requests at once, everything else through FastAPI.

A VM's launch makes a handful of well-formed requests: ``GET /instance`` (the harness's
ready check), ``PUT /instance``, ``PUT /instance/state``, ``GET /instance/state-monitor``
and the serial websocket. This front answers those itself, with the same handler logic as
the FastAPI app (control.py) and byte for byte the same answers, so the server can serve
without importing FastAPI, which takes some 0.2 s of the process's start-up. Any other
request - another route or method, a body that is not JSON, any value FastAPI would refuse,
a large body, the OpenAPI document - goes to the FastAPI app of api.py, built (imported) on
the first such request; it validates and answers exactly as before, 400 messages included.

What "well-formed" means here is deliberately narrow: when in doubt a request is handed
over, never refused (tests/unit/server/test_front.py compares both apps request by request).
"""

from __future__ import annotations

import email.message
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sut import bounded_json
from sut.server import control
from sut.server.control import ApiError, RequestedState, ServerController
from sut.server.limits import BodyLimitMiddleware
from sut.server.spec import InstanceEnsureRequest

__all__ = ["Front", "create_front"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

# The state monitor's generation is a u64 (the document's InstanceStateMonitorRequest).
MAX_GEN = 2**64 - 1
_STATES = {state.value: state for state in RequestedState}


class _HandOver(Exception):
    """This request is not one the front answers: the FastAPI app does."""


class _Answer:
    """A response as Starlette's Response (and FastAPI's model answers) sends it."""

    def __init__(self, status: int, body: bytes = b"", media_type: str | None = "application/json") -> None:
        self.status = status
        self.body = body
        self.headers: list[tuple[bytes, bytes]] = []
        if not (status < 200 or status in (204, 304)):
            self.headers.append((b"content-length", str(len(body)).encode("latin-1")))
        if media_type is not None:
            self.headers.append((b"content-type", media_type.encode("latin-1")))

    @classmethod
    def json(cls, status: int, content: object) -> _Answer:
        """Starlette's JSONResponse (compact, UTF-8, no NaN)."""
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
        return cls(status, text.encode("utf-8"))

    async def send(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    # The first one, as Starlette's Headers.get reads it.
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


class Front:
    """The ASGI app behind the body limits; ``full_app()`` is the FastAPI app."""

    def __init__(self, controller: ServerController) -> None:
        self.controller = controller
        self._limits = bounded_json.JsonLimits(max_bytes=controller.max_body_bytes)
        self._full: Asgi | None = None
        self._routes: dict[tuple[str, str], Callable[[Scope, bytes], Awaitable[_Answer]]] = {
            ("GET", "/instance"): self._instance_get,
            ("PUT", "/instance"): self._instance_ensure,
            ("PUT", "/instance/state"): self._instance_state_put,
            ("GET", "/instance/state-monitor"): self._state_monitor,
        }

    def full_app(self) -> Asgi:
        """The FastAPI app of api.py, imported and built on the first call (some 0.2 s)."""
        if self._full is None:
            from sut.server.api import create_app

            self._full = create_app(self.controller, body_limits=False)
        return self._full

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("root_path"):
            await self.full_app()(scope, receive, send)
        elif scope["type"] == "http" and (scope["method"], scope["path"]) in self._routes:
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket" and scope["path"] == "/instance/serial":
            from starlette.websockets import WebSocket

            await control.serial_session(self.controller, WebSocket(scope, receive=receive, send=send))
        else:
            await self.full_app()(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The body limits ran first: the whole body is in the first message.
        first = await receive()
        body = bytes(first.get("body", b"")) if first["type"] == "http.request" else b""
        handler = self._routes[(scope["method"], scope["path"])]
        try:
            answer = await handler(scope, body)
        except _HandOver:
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return first
                return await receive()

            await self.full_app()(scope, replay, send)
            return
        except ApiError as exc:
            answer = _Answer.json(exc.status, control.error_body(exc))
        except Exception as exc:
            # As FastAPI's ServerErrorMiddleware: the fixed 500 answer, then the exception
            # goes on to uvicorn (which logs it).
            body_500 = control.internal_error_body(self.controller, scope["method"], scope["path"], exc)
            await _Answer.json(500, body_500).send(send)
            raise
        await answer.send(send)

    def _json_body(self, scope: Scope, body: bytes) -> Any:
        """The JSON body as FastAPI would read it, or _HandOver (anything unusual)."""
        if not body or len(body) >= control.TAKE_TURNS_BYTES:
            raise _HandOver  # missing (a 400), or big enough to take turns parsing (api.py)
        content_type = _header(scope, b"content-type")
        if not content_type:
            raise _HandOver  # FastAPI does not read it as JSON (a 400)
        message = email.message.Message()
        message["content-type"] = content_type.decode("latin-1")
        subtype = message.get_content_subtype()
        is_json = subtype == "json" or subtype.endswith("+json")
        if message.get_content_maintype() != "application" or not is_json:
            raise _HandOver
        try:
            return bounded_json.loads(body, self._limits)
        except Exception:  # noqa: BLE001 - FastAPI's answer (400) says what is wrong
            raise _HandOver from None

    async def _instance_get(self, scope: Scope, body: bytes) -> _Answer:
        return _model_answer(200, control.instance_response(self.controller.require()))

    async def _instance_ensure(self, scope: Scope, body: bytes) -> _Answer:
        value = self._json_body(scope, body)
        try:
            # As FastAPI validates a body parameter.
            request = InstanceEnsureRequest.model_validate(value, from_attributes=True)
        except Exception:  # noqa: BLE001 - FastAPI's answer (400) names the field
            raise _HandOver from None
        instance = await self.controller.ensure(request)
        return _model_answer(201, control.ensure_response(instance))

    async def _instance_state_put(self, scope: Scope, body: bytes) -> _Answer:
        value = self._json_body(scope, body)
        requested = _STATES.get(value) if isinstance(value, str) else None
        if requested is None:
            raise _HandOver
        control.request_state(self.controller, requested)
        return _Answer(204, media_type=None)

    async def _state_monitor(self, scope: Scope, body: bytes) -> _Answer:
        # v5: a GET whose JSON body is {"gen": N}. Anything else (a query string, another
        # key, a gen that is not a u64) is FastAPI's to answer.
        value = self._json_body(scope, body)
        gen = value.get("gen") if isinstance(value, dict) and list(value) == ["gen"] else None
        if scope.get("query_string") or type(gen) is not int or not 0 <= gen <= MAX_GEN:
            raise _HandOver
        return _model_answer(200, await control.state_monitor(self.controller, gen))


def _model_answer(status: int, model: Any) -> _Answer:
    # FastAPI's answer for a route's response model: pydantic's JSON of it.
    return _Answer(status, model.model_dump_json(by_alias=True).encode())


def create_front(controller: ServerController) -> Asgi:
    """The server's app: body limits (limits.py), then :class:`Front`."""
    return BodyLimitMiddleware(Front(controller), max_bytes=controller.max_body_bytes,
                               body_timeout_s=controller.body_timeout_s)
