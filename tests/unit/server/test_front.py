"""The server's front (front.py) answers the launch path's requests byte for byte as the FastAPI
app (api.py) does, and hands every other request to it.

Both apps get the same requests in the same order, each with a controller of its own (no QEMU:
the instance is stopped from Creating); every answer's status, headers and body must be equal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from sut.path_policy import PathPolicy
from sut.server.api import create_app
from sut.server.control import ServerController
from sut.server.front import Front, create_front
from sut.server.instance import VmConfig
from tests import v5

Request = tuple[str, str, dict[str, str], bytes]
JSON = {"content-type": "application/json"}
INSTANCE_ID = str(uuid.UUID(int=7))


def _controller(tmp_path: Path, name: str) -> ServerController:
    # Short: the run directory's unix socket paths must fit in 107 bytes (pytest's tmp_path
    # under xdist does not leave room for "fastapi/vm-<id>/qmp.sock").
    data_dir = Path(tempfile.mkdtemp(prefix=f"front-{name[:2]}-"))
    config = VmConfig(data_dir=data_dir, paths=PathPolicy([tmp_path]))
    return ServerController(config, logging.getLogger(f"test.front.{name}"), long_poll_max_s=0.2)


def _ensure_body(kernel: Path, **extra: Any) -> bytes:
    body = v5.ensure(v5.spec(v5.disk("d0", v5.file_backend(kernel))), name="vm", instance_id=INSTANCE_ID)
    body["properties"].update(extra)
    return json.dumps(body, ensure_ascii=False).encode()


def _monitor(gen: int) -> Request:
    return ("GET", "/instance/state-monitor", JSON, b'{"gen": %d}' % gen)


def _front(app: Any) -> Front:
    front = app.app
    assert isinstance(front, Front)
    return front


async def _answers(app: Any, requests: list[Request]) -> list[tuple[int, list[tuple[bytes, bytes]], bytes]]:
    transport = httpx.ASGITransport(app=app)
    out = []
    async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
        for method, url, headers, body in requests:
            response = await client.request(method, url, headers=headers, content=body)
            # httpx adds nothing to the app's headers; compare them as sent. An Error body's
            # request id is new on every answer (the same length, so Content-Length agrees).
            content = re.sub(rb'"request_id":"[0-9a-f]+"', b'"request_id":"ID"', response.content)
            out.append((response.status_code, list(response.headers.raw), content))
    return out


def _compare(tmp_path: Path, requests: list[Request],
             check_front: Callable[[Front], None] | None = None) -> list[int]:
    fast = _controller(tmp_path, "front")
    full = _controller(tmp_path, "fastapi")
    front_app = create_front(fast)

    async def run() -> tuple[list[Any], list[Any]]:
        try:
            got = await _answers(front_app, requests)
            if check_front is not None:
                check_front(_front(front_app))
            want = await _answers(create_app(full), requests)
        finally:
            await fast.shutdown()
            await full.shutdown()
            for controller in (fast, full):
                shutil.rmtree(controller.config.data_dir, ignore_errors=True)
        return got, want

    got, want = asyncio.run(run())
    for request, mine, theirs in zip(requests, got, want, strict=True):
        assert mine == theirs, request
    return [status for status, _, _ in got]


def _kernel(tmp_path: Path) -> Path:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not really a kernel")
    return kernel


def test_the_launch_path_is_answered_by_the_front_as_by_fastapi(tmp_path: Path) -> None:
    kernel = _kernel(tmp_path)
    # Properties are echoed: non-ASCII text; extra keys the document does not name are ignored.
    body = _ensure_body(kernel, description="caf\u00e9 \U0001f600", ratio=1e100, tags=[1, {"a": None}])
    requests: list[Request] = [
        ("GET", "/instance", {}, b""),
        _monitor(0),
        ("PUT", "/instance/state", JSON, b'"Run"'),
        ("PUT", "/instance", JSON, body),
        ("PUT", "/instance", {"content-type": "application/json; charset=utf-8"}, body),
        ("GET", "/instance", {}, b""),
        ("GET", "/instance?ignored=1", {}, b""),
        _monitor(0),
        _monitor(1),
        _monitor(2),  # times out: the current state
        ("PUT", "/instance/state", {"content-type": "application/merge+json"}, b' "Reboot" '),
        ("PUT", "/instance/state", JSON, b'"Stop"'),
        ("PUT", "/instance/state", JSON, b'"Stop"'),
        _monitor(3),
        ("PUT", "/instance/state", JSON, b'"Run"'),
        ("GET", "/instance", {}, b""),
    ]

    def nothing_handed_over(front: Front) -> None:
        assert front._full is None, "a launch-path request went to the FastAPI app"

    statuses = _compare(tmp_path, requests, nothing_handed_over)
    assert statuses == [404, 404, 424, 201, 409, 200, 200, 200, 200, 200, 403, 204, 204, 200, 424, 200]


@pytest.mark.parametrize("request_", [
    ("PUT", "/instance", {}, b"BODY"),  # no Content-Type
    ("PUT", "/instance", {"content-type": "text/plain"}, b"BODY"),
    ("PUT", "/instance", JSON, b""),
    ("PUT", "/instance", JSON, b"{"),
    ("PUT", "/instance", JSON, b"[]"),
    ("PUT", "/instance", JSON, b'{"properties": {}, "spec": {}}'),
    ("PUT", "/instance", JSON, b"1" * 30),
    ("PUT", "/instance", JSON, b"[" * 100 + b"]" * 100),
    ("PUT", "/instance/state", JSON, b'"run"'),
    ("PUT", "/instance/state", JSON, b'["Run"]'),
    ("PUT", "/instance/state", {}, b'"Run"'),
    ("PUT", "/instance/state", {"content-type": "text/json"}, b'"Run"'),
    ("GET", "/instance/state-monitor", {}, b""),
    ("GET", "/instance/state-monitor?gen=1", {}, b""),
    ("GET", "/instance/state-monitor?gen=1", JSON, b'{"gen": 1}'),
    ("GET", "/instance/state-monitor", JSON, b'{"gen": -1}'),
    ("GET", "/instance/state-monitor", JSON, b'{"gen": "1"}'),
    ("GET", "/instance/state-monitor", JSON, b'{"gen": true}'),
    ("GET", "/instance/state-monitor", JSON, b'{"gen": 1, "more": 2}'),
    ("GET", "/instance/state-monitor", JSON, b'{"gen": 18446744073709551616}'),
    ("GET", "/instance/state-monitor", {}, b'{"gen": 1}'),
    ("HEAD", "/instance", {}, b""),
    ("POST", "/instance", JSON, b"{}"),
    ("GET", "/instance/", {}, b""),
    ("GET", "/instance/serial/history", {}, b""),
    ("GET", "/nope", {}, b""),
], ids=lambda r: f"{r[0]} {r[1]} {r[3][:20]!r}")
def test_anything_else_is_answered_by_fastapi(tmp_path: Path, request_: Request) -> None:
    kernel = _kernel(tmp_path)
    requests: list[Request] = [("PUT", "/instance", JSON, _ensure_body(kernel)), request_]

    def handed_over(front: Front) -> None:
        assert front._full is not None

    _compare(tmp_path, requests, handed_over)


def test_the_openapi_document_comes_from_fastapi(tmp_path: Path) -> None:
    _compare(tmp_path, [("GET", "/openapi.json", {}, b""), ("PUT", "/openapi.json", {}, b"")])


def test_an_unexpected_error_is_the_fixed_500(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    controller = _controller(tmp_path, "front")

    def boom(self: Any) -> Any:
        raise RuntimeError("secret-internal-detail")

    monkeypatch.setattr(ServerController, "require", boom)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/instance", "headers": [], "query_string": b""}
    run: Callable[[], Awaitable[None]] = lambda: create_front(controller)(scope, receive, send)  # noqa: E731
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError):
        asyncio.run(run())  # on to uvicorn, after the answer, as FastAPI's ServerErrorMiddleware does
    assert sent[0]["status"] == 500
    body = json.loads(sent[1]["body"])
    assert body["error_code"] == "Internal" and body["request_id"] in body["message"]
    assert "secret" not in sent[1]["body"].decode()
    assert [r for r in caplog.records if getattr(r, "error_id", None) == body["request_id"]]
