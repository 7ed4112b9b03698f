"""Serial history and fan-out (absolute offsets, bounded capacity, no gaps)."""

from __future__ import annotations

import asyncio

import pytest

from sut.server.serial import SerialConsole, SerialNotConnectedError


def test_history_by_offset_and_most_recent() -> None:
    console = SerialConsole(capacity=8)
    console.feed(b"abcdef")
    assert console.history(from_start=2).data == b"cdef"
    assert console.history(most_recent=2).data == b"ef"
    assert console.history(from_start=1, max_bytes=2).data == b"bc"
    console.feed(b"ghij")  # 10 bytes total; the first 2 fell out of the buffer
    piece = console.history(from_start=0)
    assert (piece.data, piece.start_offset, piece.end_offset) == (b"cdefghij", 2, 10)
    assert console.history(from_start=50).data == b""


def test_subscribers_get_replay_then_live_output_until_close() -> None:
    async def body() -> list[bytes]:
        console = SerialConsole()
        console.feed(b"boot ")
        sub = console.subscribe(from_start=0)
        console.feed(b"login: ")
        received: list[bytes] = []

        async def read() -> None:
            async for chunk in sub:
                received.append(chunk)

        reader = asyncio.create_task(read())
        await console.close()
        await asyncio.wait_for(reader, 5)
        return received

    assert asyncio.run(body()) == [b"boot ", b"login: "]


def test_write_without_a_guest_is_a_clear_error() -> None:
    async def body() -> None:
        with pytest.raises(SerialNotConnectedError, match="not running"):
            await SerialConsole().write(b"x")

    asyncio.run(body())
