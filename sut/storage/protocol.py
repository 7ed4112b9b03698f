"""Upstairs <-> downstairs wire protocol: length-prefixed frames of JSON header + raw payload.

Frame: ``u32 frame_len | u32 header_len | header (UTF-8 JSON object) | payload``, big endian,
where ``frame_len`` counts everything after itself. Block data travels as raw payload bytes
so it is never base64-inflated. Stdlib only: the downstairs container imports this module.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from sut.storage.errors import ProtocolError

__all__ = [
    "MAX_FRAME_BYTES",
    "MAX_HEADER_BYTES",
    "MESSAGE_FIELDS",
    "PROTOCOL_VERSION",
    "Message",
    "decode_frame",
    "encode",
    "read_message",
]

PROTOCOL_VERSION = 1
# A whole 64 MiB extent (PHD's extent size) must fit in one ExtentData frame, with headroom.
MAX_FRAME_BYTES = 80 * 1024 * 1024
# Headers carry per-block bitmaps as hex: 64 MiB / 512 B blocks -> 32 KiB of hex.
MAX_HEADER_BYTES = 256 * 1024
_PREFIX = struct.Struct(">II")

# Required header fields per message type (the "type" key itself is implicit). Fields are
# checked for presence only; handlers validate values where a wrong value matters.
MESSAGE_FIELDS: dict[str, tuple[str, ...]] = {
    # negotiation
    "HereIAm": ("version", "upstairs_id", "session_id", "gen", "read_only", "encrypted"),
    "YesItsMe": ("version",),
    "VersionMismatch": ("version",),
    "ReadOnlyMismatch": ("expected",),
    "EncryptedMismatch": ("expected",),
    "PromoteToActive": ("upstairs_id", "session_id", "gen"),
    "YouAreNowActive": ("upstairs_id", "session_id", "gen"),
    "YouAreNoLongerActive": ("new_upstairs_id", "new_session_id", "new_gen"),
    "PromoteRefused": ("reason",),
    "RegionInfoPlease": (),
    "RegionInfo": ("block_size", "extent_size", "extent_count", "uuid", "encrypted"),
    "ExtentVersionsPlease": (),
    "ExtentVersions": ("gen", "flush", "dirty"),
    # I/O (offsets and counts in blocks); every job gets exactly one reply with its job_id
    "Write": ("job_id", "block"),
    "WriteUnwritten": ("job_id", "block"),
    "WriteAck": ("job_id", "error"),
    "Read": ("job_id", "block", "count"),
    "ReadResponse": ("job_id", "error", "written"),
    "Flush": ("job_id", "flush_number", "gen"),
    "FlushAck": ("job_id", "error"),
    # reconciliation / repair, mediated by the upstairs
    "ExtentFetch": ("job_id", "eid"),
    "ExtentData": ("job_id", "error", "eid", "gen", "flush", "dirty", "written"),
    "ExtentPut": ("job_id", "eid", "gen", "flush", "written"),
    "ExtentPutAck": ("job_id", "error"),
    # keepalive
    "Ruok": (),
    "Imok": (),
}


@dataclass(frozen=True)
class Message:
    """One protocol message: its type, header fields, and optional raw payload."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def encode(msg: Message) -> bytes:
    """Serialise ``msg`` into one frame; raises ProtocolError if it is invalid or too big."""
    _check_fields(msg.kind, msg.fields)
    header = json.dumps({"type": msg.kind, **msg.fields}, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{msg.kind}: header of {len(header)} bytes exceeds the maximum")
    frame_len = 4 + len(header) + len(msg.payload)
    if frame_len > MAX_FRAME_BYTES:
        raise ProtocolError(f"{msg.kind}: frame of {frame_len} bytes exceeds {MAX_FRAME_BYTES}")
    return _PREFIX.pack(frame_len, len(header)) + header + msg.payload


def _check_fields(kind: str, fields: dict[str, Any]) -> None:
    required = MESSAGE_FIELDS.get(kind)
    if required is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    missing = [name for name in required if name not in fields]
    if missing:
        raise ProtocolError(f"{kind}: missing field(s) {', '.join(missing)}")


def _check_frame_len(frame_len: int) -> None:
    if frame_len < 4:
        raise ProtocolError(f"frame length {frame_len} is smaller than its header length field")
    if frame_len > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame length {frame_len} exceeds the maximum {MAX_FRAME_BYTES}")


def _decode_body(header_len: int, body: bytes) -> Message:
    if header_len > len(body) or header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"header length {header_len} does not fit the frame ({len(body)})")
    try:
        header = json.loads(body[:header_len])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError('header must be a JSON object with a string "type"')
    kind = header.pop("type")
    _check_fields(kind, header)
    return Message(kind, header, bytes(body[header_len:]))


def decode_frame(data: bytes) -> tuple[Message, bytes]:
    """Decode one complete frame from ``data``; returns the message and the remaining bytes.

    Raises ProtocolError for a truncated, oversized or malformed frame.
    """
    if len(data) < _PREFIX.size:
        raise ProtocolError(f"truncated frame: {len(data)} bytes, need at least {_PREFIX.size}")
    frame_len, header_len = _PREFIX.unpack_from(data)
    _check_frame_len(frame_len)
    end = 4 + frame_len
    if len(data) < end:
        raise ProtocolError(f"truncated frame: have {len(data)} bytes of {end}")
    return _decode_body(header_len, data[8:end]), data[end:]


async def read_message(reader: asyncio.StreamReader) -> Message | None:
    """Read one message; None on a clean EOF between frames, ProtocolError otherwise."""
    try:
        prefix = await reader.readexactly(_PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError("connection closed in the middle of a frame prefix") from None
    frame_len, header_len = _PREFIX.unpack(prefix)
    _check_frame_len(frame_len)
    try:
        body = await reader.readexactly(frame_len - 4)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(
            f"connection closed mid-frame ({len(exc.partial)} of {frame_len - 4} bytes)"
        ) from None
    return _decode_body(header_len, body)
