"""RecordStream and BatchedWriter over real loopback sockets (no fakes)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from sut.storage.errors import ProtocolError
from sut.storage.stream import (
    DIRECT_PAYLOAD,
    BatchedWriter,
    RecordStream,
    RecordWriter,
    create_server,
    open_stream,
)

# Test records: u32 payload length | u32 sequence number | payload; length 0xFFFFFFFF is invalid.
_HEAD = struct.Struct(">II")


def split(data: memoryview) -> tuple[int, int] | None:
    if len(data) < _HEAD.size:
        return None
    length, _seq = _HEAD.unpack_from(data)
    if length == 0xFFFFFFFF:
        raise ProtocolError("invalid test record")
    return _HEAD.size, length


def record(seq: int, length: int) -> tuple[bytes, bytes]:
    return _HEAD.pack(length, seq), bytes([seq % 251]) * length


Handler = Callable[[RecordStream, RecordWriter], Awaitable[None]]


@asynccontextmanager
async def connected(
    splitter: Callable[[memoryview], tuple[int, int] | None] | None = split,
) -> AsyncIterator[tuple[RecordStream, RecordWriter, RecordWriter]]:
    """(server-side stream, server-side writer, client writer) of one loopback connection."""
    accepted: asyncio.Queue[tuple[RecordStream, RecordWriter]] = asyncio.Queue()
    done = asyncio.Event()

    async def on_connect(stream: RecordStream, writer: RecordWriter) -> None:
        await accepted.put((stream, writer))
        await done.wait()

    server = await create_server(on_connect, "127.0.0.1", 0, splitter)
    port = server.sockets[0].getsockname()[1]
    _client_stream, client = await open_stream("127.0.0.1", port)
    stream, writer = await asyncio.wait_for(accepted.get(), 10)
    stream.negotiated(1 << 30)  # these tests are about records of any size, not the cap
    try:
        yield stream, writer, client
    finally:
        done.set()
        client.close()
        writer.close()
        server.close()
        await server.wait_closed()


def run(coro: Awaitable[None]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, 30)

    asyncio.run(bounded())


@pytest.mark.parametrize("sizes", [[0, 1, 100, 4096], [DIRECT_PAYLOAD, 1 << 20, 3, 5 << 20, 0]])
def test_records_of_every_size_arrive_whole_and_in_order(sizes: list[int]) -> None:
    async def main() -> None:
        async with connected() as (stream, _w, client):
            out = BatchedWriter(client)
            sent = [record(i, n) for i, n in enumerate(sizes * 5)]
            for head, payload in sent:
                out.write(head)
                out.write(payload)
            # ~31 MiB: more than the reader queues before it pushes back, so read meanwhile
            drained = asyncio.ensure_future(out.drain())
            for head, payload in sent:
                got = await stream.read_record()
                assert got is not None
                assert got[0] == head and got[1] == payload
            await drained
            client.close()
            assert await stream.read_record() is None  # clean EOF between records

    run(main())


def test_large_payload_is_received_in_place() -> None:
    async def main() -> None:
        async with connected() as (stream, _w, client):
            head, payload = record(1, 2 << 20)
            client.write(head + payload)
            got = await stream.read_record()
            assert got is not None
            assert isinstance(got[1], bytearray)  # the kernel's target buffer, handed over
            assert got[1] == payload

    run(main())


def test_eof_in_the_middle_of_a_record_is_an_incomplete_read() -> None:
    async def main() -> None:
        for cut in (3, _HEAD.size + 10, _HEAD.size + DIRECT_PAYLOAD + 5):
            async with connected() as (stream, _w, client):
                head, payload = record(1, 2 * DIRECT_PAYLOAD)
                client.write((head + payload)[:cut])
                await client.drain()
                client.close()
                with pytest.raises(asyncio.IncompleteReadError) as info:
                    await stream.read_record()
                assert len(info.value.partial) == cut

    run(main())


def test_splitter_error_comes_after_the_records_before_it() -> None:
    async def main() -> None:
        async with connected() as (stream, _w, client):
            good = b"".join(record(1, 10))
            client.write(good + _HEAD.pack(0xFFFFFFFF, 2) + b"junk")
            got = await stream.read_record()
            assert got is not None and got[1] == bytes([1]) * 10
            with pytest.raises(ProtocolError, match="invalid test record"):
                await stream.read_record()

    run(main())


def test_raw_mode_then_records_keeps_bytes_already_received() -> None:
    async def main() -> None:
        async with connected(splitter=None) as (stream, _w, client):
            head, payload = record(9, 300)
            client.write(b"HELLO" + head + payload)  # the records arrive with the handshake
            assert await stream.readexactly(5) == b"HELLO"
            stream.set_splitter(split)
            got = await stream.read_record()
            assert got == (head, payload)
            with pytest.raises(RuntimeError, match="raw mode"):
                await stream.readexactly(1)

    run(main())


def test_batched_writer_keeps_order_when_the_socket_is_full() -> None:
    async def main() -> None:
        async with connected() as (stream, _w, client):
            out = BatchedWriter(client)
            sent = [record(i, (i * 7919) % (300 * 1024)) for i in range(200)]
            # ~30 MiB in one loop iteration, more than the socket buffers hold: writev sends a
            # part, the transport gets the rest and must keep it behind what writev sent
            for head, payload in sent:
                out.write(head)
                out.write(payload)
            out.flush()
            for head, payload in sent:
                got = await stream.read_record()
                assert got is not None and got[0] == head and got[1] == payload

    run(main())


def test_writes_to_a_closed_writer_are_dropped() -> None:
    async def main() -> None:
        async with connected() as (_stream, _w, client):
            out = BatchedWriter(client)
            client.close()
            out.write(b"x" * 10)
            out.flush()  # no error: the owner fails the jobs of a closed connection

    run(main())


def test_a_small_record_after_a_large_one_is_not_held_back() -> None:
    # receiving a large payload raises SO_RCVLOWAT; it must drop again, or the next small
    # record would wait in the kernel for bytes that never come
    async def main() -> None:
        async with connected() as (stream, _w, client):
            for size in (3 * DIRECT_PAYLOAD, 5, 2 << 20, 0):
                head, payload = record(size, size)
                client.write(head + payload)
                got = await asyncio.wait_for(stream.read_record(), 5)
                assert got == (head, payload)

    run(main())


def test_recycled_payload_buffers_are_reused_for_the_same_size() -> None:
    async def main() -> None:
        async with connected() as (stream, _w, client):
            client.write(b"".join(record(1, DIRECT_PAYLOAD * 2)))
            first = await stream.read_record()
            assert first is not None
            stream.recycle(first[1])
            client.write(b"".join(record(2, DIRECT_PAYLOAD * 2)))
            second = await stream.read_record()
            assert second is not None
            assert second[1] is first[1]  # the same buffer, refilled
            assert second[1] == bytes([2]) * (DIRECT_PAYLOAD * 2)
            stream.recycle(b"bytes are never reused")

    run(main())


def test_bytes_pushed_by_the_loop_are_split_the_same_way() -> None:
    # event loops that treat the stream as a plain Protocol (uvloop) call data_received
    async def main() -> None:
        async with connected() as (stream, _w, _client):
            sent = [record(i, n) for i, n in enumerate([10, DIRECT_PAYLOAD + 1, 0, 700 * 1024])]
            stream.data_received(b"".join(h + p for h, p in sent))
            for head, payload in sent:
                assert await stream.read_record() == (head, payload)

    run(main())


def long_head_split(data: memoryview) -> tuple[int, int] | None:
    """Records whose HEAD is long: u32 head length | u32 payload length | head | payload."""
    if len(data) < 8:
        return None
    head_len, payload_len = struct.unpack_from(">II", data)
    return 8 + head_len, payload_len


@pytest.mark.parametrize("head_len", [600_000, 3 << 20])
def test_a_head_longer_than_the_staging_buffer_still_arrives(head_len: int) -> None:
    # Crucible's Write of 32 MiB has a 590 KB head (a context per block); the stage is 512 KiB
    async def main() -> None:
        async with connected(long_head_split) as (stream, _w, client):
            head = struct.pack(">II", head_len, 70_000) + bytes([7]) * head_len
            payload = bytes([9]) * 70_000
            small = struct.pack(">II", 3, 1) + b"abc" + b"z"
            client.write(head + payload + small)
            got = await stream.read_record()
            assert got is not None and got[0] == head and got[1] == payload
            got = await stream.read_record()
            assert got is not None and got == (small[:-1], b"z")
            assert len(stream._stage) <= 512 * 1024  # given back once the long head passed

    run(main())


def test_drain_waits_for_a_reader_that_does_not_read_and_fails_once_it_is_gone() -> None:
    """RecordWriter's flow control (our own, on public protocol callbacks): drain blocks while
    the peer reads nothing, returns once it reads, and raises once the connection is lost."""

    async def main() -> None:
        start_reading = asyncio.Event()
        peer_done = asyncio.Event()
        received = 0

        async def slow_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal received
            await start_reading.wait()
            while chunk := await reader.read(1 << 20):
                received += len(chunk)
                if received >= sent:
                    break
            writer.close()
            peer_done.set()

        server = await asyncio.start_server(slow_peer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _stream, writer = await open_stream("127.0.0.1", port)
        sent = 0
        chunk = bytes(1 << 20)
        blocked = False
        for _ in range(256):  # far more than the socket buffers and the transport's limit hold
            writer.write(chunk)
            sent += len(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 0.2)
            except TimeoutError:
                blocked = True
                break
        assert blocked, f"drain never waited after {sent} bytes to a peer that reads nothing"
        start_reading.set()
        await asyncio.wait_for(writer.drain(), 10)  # the peer reads: the buffer empties
        await asyncio.wait_for(peer_done.wait(), 10)
        assert received >= sent

        async def write_until_refused() -> None:
            for _ in range(100):  # the peer closed: writes fail once the loss is noticed
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 5)
                await asyncio.sleep(0.01)  # poll interval of a bounded loop

        with pytest.raises(ConnectionError):
            await write_until_refused()
        await asyncio.wait_for(writer.wait_closed(), 5)
        server.close()
        await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 60))
