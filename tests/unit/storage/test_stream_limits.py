"""The stream layer's rules for input from strangers (over real loopback sockets).

- a small record cap until the connection's owner says it is negotiated, then a larger one;
- payload buffers grow with the bytes that arrive, never to what a head merely declares;
- a connection not negotiated within the handshake deadline is closed;
- at most ``max_connections`` at once: the excess is closed at once and reported.
"""

from __future__ import annotations

import asyncio
import struct
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from sut.storage.errors import ProtocolError
from sut.storage.stream import (
    DIRECT_PAYLOAD,
    HANDSHAKE_MAX_RECORD,
    ConnectionGuard,
    ConnectionLimits,
    RecordStream,
    RecordWriter,
    create_server,
    open_stream,
)

_HEAD = struct.Struct(">II")  # payload length | sequence number


def split(data: memoryview) -> tuple[int, int] | None:
    if len(data) < _HEAD.size:
        return None
    return _HEAD.size, _HEAD.unpack_from(data)[0]


def record(seq: int, length: int) -> bytes:
    return _HEAD.pack(length, seq) + bytes([seq % 251]) * length


def run(coro: Any) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, 30)

    asyncio.run(bounded())


class Server:
    """A loopback server whose accepted streams are queued for the test; events recorded."""

    def __init__(self, limits: ConnectionLimits | None) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.guard = None if limits is None else ConnectionGuard(limits, self._event)
        self.accepted: asyncio.Queue[tuple[RecordStream, RecordWriter]] = asyncio.Queue()
        self.release = asyncio.Event()
        self.port = 0

    def _event(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    async def on_connect(self, stream: RecordStream, writer: RecordWriter) -> None:
        await self.accepted.put((stream, writer))
        await self.release.wait()


@asynccontextmanager
async def serving(limits: ConnectionLimits | None = None) -> AsyncIterator[Server]:
    srv = Server(limits)
    server = await create_server(srv.on_connect, "127.0.0.1", 0, split, guard=srv.guard)
    srv.port = server.sockets[0].getsockname()[1]
    try:
        yield srv
    finally:
        srv.release.set()
        server.close()
        await server.wait_closed()


async def client(srv: Server) -> tuple[RecordStream, RecordWriter]:
    return await open_stream("127.0.0.1", srv.port)


async def eof(stream: RecordStream, timeout_s: float = 5.0) -> None:
    """The peer closed: read_record ends (None, or the error that closed it)."""
    try:
        got = await asyncio.wait_for(stream.read_record(), timeout_s)
    except (ProtocolError, ConnectionError, asyncio.IncompleteReadError):
        return
    assert got is None, f"expected the connection to be closed, got a record {got[0]!r}"


def test_records_over_the_handshake_cap_are_refused_until_negotiated() -> None:
    async def main() -> None:
        async with serving() as srv:
            _s, w = await client(srv)
            stream, _sw = await srv.accepted.get()
            assert stream.max_record == HANDSHAKE_MAX_RECORD
            w.write(record(1, 1000))
            w.write(_HEAD.pack(80 << 20, 2))  # declares 80 MiB; nothing allocated for it
            got = await stream.read_record()
            assert got is not None and len(got[1]) == 1000
            with pytest.raises(
                ProtocolError, match=r"\d+ bytes exceeds .*limit of 65536 bytes before negotiation"
            ):
                await stream.read_record()
            assert stream.payload_buffer_bytes == 0
            w.close()

            _s, w = await client(srv)
            stream, _sw = await srv.accepted.get()
            stream.negotiated(4 << 20)
            w.write(record(3, 1 << 20))
            got = await stream.read_record()
            assert got is not None and len(got[1]) == 1 << 20
            w.write(_HEAD.pack((4 << 20) + 1, 4))
            with pytest.raises(ProtocolError, match="exceeds"):
                await stream.read_record()
            w.close()

    run(main())


def test_the_cap_also_bounds_a_client_stream() -> None:
    async def main() -> None:
        async with serving() as srv:
            stream, _w = await client(srv)
            _s, sw = await srv.accepted.get()
            stream.set_splitter(split)
            sw.write(_HEAD.pack(1 << 30, 1))
            with pytest.raises(ProtocolError, match="exceeds"):
                await stream.read_record()

    run(main())


def test_a_payload_buffer_grows_with_the_bytes_that_arrive() -> None:
    async def main() -> None:
        async with serving() as srv:
            _s, w = await client(srv)
            stream, _sw = await srv.accepted.get()
            stream.negotiated(64 << 20)
            declared = 32 << 20
            body = bytes(range(256)) * (declared // 256)
            w.write(_HEAD.pack(declared, 1) + body[: 100 * 1024])
            await w.drain()
            tracemalloc.start()
            try:
                # (SO_RCVLOWAT may keep the rest in the kernel until a buffer's worth is there)
                await poll(lambda: stream.payload_received >= 64 * 1024, "64 KiB to arrive")
                held, got = stream.payload_buffer_bytes, stream.payload_received
                assert held <= max(128 * 1024, 2 * got), f"{held} bytes held for {got} bytes received"
                assert tracemalloc.get_traced_memory()[1] < 2 << 20, "a large buffer was allocated"
            finally:
                tracemalloc.stop()
            w.write(body[100 * 1024 :])
            got = await stream.read_record()
            assert got is not None and got[1] == body
            assert isinstance(got[1], bytearray)  # still received in place
            stream.recycle(got[1])  # too big to keep (over 4 MiB): ignored

            # a peer that delivered a payload of a size gets a buffer of that size at once
            w.write(_HEAD.pack(2 << 20, 2))
            await w.drain()
            await poll(lambda: stream.payload_buffer_bytes > 0, "the next head")
            assert stream.payload_buffer_bytes == 2 << 20
            w.write(bytes(2 << 20))
            got = await stream.read_record()
            assert got is not None and got[1] == bytes(2 << 20)

    run(main())


def test_recycled_buffers_are_still_reused() -> None:
    async def main() -> None:
        async with serving() as srv:
            _s, w = await client(srv)
            stream, _sw = await srv.accepted.get()
            stream.negotiated(8 << 20)
            w.write(record(1, 1 << 20))
            first = await stream.read_record()
            assert first is not None
            stream.recycle(first[1])
            w.write(record(2, 1 << 20))
            second = await stream.read_record()
            assert second is not None and second[1] is first[1]
            assert second[1] == bytes([2]) * (1 << 20)

    run(main())


async def poll(predicate: Any, what: str, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)  # poll interval


def test_a_connection_that_does_not_negotiate_in_time_is_closed() -> None:
    async def main() -> None:
        limits = ConnectionLimits(handshake_timeout_s=0.3)
        async with serving(limits) as srv:
            slow_client, _w1 = await client(srv)
            slow, _ = await srv.accepted.get()
            fast_client, w2 = await client(srv)
            fast, _ = await srv.accepted.get()
            fast.negotiated(1 << 20)
            _w1.write(record(1, 10))  # some bytes, but the owner never says "negotiated"
            assert (await slow.read_record()) is not None
            with pytest.raises(ProtocolError, match=r"handshake not completed within 0.3 s"):
                await slow.read_record()
            await eof(slow_client)
            # the negotiated connection outlived the deadline and still works
            w2.write(record(2, 200 * 1024))
            got = await fast.read_record()
            assert got is not None and len(got[1]) == 200 * 1024
            _w1.close()
            w2.close()
            del fast_client

    run(main())


def test_connections_over_the_cap_are_closed_at_once_and_reported() -> None:
    async def main() -> None:
        limits = ConnectionLimits(max_connections=2)
        async with serving(limits) as srv:
            assert srv.guard is not None
            kept = [await client(srv) for _ in range(2)]
            kept_server = [await srv.accepted.get() for _ in kept]
            extra, extra_w = await client(srv)
            extra.set_splitter(split)
            await eof(extra)
            assert srv.accepted.empty(), "the handler ran for a refused connection"
            assert [e for e, _f in srv.events] == ["connection_refused"]
            assert "limit of 2" in srv.events[0][1]["reason"]
            assert srv.guard.connections == 2
            extra_w.close()

            kept_server[0][1].close()  # the owner closes one: its slot is free
            await poll(lambda: srv.guard is not None and srv.guard.connections == 1, "a slot to free up")
            _again, w = await client(srv)
            await asyncio.wait_for(srv.accepted.get(), 5)  # admitted
            w.close()
            for _s, kw in kept[1:]:
                kw.close()

    run(main())


def test_small_records_are_unaffected_by_the_rules() -> None:
    async def main() -> None:
        async with serving(ConnectionLimits()) as srv:
            _s, w = await client(srv)
            stream, _sw = await srv.accepted.get()
            sizes = [0, 1, 100, DIRECT_PAYLOAD - 9, 60_000]
            for i, n in enumerate(sizes):
                w.write(record(i, n))
            for i, n in enumerate(sizes):
                got = await stream.read_record()
                assert got is not None and got[1] == bytes([i]) * n

    run(main())
