"""Header decoding through the bounded JSON parser: every failure is a ProtocolError."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sut.storage.errors import ProtocolError
from sut.storage.protocol import (
    MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    MAX_IO_BYTES,
    Message,
    active_frame_limit,
    decode_frame,
    encode,
)


def json_frame(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">II", 4 + len(header) + len(payload), len(header)) + header + payload


HOSTILE_HEADERS = [
    ("deep-100k", b'{"type":"Ruok","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nesting deeper"),
    ("deep-20", b'{"type":"Ruok","x":' + b"[" * 20 + b"]" * 20 + b"}", "nesting deeper"),
    ("5000-digits", b'{"type":"Ruok","x":' + b"7" * 5000 + b"}", "digits"),
    ("21-digits", b'{"type":"Ruok","x":-' + b"7" * 21 + b"}", "digits"),
    ("1e400", b'{"type":"Ruok","x":1e400}', "finite"),
    ("nan", b'{"type":"Ruok","x":NaN}', "NaN"),
    ("infinity", b'{"type":"Ruok","x":Infinity}', "Infinity"),
    ("not-utf8", b'{"type":"Ruok","x":"\xff"}', "UTF-8"),
    ("truncated", b'{"type":"Ruok",', "not valid JSON"),
    ("list", b"[1, 2]", "JSON object"),
    ("type-not-a-string", b'{"type": 7}', 'string "type"'),
]


@pytest.mark.parametrize(("name", "header", "reason"), HOSTILE_HEADERS, ids=[h[0] for h in HOSTILE_HEADERS])
def test_hostile_headers_are_protocol_errors(name: str, header: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_frame(json_frame(header))


def test_headers_of_real_messages_still_decode() -> None:
    written = "ab" * 16384  # a 64 MiB extent of 512 B blocks: a 16 KiB bitmap, hex
    msg = Message(
        "ExtentData",
        {
            "job_id": 1,
            "error": None,
            "eid": 3,
            "gen": 2**64 - 1,
            "flush": 9,
            "dirty": True,
            "written": written,
        },
    )
    assert decode_frame(encode(msg))[0] == msg
    versions = Message(
        "ExtentVersions", {"gen": [2**63] * 2000, "flush": [1] * 2000, "dirty": [False] * 2000}
    )
    assert decode_frame(encode(versions))[0] == versions


def test_active_frame_limit_fits_the_largest_legitimate_frame() -> None:
    for extent_bytes in (4096, 512 * 1024, 16 << 20, 64 << 20):
        limit = active_frame_limit(extent_bytes)
        assert limit <= MAX_FRAME_BYTES + 4  # a record is the frame and its length field
        assert limit >= max(extent_bytes, MAX_IO_BYTES) + MAX_HEADER_BYTES
    write = Message("Write", {"job_id": 1, "block": 0}, bytes(MAX_IO_BYTES))
    assert len(encode(write)) <= active_frame_limit(4096)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=200))
def test_garbage_never_raises_anything_but_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_frame(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=200))
def test_garbage_headers_never_raise_anything_but_protocol_error(header: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_frame(json_frame(header))
