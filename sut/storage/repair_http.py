"""Crucible's repair HTTP API (downstairs-api's repair server), both ends, stdlib only.

A downstairs serves its extent files on ``port + 4000`` so that another downstairs can copy an
extent from it (reconciliation's ExtentRepair, live repair's ExtentLiveRepair). The routes,
status codes, JSON bodies and content types are those the real ``crucible-downstairs``
(oxidecomputer/crucible 6d037cb, a dropshot server) answered when probed; the code is ours:

=====================================  ========================================================
``GET /region-info``                   200, the RegionDefinition as compact JSON
``GET /region-mode``                   200, ``true`` if read-only else ``false``
``GET /work``                          200, ``true``
``GET /extent/{eid}/files``            200, ``["NNN"]`` (the extent's file names); 400 "EBADF"
``GET /extent/{eid}/repair-ready``     200, ``true`` if the extent is closed or read-only
``GET /newextent/{eid}/{file_type}``   200, ``application/octet-stream``: the file's bytes
=====================================  ========================================================

``eid`` is a u32 as Rust parses it (an optional ``+``, decimal digits); ``file_type`` one of
``data``, ``db``, ``db_shm``, ``db_wal``. Path segments are percent-decoded, empty ones (``//``,
a trailing ``/``) are skipped and the query is ignored; a ``.`` or ``..`` segment is 400
"invalid path encoding". An unknown path is 404, another method than GET (HEAD included) 405
with ``allow: GET``. Errors are ``application/json`` bodies ``{"request_id", "message"}``
(indented by two spaces, as dropshot does); every response has an ``x-request-id`` and a
``date``. Differences: a file is sent with a ``content-length`` (the real one: chunked), every
response closes its connection, and the limits below apply.

Bounds (the server): a request head of at most :data:`MAX_REQUEST_HEAD` bytes and
:data:`MAX_HEADERS` lines, received within :data:`REQUEST_DEADLINE_S`; at most
:data:`MAX_REPAIR_CONNECTIONS` connections at once (more are closed at once); a reader too
slow to take the next chunk of a file within :data:`SEND_IDLE_S` is dropped. No file path is
ever built from request text: handlers get an integer and an allowlisted enum.

Bounds (the client, :class:`RepairClient`): a response head of :data:`MAX_REQUEST_HEAD`, a body
of at most the caller's ``max_body`` (a file: its expected size from the region geometry), an
idle deadline on every read and an overall one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import enum
import json
import os
import re
import stat
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sut.storage.stream import ConnectionGuard, ConnectionLimits

__all__ = [
    "MAX_HEADERS",
    "MAX_REPAIR_CONNECTIONS",
    "MAX_REQUEST_HEAD",
    "REQUEST_DEADLINE_S",
    "SEND_IDLE_S",
    "FileType",
    "HttpError",
    "RepairApi",
    "RepairClient",
    "RepairClientError",
    "RepairServer",
    "Request",
    "error_body",
    "parse_request_head",
    "parse_u32",
    "route",
]

MAX_REQUEST_HEAD = 16 * 1024
"""Bytes of request line + headers (and, for the client, of a response head)."""
MAX_HEADERS = 64
REQUEST_DEADLINE_S = 10.0
"""From accept to the end of the request head (the downstairs passes its handshake timeout)."""
SEND_IDLE_S = 30.0
"""Longest wait for a reader to take the next chunk of a response (and, for the client, for the
next bytes of one)."""
MAX_REPAIR_CONNECTIONS = 16
CHUNK = 1 << 20

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")


class FileType(enum.Enum):
    """``file_type`` of ``/newextent``: the extent's data file or a SQLite one (never ours)."""

    data = ""
    db = ".db"
    db_shm = ".db-shm"
    db_wal = ".db-wal"


class HttpError(Exception):
    """An error response: ``status`` and the ``message`` of its JSON body."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.headers = headers


def _bad_param(problem: str) -> HttpError:
    return HttpError(400, f"bad parameter in URL path: {problem}")


# -- parsing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    method: str
    target: str
    segments: tuple[str, ...]
    headers: tuple[tuple[str, str], ...] = ()


def _decode_segment(raw: str) -> str:
    if "%" in raw and _PERCENT.sub("", raw).count("%"):
        raise HttpError(400, "invalid path encoding")
    try:
        decoded = _PERCENT.sub(lambda mt: chr(int(mt.group(1), 16)), raw).encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise HttpError(400, "invalid path encoding") from None
    if decoded in (".", ".."):
        raise HttpError(400, "invalid path encoding")
    return decoded


def parse_request_head(head: bytes) -> Request:
    """The request whose head (request line + headers, CRLF separated, the blank line optional)
    is ``head``; HttpError(400) for anything malformed or over the bounds."""
    if len(head) > MAX_REQUEST_HEAD:
        raise HttpError(400, f"request head over {MAX_REQUEST_HEAD} bytes")
    lines = head.split(b"\r\n")
    while lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise HttpError(400, "empty request")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(400, f"more than {MAX_HEADERS} header lines")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(400, "malformed request line")
    method, raw_target = parts[0].decode("ascii"), parts[1]
    if not raw_target.startswith(b"/") or any(c <= 0x20 or c >= 0x7F for c in raw_target):
        raise HttpError(400, "invalid path encoding")
    target = raw_target.decode("ascii")
    path = target.split("?", 1)[0].split("#", 1)[0]
    segments = tuple(_decode_segment(s) for s in path.split("/") if s)
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name) or b"\n" in value or b"\r" in value:
            raise HttpError(400, "malformed header line")
        headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    return Request(method, target, segments, tuple(headers))


def parse_u32(text: str) -> int:
    """``text`` as Rust's ``u32::from_str`` reads it: an optional ``+`` then ASCII digits."""
    digits = text[1:] if text.startswith("+") else text
    if not digits or len(digits) > 10 or not all("0" <= c <= "9" for c in digits) or int(digits) > 0xFFFFFFFF:
        raise _bad_param(f"unable to parse '{text}' as u32")
    return int(digits)


def _file_type(text: str) -> FileType:
    try:
        return FileType[text]
    except KeyError:
        expected = ", ".join(f"`{t.name}`" for t in FileType)
        raise _bad_param(f"unknown variant `{text}`, expected one of {expected}") from None


# -- routes ------------------------------------------------------------------------------------------
class RepairApi(Protocol):
    """What a downstairs tells its repair server. ``eid`` is any u32: range checks are the
    implementation's (HttpError for a refusal)."""

    def region_info(self) -> dict[str, Any]: ...

    def region_mode(self) -> bool: ...

    def work(self) -> bool: ...

    def extent_files(self, eid: int) -> list[str]: ...

    def extent_repair_ready(self, eid: int) -> bool: ...

    def extent_file(self, eid: int, file_type: FileType) -> Path: ...


@dataclass(frozen=True)
class Json:
    value: Any


@dataclass(frozen=True)
class File:
    path: Path


Handler = Callable[[RepairApi], "Json | File"]


def route(segments: tuple[str, ...]) -> Handler | None:
    """The handler of a GET of this path, None if no route matches (404). Parameters are
    checked when the handler runs (after the method, as dropshot does)."""
    match segments:
        case ("region-info",):
            return lambda api: Json(api.region_info())
        case ("region-mode",):
            return lambda api: Json(api.region_mode())
        case ("work",):
            return lambda api: Json(api.work())
        case ("extent", eid, "files"):
            return lambda api: Json(api.extent_files(parse_u32(eid)))
        case ("extent", eid, "repair-ready"):
            return lambda api: Json(api.extent_repair_ready(parse_u32(eid)))
        case ("newextent", eid, file_type):

            def newextent(api: RepairApi) -> Json | File:
                number = parse_u32(eid)  # the eid first, as serde reads the struct
                return File(api.extent_file(number, _file_type(file_type)))

            return newextent
    return None


def error_body(request_id: str, message: str) -> bytes:
    """dropshot's error body: ``request_id`` and ``message``, indented by two spaces."""
    return json.dumps({"request_id": request_id, "message": message}, indent=2).encode()


def _head(
    status: int, request_id: str, content_type: str, length: int, extra: tuple[tuple[str, str], ...] = ()
) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in extra]
    lines += [
        f"content-type: {content_type}",
        f"x-request-id: {request_id}",
        f"content-length: {length}",
        f"date: {email.utils.formatdate(usegmt=True)}",
        "connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- server ----------------------------------------------------------------------------------------
EventLog = Callable[..., None]


class RepairServer:
    """The repair HTTP server over a :class:`RepairApi`; one request per connection."""

    def __init__(
        self,
        api: RepairApi,
        log: EventLog,
        *,
        max_connections: int = MAX_REPAIR_CONNECTIONS,
        request_deadline_s: float = REQUEST_DEADLINE_S,
    ) -> None:
        self.api = api
        self.log = log
        self.request_deadline_s = request_deadline_s
        self.guard = ConnectionGuard(ConnectionLimits(max_connections=max_connections), log)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, address: str, port: int) -> int:
        self._server = await asyncio.start_server(self._accept, address, port, limit=MAX_REQUEST_HEAD)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if not self.guard.admit(peer):
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(reader, writer, peer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
            self.log("repair_connection_lost", peer=peer, reason=repr(exc)[:200])
        except Exception as exc:  # noqa: BLE001 - a bug costs one request, not the process
            self.log("repair_internal_error", peer=peer, error=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            self.guard.release()
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object) -> None:
        request_id = str(uuid.uuid4())
        try:
            async with asyncio.timeout(self.request_deadline_s):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            self.log("repair_request_timeout", peer=peer, deadline_s=self.request_deadline_s)
            return
        except asyncio.LimitOverrunError:
            await self._send_error(
                writer, request_id, HttpError(400, f"request head over {MAX_REQUEST_HEAD} bytes")
            )
            return
        except asyncio.IncompleteReadError:
            return  # closed before a whole head: nothing to answer
        method = "?"
        try:
            request = parse_request_head(head)
            method = request.method
            handler = route(request.segments)
            if handler is None:
                raise HttpError(404, "Not Found")
            if request.method != "GET":
                raise HttpError(405, "Method Not Allowed", (("allow", "GET"),))
            result = handler(self.api)
        except HttpError as exc:
            self.log("repair_request", peer=peer, method=method, status=exc.status, message=exc.message[:200])
            await self._send_error(writer, request_id, exc, body=method != "HEAD")
            return
        self.log("repair_request", peer=peer, method=method, path=request.target[:200], status=200)
        if isinstance(result, Json):
            body = json.dumps(result.value, separators=(",", ":")).encode()
            writer.write(_head(200, request_id, "application/json", len(body)) + body)
            await self._drain(writer)
        else:
            await self._send_file(writer, request_id, result.path)

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(SEND_IDLE_S):
            await writer.drain()

    async def _send_error(
        self, writer: asyncio.StreamWriter, request_id: str, exc: HttpError, *, body: bool = True
    ) -> None:
        payload = error_body(request_id, exc.message)
        writer.write(_head(exc.status, request_id, "application/json", len(payload), exc.headers))
        if body:
            writer.write(payload)
        await self._drain(writer)

    async def _send_file(self, writer: asyncio.StreamWriter, request_id: str, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            await self._send_error(writer, request_id, HttpError(400, f"file {path.name}: {exc.strerror}"))
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                await self._send_error(
                    writer, request_id, HttpError(400, "Expected a file, found a directory")
                )
                return
            size = st.st_size
            writer.write(_head(200, request_id, "application/octet-stream", size))
            offset = 0
            while offset < size:
                chunk = os.pread(fd, min(CHUNK, size - offset), offset)
                if not chunk:
                    raise ConnectionError(f"{path.name} shrank to {offset} bytes while being sent")
                writer.write(chunk)
                offset += len(chunk)
                await self._drain(writer)
        finally:
            os.close(fd)


# -- client ----------------------------------------------------------------------------------------
class RepairClientError(Exception):
    """A request to a repair server failed. ``in_body``: the response had started (a stream
    error, RepairStreamError) rather than the request or its status (RepairRequestError)."""

    def __init__(self, message: str, *, in_body: bool = False) -> None:
        super().__init__(message)
        self.in_body = in_body


@dataclass
class RepairClient:
    """GETs from one repair server (``host``, ``port``), a connection per request."""

    host: str
    port: int
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = SEND_IDLE_S
    request_timeout_s: float = 600.0
    _host_header: str = field(init=False)

    def __post_init__(self) -> None:
        self._host_header = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def get_json(self, path: str, max_body: int = 64 * 1024) -> Any:
        chunks: list[bytes] = []

        async def keep(data: bytes) -> None:
            chunks.append(data)

        await self._get(path, max_body, keep)
        try:
            return json.loads(b"".join(chunks))
        except ValueError as exc:
            raise RepairClientError(f"GET {path}: the body is not JSON: {exc}", in_body=True) from None

    async def download(self, path: str, sink: Callable[[bytes], Awaitable[None]], max_body: int) -> int:
        """Stream the body of ``path`` into ``sink``; its length (never more than ``max_body``)."""
        return await self._get(path, max_body, sink)

    async def _get(self, path: str, max_body: int, sink: Callable[[bytes], Awaitable[None]]) -> int:
        try:
            async with asyncio.timeout(self.request_timeout_s):
                return await self._exchange(path, max_body, sink)
        except TimeoutError:
            raise RepairClientError(
                f"GET {path}: no complete answer within {self.request_timeout_s}s"
            ) from None

    async def _read(self, what: Awaitable[bytes]) -> bytes:
        try:
            async with asyncio.timeout(self.idle_timeout_s):
                return await what
        except TimeoutError:
            raise RepairClientError(f"nothing received for {self.idle_timeout_s}s", in_body=True) from None

    async def _exchange(self, path: str, max_body: int, sink: Callable[[bytes], Awaitable[None]]) -> int:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_REQUEST_HEAD)
        except (OSError, TimeoutError) as exc:
            raise RepairClientError(f"GET {path}: connecting to {self._host_header}: {exc!r}") from None
        try:
            request = (
                f"GET {path} HTTP/1.1\r\nhost: {self._host_header}\r\n"
                "accept: */*\r\nconnection: close\r\n\r\n"
            )
            writer.write(request.encode("ascii"))
            try:
                head = await self._read(reader.readuntil(b"\r\n\r\n"))
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, ConnectionError) as exc:
                raise RepairClientError(f"GET {path}: bad response head: {exc!r}") from None
            status, headers = _parse_response_head(head, path)
            if status != 200:
                text = b""
                with contextlib.suppress(Exception):
                    text = await self._read(reader.read(4096))
                raise RepairClientError(f"GET {path}: status {status}: {text[:300]!r}")
            try:
                return await self._body(reader, headers, path, max_body, sink)
            except (
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ConnectionError,
                ValueError,
            ) as exc:
                raise RepairClientError(f"GET {path}: body: {exc!r}", in_body=True) from None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _body(
        self,
        reader: asyncio.StreamReader,
        headers: dict[str, str],
        path: str,
        max_body: int,
        sink: Callable[[bytes], Awaitable[None]],
    ) -> int:
        total = 0

        def count(n: int) -> None:
            nonlocal total
            total += n
            if total > max_body:
                raise RepairClientError(f"GET {path}: body over {max_body} bytes", in_body=True)

        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                line = await self._read(reader.readuntil(b"\r\n"))
                size_text = line.split(b";", 1)[0].strip()
                if not size_text or len(size_text) > 16 or not re.fullmatch(rb"[0-9A-Fa-f]+", size_text):
                    raise RepairClientError(f"GET {path}: bad chunk size {line[:40]!r}", in_body=True)
                size = int(size_text, 16)
                if size == 0:
                    while (await self._read(reader.readuntil(b"\r\n"))) != b"\r\n":
                        pass  # trailers, each bounded by the reader's limit
                    return total
                count(size)
                left = size
                while left:
                    data = await self._read(reader.read(min(CHUNK, left)))
                    if not data:
                        raise RepairClientError(f"GET {path}: closed inside a chunk", in_body=True)
                    left -= len(data)
                    await sink(data)
                if await self._read(reader.readexactly(2)) != b"\r\n":
                    raise RepairClientError(f"GET {path}: no CRLF after a chunk", in_body=True)
        length_text = headers.get("content-length")
        if length_text is not None:
            if not length_text.isdigit() or len(length_text) > 19:
                raise RepairClientError(f"GET {path}: bad content-length {length_text[:40]!r}")
            length = int(length_text)
            count(length)
            left = length
            while left:
                data = await self._read(reader.read(min(CHUNK, left)))
                if not data:
                    raise RepairClientError(
                        f"GET {path}: closed after {length - left} of {length} bytes", in_body=True
                    )
                left -= len(data)
                await sink(data)
            return total
        while data := await self._read(reader.read(CHUNK)):  # until the server closes
            count(len(data))
            await sink(data)
        return total


def _parse_response_head(head: bytes, path: str) -> tuple[int, dict[str, str]]:
    lines = head.split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
        raise RepairClientError(f"GET {path}: bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise RepairClientError(f"GET {path}: bad header line {line[:80]!r}")
        headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    if len(headers) > MAX_HEADERS:
        raise RepairClientError(f"GET {path}: more than {MAX_HEADERS} headers")
    return int(status_line[1]), headers
