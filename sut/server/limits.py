"""Bounds on what one HTTP client can make the server hold: bytes, time, connections.

Two layers, each small:

- :class:`BodyLimitMiddleware` (pure ASGI, in front of FastAPI): a request body is at most
  ``max_bytes`` - refused with 413 on its Content-Length before a byte is read, and counted
  as it arrives when it is streamed or chunked - and must arrive within ``body_timeout_s``
  (else 408). The body is collected here (at most ``max_bytes``) and replayed to the app,
  so memory per request is bounded whatever the client sends.
- :class:`GuardedH11Protocol` (uvicorn's HTTP/1.1 protocol with two additions): a request's
  HEADERS must arrive within ``header_timeout_s`` of the connection or of the previous
  response (a slowloris trickle is cut off with 408), and at most ``max_connections``
  connections are open: a new one evicts the longest-idle keep-alive connection, and only
  when every connection is busy with a request is the new one answered 503. Hundreds of idle
  sockets therefore cost a well-behaved client nothing.

Every refusal is propolis-server 5.0.0's Error body, ``{"message": text, "request_id": ID,
"error_code": CODE}``, with ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from sut.server.defaults import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
)

__all__ = [
    "DEFAULT_BODY_TIMEOUT_S",
    "DEFAULT_HEADER_TIMEOUT_S",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "BodyLimitMiddleware",
    "GuardedH11Protocol",
    "guarded_protocol",
]


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


def error_json(code: str, message: str) -> bytes:
    """The document's Error body (control.error_json's, without importing pydantic here)."""
    return json.dumps({"message": message, "request_id": uuid.uuid4().hex, "error_code": code}).encode()


def error_bytes(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response, for refusals written straight to a socket."""
    body = error_json(code, message)
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code, self.message = status, code, message
        super().__init__(message)


class BodyLimitMiddleware:
    def __init__(self, app: Asgi, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s

    def _too_large(self, size: str) -> _Refused:
        return _Refused(413, "PayloadTooLarge",
                        f"request body of {size} is over the limit of {self.max_bytes} bytes "
                        "(the server's --max-body-bytes)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read_body(scope, receive)
        except _Refused as refused:
            await _send_error(send, refused)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only http.disconnect comes

        await self.app(scope, replay, send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length":
                text = value.decode("latin-1")
                if not text.isdigit() or len(text) > 19:
                    raise _Refused(400, "BadRequest", f"Content-Length {text[:40]!r} is not a byte count")
                if int(text) > self.max_bytes:
                    raise self._too_large(f"{int(text)} bytes (Content-Length)")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        break  # http.disconnect: the app sees an empty body and the client is gone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise self._too_large(f"more than {self.max_bytes} bytes (streamed)")
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise _Refused(408, "RequestTimeout",
                           f"the request body did not arrive within {self.body_timeout_s:g} seconds "
                           f"({size} bytes came); send it at once") from None
        return b"".join(chunks)


async def _send_error(send: Send, refused: _Refused) -> None:
    body = error_json(refused.code, refused.message)
    await send({"type": "http.response.start", "status": refused.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class GuardedH11Protocol(H11Protocol):
    header_timeout_s = DEFAULT_HEADER_TIMEOUT_S
    max_connections = DEFAULT_MAX_CONNECTIONS

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._upgraded = False
        self.last_active = time.monotonic()

    @property
    def busy(self) -> bool:
        """A request is being served (its response is not complete)."""
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()
        if len(self.connections) > self.max_connections and not self._evict_idle():
            self._refuse(503, "Service Unavailable", "TooManyConnections",
                         f"{len(self.connections) - 1} connections are busy (the server's "
                         "--max-connections); retry later")

    def _evict_idle(self) -> bool:
        idle = [c for c in self.connections
                if c is not self and isinstance(c, GuardedH11Protocol) and not c.busy]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.last_active)
        oldest.transport.close()
        self.connections.discard(oldest)
        return True

    def _refuse(self, status: int, reason: str, code: str, message: str) -> None:
        self._disarm_header_deadline()
        if not self.transport.is_closing():
            self.transport.write(error_bytes(status, reason, code, message))
            self.transport.close()
        self.connections.discard(self)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.busy and not self._upgraded:
            self._refuse(408, "Request Timeout", "RequestTimeout",
                         f"the request headers did not arrive within {self.header_timeout_s:g} seconds")

    def handle_websocket_upgrade(self, event: Any) -> None:
        # The connection now belongs to the websocket protocol: no deadline of ours may
        # write into it (a serial console is rightly open for hours).
        self._upgraded = True
        self._disarm_header_deadline()
        super().handle_websocket_upgrade(event)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        super().data_received(data)
        if self._upgraded:
            return
        if self.busy:
            self._disarm_header_deadline()  # the body has its own deadline (BodyLimitMiddleware)
        else:
            self._arm_header_deadline()  # part of the next request: its headers are on the clock

    def on_response_complete(self) -> None:
        self.last_active = time.monotonic()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)


def guarded_protocol(*, header_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` class with these limits (uvicorn wants a class)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "max_connections": max_connections})
