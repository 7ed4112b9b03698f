"""Wire codec: round trips (JSON and binary frames), truncated, oversized and garbage frames."""

from __future__ import annotations

import asyncio
import struct

import pytest

from sut.storage.errors import ProtocolError
from sut.storage.protocol import (
    MAX_FRAME_BYTES,
    MESSAGE_FIELDS,
    BatchedWriter,
    FrameReader,
    Message,
    decode_frame,
    encode,
    open_connection,
    read_message,
    start_server,
)

SAMPLES = [
    Message(
        "HereIAm",
        {
            "version": 1,
            "upstairs_id": "u",
            "session_id": "s",
            "gen": 3,
            "read_only": False,
            "encrypted": True,
        },
    ),
    Message("Write", {"job_id": 7, "block": 12}, b"\xab" * 4096),
    Message("ReadResponse", {"job_id": 8, "error": None, "written": "1101"}, bytes(range(256))),
    Message("ExtentVersions", {"gen": [1, 2], "flush": [3, 4], "dirty": [False, True]}),
    Message("Ruok"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=[m.kind for m in SAMPLES])
def test_round_trip(msg: Message) -> None:
    frame = encode(msg)
    decoded, rest = decode_frame(frame + b"next")
    assert decoded == msg
    assert rest == b"next"


def test_every_message_type_encodes_with_its_required_fields() -> None:
    for kind, fields in MESSAGE_FIELDS.items():
        msg = Message(kind, {name: 0 for name in fields})
        assert decode_frame(encode(msg))[0] == msg


@pytest.mark.parametrize("cut", [0, 3, 7, 9, 20])
def test_truncated_frames_are_rejected(cut: int) -> None:
    frame = encode(SAMPLES[1])
    with pytest.raises(ProtocolError, match="truncated"):
        decode_frame(frame[:cut])


def test_oversized_frame_is_rejected_before_reading_it() -> None:
    with pytest.raises(ProtocolError, match="exceeds the maximum"):
        decode_frame(struct.pack(">II", MAX_FRAME_BYTES + 1, 2) + b"{}")
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(Message("Write", {"job_id": 1, "block": 0}, bytes(MAX_FRAME_BYTES)))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\xff\xfe garbage", "not valid JSON"),
        (b'["list"]', "JSON object"),
        (b'{"type": "Nope"}', "unknown message type"),
        (b'{"type": "Read", "job_id": 1}', "missing field"),
    ],
)
def test_garbage_headers_are_rejected(body: bytes, expected: str) -> None:
    frame = struct.pack(">II", 4 + len(body), len(body)) + body
    with pytest.raises(ProtocolError, match=expected):
        decode_frame(frame)


def test_header_length_larger_than_frame_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="does not fit"):
        decode_frame(struct.pack(">II", 6, 100) + b"{}")


def test_unknown_kind_cannot_be_sent() -> None:
    with pytest.raises(ProtocolError, match="unknown message type"):
        encode(Message("Bogus"))


def _feed(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def test_stream_reader_eof_between_frames_and_mid_frame() -> None:
    async def main() -> None:
        frame = encode(SAMPLES[2])
        reader = _feed(frame)
        assert await read_message(reader) == SAMPLES[2]
        assert await read_message(reader) is None  # clean EOF
        with pytest.raises(ProtocolError, match="mid-frame"):
            await read_message(_feed(frame[:-1]))
        with pytest.raises(ProtocolError, match="frame prefix"):
            await read_message(_feed(frame[:5]))
        with pytest.raises(ProtocolError, match="exceeds"):
            await read_message(_feed(struct.pack(">II", 2**32 - 1, 0)))

    asyncio.run(main())


# -- binary frames of the hot messages ---------------------------------------------------------
def _is_binary(frame: bytes) -> bool:
    return bool(struct.unpack_from(">I", frame, 4)[0] & 0x8000_0000)


HOT = [
    Message("Write", {"job_id": 1, "block": 2**40}, b"\x01" * 1000),
    Message("WriteUnwritten", {"job_id": 2, "block": 0}, b"\x02" * 512),
    Message("WriteAck", {"job_id": 3, "error": None}),
    Message("Read", {"job_id": 4, "block": 5, "count": 2048}),
    Message("ReadResponse", {"job_id": 5, "error": None, "written": "1" * 2048}, b"\x03" * 4096),
    Message("ReadResponse", {"job_id": 6, "error": None, "written": "0" * 8}, bytes(4096)),
    Message("ReadResponse", {"job_id": 7, "error": None, "written": "1101" * 33 + "0"}, b"x" * 512),
    Message("ReadResponse", {"job_id": 8, "error": None, "written": ""}),
    Message("Flush", {"job_id": 9, "flush_number": 10, "gen": 11}),
    Message("FlushAck", {"job_id": 12, "error": None}),
    Message("ExtentPutAck", {"job_id": 13, "error": None}),
    Message("Ruok"),
    Message("Imok"),
]


@pytest.mark.parametrize("msg", HOT, ids=[f"{m.kind}-{i}" for i, m in enumerate(HOT)])
def test_hot_messages_travel_as_binary_frames(msg: Message) -> None:
    frame = encode(msg)
    assert _is_binary(frame)
    assert decode_frame(frame + b"rest") == (msg, b"rest")


UNUSUAL = [
    Message("WriteAck", {"job_id": 1, "error": "disk on fire"}),
    Message("ReadResponse", {"job_id": 1, "error": "EIO", "written": ""}),
    Message("ReadResponse", {"job_id": 1, "error": None, "written": "12"}),
    Message("Write", {"job_id": True, "block": 1}, b"x"),  # a bool stays a bool
    Message("Write", {"job_id": -1, "block": 1}, b"x"),
    Message("Write", {"job_id": 1, "block": 1, "extra": "kept"}, b"x"),
    Message("Read", {"job_id": 1, "block": 1, "count": 2**32}),
]


@pytest.mark.parametrize("msg", UNUSUAL, ids=[f"{m.kind}-{i}" for i, m in enumerate(UNUSUAL)])
def test_unusual_hot_messages_fall_back_to_json_unchanged(msg: Message) -> None:
    frame = encode(msg)
    assert not _is_binary(frame)
    decoded = decode_frame(frame)[0]
    assert decoded == msg
    assert [type(v) for v in decoded.fields.values()] == [type(v) for v in msg.fields.values()]


def test_broken_binary_frames_are_rejected() -> None:
    with pytest.raises(ProtocolError, match="unknown binary message code"):
        decode_frame(struct.pack(">II", 4, 0x8000_0000 | 999))
    with pytest.raises(ProtocolError, match="too short for its fields"):
        decode_frame(struct.pack(">II", 8, 0x8000_0001) + b"\0" * 4)  # Write needs 16 bytes
    frame = encode(HOT[6])  # a ReadResponse with a bitmap
    for cut in (9, 20, len(frame) - 1):
        with pytest.raises(ProtocolError, match="truncated"):
            decode_frame(frame[:cut])


def test_stream_reader_reads_binary_frames() -> None:
    async def main() -> None:
        reader = _feed(b"".join(encode(m) for m in HOT))
        for msg in HOT:
            assert await read_message(reader) == msg
        assert await read_message(reader) is None
        with pytest.raises(ProtocolError, match="mid-frame"):
            await read_message(_feed(encode(HOT[6])[:12]))

    asyncio.run(main())


def test_frame_connection_round_trip_over_loopback() -> None:
    big = Message("Write", {"job_id": 1, "block": 0}, bytes(range(256)) * 4096)  # 1 MiB

    async def main() -> None:
        got: asyncio.Queue[Message | None] = asyncio.Queue()

        async def serve(reader: FrameReader, writer: asyncio.StreamWriter) -> None:
            reader.negotiated(MAX_FRAME_BYTES + 4)  # frames over 64 KiB only once negotiated
            while (msg := await read_message(reader)) is not None:
                await got.put(msg)
            await got.put(None)
            writer.close()

        server = await start_server(serve, "127.0.0.1", 0)
        _reader, writer = await open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        out = BatchedWriter(writer)
        for msg in [*SAMPLES, big, *HOT]:
            out.write_message(msg)
        await out.drain()
        writer.close()
        for msg in [*SAMPLES, big, *HOT]:
            assert await asyncio.wait_for(got.get(), 10) == msg
        assert await asyncio.wait_for(got.get(), 10) is None
        server.close()
        await server.wait_closed()

    asyncio.run(main())
