"""sut.storage.repair_http: request parsing, routes, and the client's bounds against fake servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sut.storage.repair_http import (
    MAX_HEADERS,
    MAX_REQUEST_HEAD,
    FileType,
    HttpError,
    RepairClient,
    RepairClientError,
    RepairServer,
    error_body,
    parse_request_head,
    parse_u32,
    route,
)


# -- request heads ---------------------------------------------------------------------------------
def test_parse_request_head_basic() -> None:
    req = parse_request_head(b"GET /extent/3/files?x=1 HTTP/1.1\r\nHost: a:1\r\nX-Y:  z \r\n\r\n")
    assert req.method == "GET"
    assert req.target == "/extent/3/files?x=1"
    assert req.segments == ("extent", "3", "files")
    assert req.headers == (("host", "a:1"), ("x-y", "z"))


@pytest.mark.parametrize(
    ("target", "segments"),
    [
        ("/", ()),
        ("//region-info/", ("region-info",)),
        ("/extent/%31/files", ("extent", "1", "files")),
        ("/newextent/0/db%5Fshm", ("newextent", "0", "db_shm")),
        ("/a%2Fb", ("a/b",)),  # decoded inside one segment: it never becomes a separator
        ("/x#frag", ("x",)),
    ],
)
def test_parse_request_head_segments(target: str, segments: tuple[str, ...]) -> None:
    assert parse_request_head(f"GET {target} HTTP/1.1\r\n\r\n".encode()).segments == segments


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"\r\n\r\n",
        b"GET /work\r\n\r\n",
        b"GET /work HTTP/1.2\r\n\r\n",
        b"GET /work HTTP/1.1 extra\r\n\r\n",
        b"G(T /work HTTP/1.1\r\n\r\n",
        b"GET work HTTP/1.1\r\n\r\n",
        b"GET http://x/work HTTP/1.1\r\n\r\n",
        b"GET /w\xffrk HTTP/1.1\r\n\r\n",
        b"GET /w\x7frk HTTP/1.1\r\n\r\n",
        b"GET /a/../b HTTP/1.1\r\n\r\n",
        b"GET /a/./b HTTP/1.1\r\n\r\n",
        b"GET /a/%2e%2E/b HTTP/1.1\r\n\r\n",
        b"GET /a/% HTTP/1.1\r\n\r\n",
        b"GET /a/%g0 HTTP/1.1\r\n\r\n",
        b"GET /a/%ff HTTP/1.1\r\n\r\n",  # not UTF-8
        b"GET /work HTTP/1.1\r\nno colon\r\n\r\n",
        b"GET /work HTTP/1.1\r\nbad name: x\r\n\r\n",
        b"GET /work HTTP/1.1\r\n folded\r\n\r\n",
        b"GET /work HTTP/1.1\r\n" + b"a: b\r\n" * (MAX_HEADERS + 1) + b"\r\n",
        b"GET /" + b"a" * MAX_REQUEST_HEAD + b" HTTP/1.1\r\n\r\n",
    ],
)
def test_parse_request_head_refuses(head: bytes) -> None:
    with pytest.raises(HttpError) as info:
        parse_request_head(head)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0), ("+1", 1), ("007", 7), ("4294967295", 0xFFFFFFFF), ("+0000000001", 1)]
)
def test_parse_u32_as_rust(text: str, value: int) -> None:
    assert parse_u32(text) == value


@pytest.mark.parametrize(
    "text", ["", "+", "-1", "4294967296", "1e3", "0x1", " 1", "1 ", "\u0661", "9" * 5000, "++1"]
)
def test_parse_u32_refuses(text: str) -> None:
    with pytest.raises(HttpError) as info:
        parse_u32(text)
    assert info.value.status == 400
    assert info.value.message == f"bad parameter in URL path: unable to parse '{text}' as u32"


class FakeApi:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, object]] = []

    def region_info(self) -> dict[str, Any]:
        return {"block_size": 512}

    def region_mode(self) -> bool:
        return False

    def work(self) -> bool:
        return True

    def extent_files(self, eid: int) -> list[str]:
        self.calls.append(("files", eid))
        return [f"{eid:03X}"]

    def extent_repair_ready(self, eid: int) -> bool:
        self.calls.append(("ready", eid))
        return eid == 1

    def extent_file(self, eid: int, file_type: FileType) -> Path:
        self.calls.append(("file", (eid, file_type)))
        if eid != 0 or file_type is not FileType.data:
            raise HttpError(400, "no such file")
        return self.root / "extent0"


def test_routes(tmp_path: Path) -> None:
    api = FakeApi(tmp_path)
    assert route(("nothing",)) is None
    assert route(("extent", "1")) is None
    assert route(("newextent", "0", "data", "x")) is None
    for segments, value in [
        (("region-info",), {"block_size": 512}),
        (("region-mode",), False),
        (("work",), True),
        (("extent", "+2", "files"), ["002"]),
        (("extent", "1", "repair-ready"), True),
    ]:
        handler = route(segments)
        assert handler is not None
        assert handler(api).value == value  # type: ignore[union-attr]
    handler = route(("newextent", "x", "junk"))
    assert handler is not None
    with pytest.raises(HttpError, match="unable to parse 'x' as u32"):  # the eid first
        handler(api)
    handler = route(("newextent", "0", "db-wal"))
    assert handler is not None
    with pytest.raises(HttpError) as info:
        handler(api)
    assert info.value.message == (
        "bad parameter in URL path: unknown variant `db-wal`, "
        "expected one of `data`, `db`, `db_shm`, `db_wal`"
    )
    assert not any(c[0] == "file" for c in api.calls)  # refused before the api is asked


def test_error_body_is_dropshots() -> None:
    assert error_body("r-1", "EBADF") == b'{\n  "request_id": "r-1",\n  "message": "EBADF"\n}'


# -- server and client in one loop -------------------------------------------------------------------
def _run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_server_and_client_round_trip(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 5000  # over one 1 MiB chunk
    (tmp_path / "extent0").write_bytes(payload)
    events: list[str] = []

    async def main() -> None:
        server = RepairServer(FakeApi(tmp_path), lambda event, **_: events.append(event))
        port = await server.start("127.0.0.1", 0)
        try:
            client = RepairClient("127.0.0.1", port)
            assert await client.get_json("/extent/0/files") == ["000"]
            assert await client.get_json("/extent/1/repair-ready") is True
            got = bytearray()

            async def sink(data: bytes) -> None:
                got.extend(data)

            assert await client.download("/newextent/0/data", sink, len(payload)) == len(payload)
            assert got == payload
            with pytest.raises(RepairClientError) as info:
                await client.download("/newextent/0/data", sink, len(payload) - 1)
            assert info.value.in_body is True  # too long: a stream error (from its content-length)
            with pytest.raises(RepairClientError, match="status 400") as info:
                await client.get_json("/newextent/1/data")
            assert info.value.in_body is False
            with pytest.raises(RepairClientError, match="status 404"):
                await client.get_json("/nothing")
        finally:
            await server.stop()

    _run(main())
    assert "repair_request" in events


Responder = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _fake_server(respond: Responder) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            await respond(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def _download(respond: Responder, max_body: int, **client_args: float) -> bytes:
    server, port = await _fake_server(respond)
    got = bytearray()

    async def sink(data: bytes) -> None:
        got.extend(data)

    try:
        await RepairClient("127.0.0.1", port, **client_args).download("/newextent/0/data", sink, max_body)
    finally:
        server.close()
    return bytes(got)


def _respond_with(raw: bytes) -> Responder:
    async def respond(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()

    return respond


def test_client_reads_a_chunked_body_as_the_real_one_sends_it() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nt: 1\r\n\r\n"
    )
    assert asyncio.run(_download(_respond_with(raw), 11)) == b"hello world"


def test_client_reads_to_the_end_without_a_length() -> None:
    raw = b"HTTP/1.0 200 OK\r\n\r\nabc"
    assert asyncio.run(_download(_respond_with(raw), 3)) == b"abc"


@pytest.mark.parametrize(
    ("raw", "in_body"),
    [
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", True),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\n", True),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabcdXX0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nab", True),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 16\r\n\r\n", True),  # over max_body: refused at once
        (b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nabc", True),  # closed early
        (b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"y" * 20, True),  # no length, too long
        (b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n", False),
        (b"SSH-2.0-x\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\n" + b"h: v\r\n" * 5000, False),  # a head over the bound
    ],
)
def test_client_refuses_bad_responses(raw: bytes, in_body: bool) -> None:
    with pytest.raises(RepairClientError) as info:
        asyncio.run(_download(_respond_with(raw), 8))
    assert info.value.in_body == in_body


def test_client_gives_up_on_a_silent_server() -> None:
    async def silent(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes

    with pytest.raises(RepairClientError, match="nothing received"):
        asyncio.run(_download(silent, 8, idle_timeout_s=0.2))


def test_client_refuses_a_connection_it_cannot_make() -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = int(server.sockets[0].getsockname()[1])
        server.close()
        await server.wait_closed()
        with pytest.raises(RepairClientError, match="connecting"):
            await RepairClient("127.0.0.1", port).get_json("/work")

    asyncio.run(main())


def test_client_refuses_a_body_that_is_not_json() -> None:
    async def main() -> None:
        server, port = await _fake_server(_respond_with(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n{x}"))
        try:
            with pytest.raises(RepairClientError, match="not JSON"):
                await RepairClient("127.0.0.1", port).get_json("/work")
        finally:
            server.close()

    asyncio.run(main())
    assert json.loads(b"true") is True
