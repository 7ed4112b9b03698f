"""Wire codec: round trips, truncated, oversized and garbage frames."""

from __future__ import annotations

import asyncio
import struct

import pytest

from sut.storage.errors import ProtocolError
from sut.storage.protocol import (
    MAX_FRAME_BYTES,
    MESSAGE_FIELDS,
    Message,
    decode_frame,
    encode,
    read_message,
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
