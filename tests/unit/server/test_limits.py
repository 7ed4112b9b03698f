"""HTTP body limits (pure ASGI middleware) and the 500 handler, without a server process."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sut.server.api import ServerController, create_app
from sut.server.instance import VmConfig
from sut.server.limits import BodyLimitMiddleware

Message = dict[str, Any]


async def _echo(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


async def _call(app: Any, headers: list[tuple[bytes, bytes]], chunks: AsyncIterator[Message]
                ) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[Message] = []

    async def receive() -> Message:
        return await anext(chunks)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "PUT", "path": "/instance", "headers": headers}
    await app(scope, receive, send)
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


async def _chunks(n: int, size: int) -> AsyncIterator[Message]:
    for i in range(n):
        yield {"type": "http.request", "body": b"x" * size, "more_body": i < n - 1}


def test_declared_length_over_the_limit_is_413_without_reading() -> None:
    async def never() -> AsyncIterator[Message]:
        raise AssertionError("the body was read")
        yield {}

    app = BodyLimitMiddleware(_echo, max_bytes=1000, body_timeout_s=5)
    status, headers, body = asyncio.run(_call(app, [(b"content-length", b"5000")], never()))
    assert status == 413 and headers[b"connection"] == b"close"
    doc = json.loads(body)
    assert doc["error_code"] == "PayloadTooLarge"
    message = doc["message"]
    assert "5000 bytes" in message and "1000" in message and "--max-body-bytes" in message


def test_streamed_body_is_counted_as_it_arrives() -> None:
    app = BodyLimitMiddleware(_echo, max_bytes=1000, body_timeout_s=5)
    status, _, body = asyncio.run(_call(app, [], _chunks(100, 100)))
    assert status == 413 and "1000" in json.loads(body)["message"]
    status, _, body = asyncio.run(_call(app, [], _chunks(10, 100)))
    assert (status, body) == (200, b"1000")


def test_slow_body_is_408() -> None:
    async def slow() -> AsyncIterator[Message]:
        yield {"type": "http.request", "body": b"x", "more_body": True}
        await asyncio.Event().wait()  # never more
        yield {}

    app = BodyLimitMiddleware(_echo, max_bytes=1000, body_timeout_s=0.05)
    status, headers, body = asyncio.run(_call(app, [], slow()))
    assert status == 408 and headers[b"connection"] == b"close"
    assert "0.05 seconds" in json.loads(body)["message"]


def test_bad_content_length_is_400() -> None:
    app = BodyLimitMiddleware(_echo, max_bytes=1000, body_timeout_s=5)
    status, _, body = asyncio.run(_call(app, [(b"content-length", b"-1")], _chunks(1, 1)))
    assert status == 400 and "Content-Length" in json.loads(body)["message"]


def test_500_answers_a_fixed_message_with_an_id_and_logs_the_detail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    controller = ServerController(VmConfig(data_dir=tmp_path), logging.getLogger("t"))
    app = create_app(controller)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret-internal-detail")

    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        response = client.get("/boom")
    assert response.status_code == 500
    body = response.json()
    assert "secret" not in response.text and "RuntimeError" not in response.text
    # The document's Error body; the request id is the error id the log line carries.
    assert body["error_code"] == "Internal" and body["request_id"] in body["message"]
    logged = [r for r in caplog.records if getattr(r, "error_id", None) == body["request_id"]]
    assert logged and "secret-internal-detail" in (logged[0].exc_text or str(logged[0].exc_info))
