"""Upstairs <-> downstairs wire protocol: length-prefixed frames, binary for the I/O hot path.

Every frame is ``u32 frame_len | u32 tag | ...``, big endian, ``frame_len`` counting everything
after itself:

- ``tag < 2**31``: a JSON frame, ``tag`` is the header length:
  ``u32 frame_len | u32 header_len | header (UTF-8 JSON object with "type") | payload``.
  Negotiation, reconciliation and anything unusual use it (every message type may).
- ``tag = 2**31 | code``: a binary frame of one hot message type with its fields in a fixed
  struct (``_BINARY``), then the payload. Write/WriteUnwritten/Read/Flush, their
  acknowledgements without an error, ReadResponse without an error (its per-block written
  map travels as "all written", "none written" or a bitmap), Ruok/Imok. Profiling 4 KiB
  random I/O showed json.dumps/json.loads among the top costs per job.

Block data travels as raw payload bytes, never base64-inflated. Decoding yields the same
:class:`Message` (kind, fields, payload) whichever form the frame had.

Input from a peer is bounded in three places: the stream layer caps a frame at
``HANDSHAKE_MAX_RECORD`` until the connection's owner declares it negotiated, then at
:func:`active_frame_limit` (the largest legitimate frame); JSON headers are parsed by the one
bounded parser (``sut.bounded_json``, ``HEADER_JSON_LIMITS``); and every failure to decode is
a :class:`ProtocolError` (a peer that closes mid-frame: :class:`TruncatedFrameError`). Values
are checked by their consumers (the downstairs' I/O, the client's replies). Stdlib only: the
downstairs container imports this module.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass, field
from typing import Any, cast

from sut.bounded_json import JsonLimitError, JsonLimits
from sut.bounded_json import loads as bounded_loads
from sut.storage import stream
from sut.storage.errors import ProtocolError, TruncatedFrameError
from sut.storage.stream import ConnectionGuard, RecordStream

__all__ = [
    "HEADER_JSON_LIMITS",
    "LARGE_PAYLOAD",
    "MAX_FRAME_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_IO_BYTES",
    "MESSAGE_FIELDS",
    "PROTOCOL_VERSION",
    "STREAM_LIMIT",
    "BatchedWriter",
    "FrameReader",
    "Message",
    "active_frame_limit",
    "decode_frame",
    "decode_record",
    "encode",
    "encode_parts",
    "open_connection",
    "read_message",
    "split_frame",
    "start_server",
    "write_message",
]

# 2: binary frames for the hot messages (JSON frames are unchanged, so a version 1 peer still
# gets a readable VersionMismatch).
PROTOCOL_VERSION = 2
# A whole 64 MiB extent (PHD's extent size) must fit in one ExtentData frame, with headroom.
MAX_FRAME_BYTES = 80 * 1024 * 1024
# Headers carry per-block bitmaps as hex: 64 MiB / 512 B blocks -> 32 KiB of hex.
MAX_HEADER_BYTES = 256 * 1024
# The largest Write / Read payload an upstairs sends or asks for: one NBD request (QEMU's
# limit, sut.storage.nbd); larger guest requests arrive split.
MAX_IO_BYTES = 32 * 1024 * 1024
# Header JSON: the deepest real header is an object of lists (ExtentVersions), every integer
# a u64 at most.
HEADER_JSON_LIMITS = JsonLimits(max_bytes=MAX_HEADER_BYTES, max_depth=8, max_int_digits=20)
_PREFIX = struct.Struct(">II")
_BINARY_FLAG = 0x8000_0000
# asyncio.StreamReader limit for connections that still use asyncio streams. The default
# (64 KiB) makes the transport pause and resume reading every 128 KiB of a 1 MiB frame.
STREAM_LIMIT = 4 * 1024 * 1024
# Payloads at least this big are never copied into a joined buffer with their header.
LARGE_PAYLOAD = stream.DIRECT_PAYLOAD

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
    "Flush": ("job_id", "flush_number", "gen"),  # optional: extent_limit
    "FlushAck": ("job_id", "error"),
    # reconciliation / repair, mediated by the upstairs
    "ExtentFetch": ("job_id", "eid"),
    "ExtentData": ("job_id", "error", "eid", "gen", "flush", "dirty", "written"),
    "ExtentPut": ("job_id", "eid", "gen", "flush", "written"),  # optional: dirty
    "ExtentPutAck": ("job_id", "error"),
    # keepalive
    "Ruok": (),
    "Imok": (),
}


def active_frame_limit(extent_bytes: int) -> int:
    """The frame cap of a negotiated connection to a region of ``extent_bytes`` extents: the
    largest legitimate frame (a whole extent in ExtentData / ExtentPut, or the largest I/O),
    its prefix and its largest header; never above MAX_FRAME_BYTES."""
    return min(MAX_FRAME_BYTES + 4, _PREFIX.size + MAX_HEADER_BYTES + max(extent_bytes, MAX_IO_BYTES))


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


# -- binary frames -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Binary:
    """A hot message type's binary form: ``ints`` in a fixed struct, ``error`` always None."""

    kind: str
    code: int
    ints: tuple[str, ...]  # unsigned integer fields, in struct order
    layout: struct.Struct
    has_error: bool  # the message has an "error" field (binary only when it is None)


def _binary(kind: str, code: int, ints: tuple[str, ...], fmt: str) -> _Binary:
    return _Binary(kind, code, ints, struct.Struct(">" + fmt), "error" in MESSAGE_FIELDS[kind])


_BINARY_LIST = [
    _binary("Write", 1, ("job_id", "block"), "QQ"),
    _binary("WriteUnwritten", 2, ("job_id", "block"), "QQ"),
    _binary("WriteAck", 3, ("job_id",), "Q"),
    _binary("Read", 4, ("job_id", "block", "count"), "QQI"),
    # count = blocks in the written map; flag: _NONE_WRITTEN, _ALL_WRITTEN or _BITMAP
    _binary("ReadResponse", 5, ("job_id",), "QIB"),
    _binary("Flush", 6, ("job_id", "flush_number", "gen"), "QQQ"),
    _binary("FlushAck", 7, ("job_id",), "Q"),
    _binary("ExtentPutAck", 8, ("job_id",), "Q"),
    _binary("Ruok", 9, (), ""),
    _binary("Imok", 10, (), ""),
]
_BINARY = {b.kind: b for b in _BINARY_LIST}
_BY_CODE = {b.code: b for b in _BINARY_LIST}
_READ_RESPONSE = _BINARY["ReadResponse"]
_NONE_WRITTEN, _ALL_WRITTEN, _BITMAP = 0, 1, 2
_INT_LIMITS = {"Q": 1 << 64, "I": 1 << 32}


def _binary_head(msg: Message) -> bytes | None:
    """The binary prefix + fields of ``msg``, or None if it needs the JSON form."""
    spec = _BINARY.get(msg.kind)
    if spec is None:
        return None
    fields = msg.fields
    expected = len(spec.ints) + (1 if spec.has_error else 0) + (1 if spec is _READ_RESPONSE else 0)
    if len(fields) != expected or (spec.has_error and fields.get("error", 0) is not None):
        return None
    values = []
    for name, code in zip(spec.ints, spec.layout.format[1:], strict=False):
        value = fields.get(name)
        # bools and other types keep their exact JSON meaning, so they go as JSON
        if type(value) is not int or not 0 <= value < _INT_LIMITS[code]:
            return None
        values.append(value)
    extra = b""
    if spec is _READ_RESPONSE:
        packed = _pack_written(fields.get("written"))
        if packed is None:
            return None
        count, flag, extra = packed
        values += [count, flag]
    body = spec.layout.pack(*values) + extra
    frame_len = 4 + len(body) + len(msg.payload)
    if frame_len > MAX_FRAME_BYTES:
        raise ProtocolError(f"{msg.kind}: frame of {frame_len} bytes exceeds {MAX_FRAME_BYTES}")
    return _PREFIX.pack(frame_len, _BINARY_FLAG | spec.code) + body


def _pack_written(written: object) -> tuple[int, int, bytes] | None:
    """A "0"/"1" per-block string as (count, flag, bitmap); None if it is not one."""
    if type(written) is not str or len(written) >= 1 << 32:
        return None
    count = len(written)
    ones = written.count("1")
    if ones == count:
        return count, _ALL_WRITTEN, b""
    if ones == 0 and written.count("0") == count:
        return count, _NONE_WRITTEN, b""
    if ones + written.count("0") != count:
        return None
    # bit i of the little-endian integer is block i
    return count, _BITMAP, int(written[::-1], 2).to_bytes((count + 7) // 8, "little")


def _unpack_written(count: int, flag: int, bitmap: bytes) -> str:
    if flag == _ALL_WRITTEN:
        return "1" * count
    if flag == _NONE_WRITTEN:
        return "0" * count
    bits = int.from_bytes(bitmap, "little") & ((1 << count) - 1)
    return format(bits, f"0{count}b")[::-1] if count else ""


def _binary_fixed(code: int) -> _Binary:
    spec = _BY_CODE.get(code)
    if spec is None:
        raise ProtocolError(f"unknown binary message code {code}")
    return spec


# -- encoding ---------------------------------------------------------------------------------
def encode(msg: Message) -> bytes:
    """Serialise ``msg`` into one frame; raises ProtocolError if it is invalid or too big."""
    head, payload = encode_parts(msg)
    return head + payload


def encode_parts(msg: Message) -> tuple[bytes, bytes]:
    """``encode`` split into (prefix + header, payload) so the payload need not be copied."""
    _check_fields(msg.kind, msg.fields)
    head = _binary_head(msg)
    if head is not None:
        return head, msg.payload
    header = json.dumps({"type": msg.kind, **msg.fields}, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{msg.kind}: header of {len(header)} bytes exceeds the maximum")
    frame_len = 4 + len(header) + len(msg.payload)
    if frame_len > MAX_FRAME_BYTES:
        raise ProtocolError(f"{msg.kind}: frame of {frame_len} bytes exceeds {MAX_FRAME_BYTES}")
    return _PREFIX.pack(frame_len, len(header)) + header, msg.payload


def write_message(writer: asyncio.StreamWriter, msg: Message) -> None:
    """Queue ``msg`` on ``writer`` (no await, so frames written back to back never interleave)."""
    head, payload = encode_parts(msg)
    if len(payload) >= LARGE_PAYLOAD:
        writer.write(head)
        writer.write(payload)
    else:
        writer.write(head + payload)


class BatchedWriter(stream.BatchedWriter):
    """:class:`sut.storage.stream.BatchedWriter` that also queues whole messages."""

    def write_message(self, msg: Message) -> None:
        head, payload = encode_parts(msg)
        self.write(head)
        self.write(payload)


def _check_fields(kind: str, fields: dict[str, Any]) -> None:
    required = MESSAGE_FIELDS.get(kind)
    if required is None:
        raise ProtocolError(f"unknown message type {kind[:60]!r}")
    missing = [name for name in required if name not in fields]
    if missing:
        raise ProtocolError(f"{kind}: missing field(s) {', '.join(missing)}")


# -- decoding ---------------------------------------------------------------------------------
def _check_frame_len(frame_len: int) -> None:
    if frame_len < 4:
        raise ProtocolError(f"frame length {frame_len} is smaller than its header length field")
    if frame_len > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame length {frame_len} exceeds the maximum {MAX_FRAME_BYTES}")


def split_frame(data: memoryview | bytes) -> tuple[int, int] | None:
    """``(head_len, payload_len)`` of the frame starting ``data``; None if ``data`` is too short
    to tell (under 8 bytes, or under 8 + the fixed fields of a binary frame)."""
    if len(data) < _PREFIX.size:
        return None
    frame_len, tag = _PREFIX.unpack_from(data)
    _check_frame_len(frame_len)
    body_len = frame_len - 4
    if not tag & _BINARY_FLAG:
        if tag > body_len or tag > MAX_HEADER_BYTES:
            raise ProtocolError(f"header length {tag} does not fit the frame ({body_len})")
        return _PREFIX.size + tag, body_len - tag
    spec = _binary_fixed(tag & ~_BINARY_FLAG)
    head_len = _PREFIX.size + spec.layout.size
    if spec is _READ_RESPONSE:
        if len(data) < head_len:
            return None
        _job, count, flag = spec.layout.unpack_from(data, _PREFIX.size)
        if flag == _BITMAP:
            head_len += (count + 7) // 8
    if head_len - 4 > frame_len:
        raise ProtocolError(f"{spec.kind}: frame length {frame_len} is too short for its fields")
    return head_len, frame_len + 4 - head_len


def decode_record(head: bytes, received: bytes | bytearray) -> Message:
    """The message of one frame split as (head, payload) by :func:`split_frame`."""
    # A large received payload is the bytearray the kernel wrote into (sut.storage.stream);
    # copying it into bytes would cost what receiving in place saves. Nobody writes to it
    # again and every consumer only reads it (len, slices, pwrite, writev), so it is typed
    # as the bytes it stands for.
    payload = cast(bytes, received)
    tag = _PREFIX.unpack_from(head)[1]
    if not tag & _BINARY_FLAG:
        return _decode_json(head[_PREFIX.size :], payload)
    spec = _binary_fixed(tag & ~_BINARY_FLAG)
    values = spec.layout.unpack_from(head, _PREFIX.size)
    fields: dict[str, Any] = dict(zip(spec.ints, values, strict=False))
    if spec.has_error:
        fields["error"] = None
    if spec is _READ_RESPONSE:
        count, flag = values[1], values[2]
        bitmap = head[_PREFIX.size + spec.layout.size :]
        if flag not in (_NONE_WRITTEN, _ALL_WRITTEN, _BITMAP):
            raise ProtocolError(f"ReadResponse: unknown written-map form {flag}")
        fields["written"] = _unpack_written(count, flag, bitmap)
    return Message(spec.kind, fields, payload)


def _decode_json(raw: bytes, payload: bytes) -> Message:
    try:
        header = bounded_loads(raw, HEADER_JSON_LIMITS)
    except JsonLimitError as exc:
        raise ProtocolError(f"header is not valid JSON within the limits: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError('header must be a JSON object with a string "type"')
    kind = header.pop("type")
    _check_fields(kind, header)
    return Message(kind, header, payload)


def decode_frame(data: bytes) -> tuple[Message, bytes]:
    """Decode one complete frame from ``data``; returns the message and the remaining bytes.

    Raises ProtocolError for a truncated, oversized or malformed frame.
    """
    known = split_frame(data)
    if known is None:
        raise ProtocolError(f"truncated frame: {len(data)} bytes, need at least {_PREFIX.size}")
    head_len, payload_len = known
    end = head_len + payload_len
    if len(data) < end:
        raise ProtocolError(f"truncated frame: have {len(data)} bytes of {end}")
    return decode_record(data[:head_len], data[head_len:end]), data[end:]


# -- connections ------------------------------------------------------------------------------
FrameReader = RecordStream
"""The receiving half of a frame connection made by :func:`open_connection` / :func:`start_server`."""


async def open_connection(host: str, port: int) -> tuple[FrameReader, asyncio.StreamWriter]:
    """Connect to a downstairs; large payloads are received in place (see sut.storage.stream).

    Frames are capped at ``stream.HANDSHAKE_MAX_RECORD`` until the caller, negotiated, calls
    ``reader.negotiated(active_frame_limit(...))``."""
    return await stream.open_stream(host, port, split_frame)


async def start_server(
    on_connect: stream.ConnectedCallback, host: str, port: int, *, guard: ConnectionGuard | None = None
) -> asyncio.Server:
    """Serve frame connections; ``on_connect(reader, writer)`` runs as one task per connection
    admitted by ``guard`` (cap, handshake deadline; see sut.storage.stream)."""
    return await stream.create_server(on_connect, host, port, split_frame, guard=guard)


async def read_message(reader: FrameReader | asyncio.StreamReader) -> Message | None:
    """Read one message; None on a clean EOF between frames, ProtocolError otherwise."""
    if isinstance(reader, RecordStream):
        try:
            record = await reader.read_record()
        except asyncio.IncompleteReadError as exc:
            raise _incomplete(exc.partial) from None
        return None if record is None else decode_record(*record)
    return await _read_from_stream_reader(reader)


def _incomplete(partial: bytes) -> ProtocolError:
    if len(partial) < _PREFIX.size:
        return TruncatedFrameError("connection closed in the middle of a frame prefix")
    frame_len = _PREFIX.unpack_from(partial)[0]
    return TruncatedFrameError(f"connection closed mid-frame ({len(partial) - 8} of {frame_len - 4} bytes)")


async def _read_from_stream_reader(reader: asyncio.StreamReader) -> Message | None:
    try:
        head = await reader.readexactly(_PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise TruncatedFrameError("connection closed in the middle of a frame prefix") from None
    try:
        known = split_frame(head)
        if known is None:  # a binary frame whose fixed fields tell the head length
            fixed = _binary_fixed(_PREFIX.unpack(head)[1] & ~_BINARY_FLAG).layout.size
            head += await reader.readexactly(fixed)
            known = split_frame(head)
            assert known is not None
        head_len, payload_len = known
        # head and payload are read separately: slicing one buffer would copy the payload again
        head += await reader.readexactly(head_len - len(head))
        payload = await reader.readexactly(payload_len)
    except asyncio.IncompleteReadError as exc:
        frame_len = _PREFIX.unpack_from(head)[0]
        raise TruncatedFrameError(
            f"connection closed mid-frame ({len(exc.partial)} of {frame_len - 4} bytes)"
        ) from None
    return decode_record(head, payload)
