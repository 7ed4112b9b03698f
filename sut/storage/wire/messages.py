"""Crucible's ``Message`` enum (message version 13): the 42 variants and their frames.

A frame is ``u32 LE length (counting its own 4 bytes) | bincode(Message)``. The class order
below IS the wire order (variant index = position in :data:`VARIANTS`); it follows the
declaration order of ``Message`` in Crucible's ``protocol/src/lib.rs`` at commit
6d037cb60304413302e3f3658e4850980cee77b0, the commit ``crucible-wire.md`` was checked against.

Write, WriteUnwritten and ReadResponse end with their bulk ``data`` (a u64 count, then the
bytes): :func:`encode_parts` returns it apart from the head so it is never copied, and
:func:`decode_record` takes it apart from the head, as :func:`split_frame` splits a frame.
Decoding is strict: every count, index and tag is checked, the data count must be the rest of
the frame exactly, and trailing bytes are an error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Annotated, Any, cast

from sut.storage import bincode
from sut.storage.bincode import BincodeError
from sut.storage.wire.crucible_error import CRUCIBLE_ERROR, CrucibleError
from sut.storage.wire.fields import (
    READ_RESPONSE_HEADER,
    REGION_DEFINITION,
    SNAPSHOT_DETAILS,
    U32,
    U64,
    WRITE_HEADER,
    Addr,
    BlockIndex,
    Bool,
    Bools,
    Bytes,
    ClientId,
    ClientIds,
    Error,
    ExtentId,
    JobId,
    JobIds,
    ReadResponseHeader,
    ReconciliationId,
    RegionDefinition,
    SnapshotDetails,
    U32s,
    U64s,
    UnitResult,
    Uuid,
    WriteHeader,
)

__all__ = [
    "DATA_MESSAGES",
    "MAX_FRAME",
    "MESSAGE",
    "MESSAGE_VERSION",
    "MIN_FRAME",
    "VARIANTS",
    "Message",
    "decode",
    "decode_record",
    "encode",
    "encode_parts",
    "split_frame",
    "variant_index",
]

MESSAGE_VERSION = 13
MAX_FRAME = 100 * 1024 * 1024
"""Crucible's largest frame (length prefix included); bigger ones are refused both ways."""
MIN_FRAME = 8
"""A length prefix and a variant index."""

_LEN = struct.Struct("<I")
_FRAME = "(frame)"  # the field named by errors about the frame itself


# -- negotiation (0-10) ----------------------------------------------------------------------
@dataclass(frozen=True)
class HereIAm:
    version: U32
    upstairs_id: Uuid
    session_id: Uuid
    generation: U64
    read_only: Bool
    encrypted: Bool
    alternate_versions: U32s = ()


@dataclass(frozen=True)
class YesItsMe:
    version: U32
    repair_addr: Addr


@dataclass(frozen=True)
class VersionMismatch:
    version: U32


@dataclass(frozen=True)
class ReadOnlyMismatch:
    expected: Bool


@dataclass(frozen=True)
class EncryptedMismatch:
    expected: Bool


@dataclass(frozen=True)
class PromoteToActive:
    upstairs_id: Uuid
    session_id: Uuid
    generation: U64


@dataclass(frozen=True)
class YouAreNowActive:
    upstairs_id: Uuid
    session_id: Uuid
    generation: U64


@dataclass(frozen=True)
class YouAreNoLongerActive:
    new_upstairs_id: Uuid
    new_session_id: Uuid
    new_gen: U64


@dataclass(frozen=True)
class UuidMismatch:
    expected_id: Uuid


@dataclass(frozen=True)
class Ruok:
    pass


@dataclass(frozen=True)
class Imok:
    pass


# -- reconciliation (11-16) ------------------------------------------------------------------
@dataclass(frozen=True)
class ExtentClose:
    repair_id: ReconciliationId
    extent_id: ExtentId


@dataclass(frozen=True)
class ExtentReopen:
    repair_id: ReconciliationId
    extent_id: ExtentId


@dataclass(frozen=True)
class ExtentFlush:
    repair_id: ReconciliationId
    extent_id: ExtentId
    client_id: ClientId
    flush_number: U64
    gen_number: U64


@dataclass(frozen=True)
class ExtentRepair:
    repair_id: ReconciliationId
    extent_id: ExtentId
    source_client_id: ClientId
    source_repair_address: Addr
    dest_clients: ClientIds


@dataclass(frozen=True)
class RepairAckId:
    repair_id: ReconciliationId


@dataclass(frozen=True)
class ExtentError:
    repair_id: ReconciliationId
    extent_id: ExtentId
    error: Error


# -- live repair (17-24) ---------------------------------------------------------------------
@dataclass(frozen=True)
class ExtentLiveClose:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: JobIds
    extent_id: ExtentId


@dataclass(frozen=True)
class ExtentLiveFlushClose:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: JobIds
    extent_id: ExtentId
    flush_number: U64
    gen_number: U64


@dataclass(frozen=True)
class ExtentLiveRepair:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: JobIds
    extent_id: ExtentId
    source_client_id: ClientId
    source_repair_address: Addr


@dataclass(frozen=True)
class ExtentLiveReopen:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: JobIds
    extent_id: ExtentId


@dataclass(frozen=True)
class ExtentLiveNoOp:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: JobIds


@dataclass(frozen=True)
class ExtentLiveCloseAck:
    """``result``: Ok((gen, flush, dirty)) of the closed extent, or the error."""

    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    result: Annotated[
        tuple[int, int, bool] | CrucibleError,
        bincode.ResultOf(
            bincode.TupleOf(bincode.U64, bincode.U64, bincode.BOOL),
            CRUCIBLE_ERROR,
            CrucibleError,
        ),
    ]


@dataclass(frozen=True)
class ExtentLiveRepairAckId:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    result: UnitResult


@dataclass(frozen=True)
class ExtentLiveAckId:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    result: UnitResult


# -- metadata (25-29) ------------------------------------------------------------------------
@dataclass(frozen=True)
class RegionInfoPlease:
    pass


@dataclass(frozen=True)
class RegionInfo:
    region_def: Annotated[RegionDefinition, REGION_DEFINITION]


@dataclass(frozen=True)
class ExtentVersionsPlease:
    pass


@dataclass(frozen=True)
class ExtentVersions:
    gen_numbers: U64s
    flush_numbers: U64s
    dirty_bits: Bools


@dataclass(frozen=True)
class LastFlush:
    """Sent instead of ExtentVersionsPlease by an upstairs replaying to a returning downstairs."""

    last_flush_number: Annotated[int | None, bincode.OptionOf(bincode.U64)]


# -- I/O (30-40) -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Write:
    """``data``: the blocks, back to back (a decoded one may be the bytearray it was received in)."""

    header: Annotated[WriteHeader, WRITE_HEADER]
    data: Bytes


@dataclass(frozen=True)
class WriteAck:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    result: UnitResult


@dataclass(frozen=True)
class Flush:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: JobIds
    flush_number: U64
    gen_number: U64
    snapshot_details: Annotated[SnapshotDetails | None, bincode.OptionOf(SNAPSHOT_DETAILS)] = None
    extent_limit: Annotated[int | None, bincode.OptionOf(bincode.U32)] = None


@dataclass(frozen=True)
class FlushAck:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    result: UnitResult


@dataclass(frozen=True)
class Barrier:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: JobIds


@dataclass(frozen=True)
class BarrierAck:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    result: UnitResult


@dataclass(frozen=True)
class ReadRequest:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: JobIds
    start: BlockIndex
    count: U64


@dataclass(frozen=True)
class ReadResponse:
    header: Annotated[ReadResponseHeader, READ_RESPONSE_HEADER]
    data: Bytes


@dataclass(frozen=True)
class WriteUnwritten:
    """Like Write, but the downstairs skips every block that was ever written."""

    header: Annotated[WriteHeader, WRITE_HEADER]
    data: Bytes


@dataclass(frozen=True)
class WriteUnwrittenAck:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    result: UnitResult


@dataclass(frozen=True)
class ErrorReport:
    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    error: Error


# -- 41 --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unknown:
    """Rust's tuple variant ``Unknown(u32, BytesMut)``."""

    code: U32
    data: Bytes


# -- the enum --------------------------------------------------------------------------------
Message = (
    HereIAm | YesItsMe | VersionMismatch | ReadOnlyMismatch | EncryptedMismatch | PromoteToActive
    | YouAreNowActive | YouAreNoLongerActive | UuidMismatch | Ruok | Imok
    | ExtentClose | ExtentReopen | ExtentFlush | ExtentRepair | RepairAckId | ExtentError
    | ExtentLiveClose | ExtentLiveFlushClose | ExtentLiveRepair | ExtentLiveReopen | ExtentLiveNoOp
    | ExtentLiveCloseAck | ExtentLiveRepairAckId | ExtentLiveAckId
    | RegionInfoPlease | RegionInfo | ExtentVersionsPlease | ExtentVersions | LastFlush
    | Write | WriteAck | Flush | FlushAck | Barrier | BarrierAck | ReadRequest | ReadResponse
    | WriteUnwritten | WriteUnwrittenAck | ErrorReport | Unknown
)  # fmt: skip

VARIANTS: tuple[type[Any], ...] = (
    HereIAm, YesItsMe, VersionMismatch, ReadOnlyMismatch, EncryptedMismatch, PromoteToActive,
    YouAreNowActive, YouAreNoLongerActive, UuidMismatch, Ruok, Imok,
    ExtentClose, ExtentReopen, ExtentFlush, ExtentRepair, RepairAckId, ExtentError,
    ExtentLiveClose, ExtentLiveFlushClose, ExtentLiveRepair, ExtentLiveReopen, ExtentLiveNoOp,
    ExtentLiveCloseAck, ExtentLiveRepairAckId, ExtentLiveAckId,
    RegionInfoPlease, RegionInfo, ExtentVersionsPlease, ExtentVersions, LastFlush,
    Write, WriteAck, Flush, FlushAck, Barrier, BarrierAck, ReadRequest, ReadResponse,
    WriteUnwritten, WriteUnwrittenAck, ErrorReport, Unknown,
)  # fmt: skip
"""Every variant, at its wire index."""

MESSAGE = bincode.EnumOf("Message", [bincode.dataclass_codec(cls) for cls in VARIANTS], is_message=True)

DATA_MESSAGES: dict[int, bincode.Codec[Any]] = {
    VARIANTS.index(Write): WRITE_HEADER,
    VARIANTS.index(ReadResponse): READ_RESPONSE_HEADER,
    VARIANTS.index(WriteUnwritten): WRITE_HEADER,
}
"""Variant index -> codec of the header that precedes the bulk ``data``, for the variants whose
data is sent and received apart from their head."""


def variant_index(msg: Message) -> int:
    return MESSAGE.index[type(msg)]


# -- encoding --------------------------------------------------------------------------------
def encode(msg: Message) -> bytes:
    """The whole frame of ``msg``, length prefix included."""
    head, data = encode_parts(msg)
    return head + data if data else head


def encode_parts(msg: Message) -> tuple[bytes, bytes]:
    """``(head, data)``: the frame is ``head + data``; ``data`` is the bulk data of Write,
    WriteUnwritten and ReadResponse (the object passed in, not a copy) and empty otherwise.

    Raises BincodeError for a value its field cannot hold, or a frame above MAX_FRAME.
    """
    index = MESSAGE.index.get(type(msg))
    if index is None:
        raise BincodeError(f"cannot encode: {type(msg).__name__} is not a Message")
    w = bincode.Writer()
    w.u32(0)  # the length, patched below
    header_codec = DATA_MESSAGES.get(index)
    data: bytes = b""
    if header_codec is None:
        MESSAGE.encode(w, msg)
    else:
        with_data = cast(Write | WriteUnwritten | ReadResponse, msg)
        data = with_data.data
        if not isinstance(data, bytes | bytearray | memoryview):
            raise BincodeError("cannot encode: data is not bytes", message=type(msg).__name__, field="data")
        w.u32(index)
        try:
            header_codec.encode(w, with_data.header)
        except BincodeError as exc:
            raise BincodeError(
                exc.problem, message=type(msg).__name__, field=f"header.{exc.field}", offset=exc.offset
            ) from None
        w.u64(len(data))
    frame_len = len(w.out) + len(data)
    if frame_len > MAX_FRAME:
        raise BincodeError(
            f"cannot encode: frame of {frame_len} bytes exceeds the maximum {MAX_FRAME}",
            message=type(msg).__name__,
        )
    _LEN.pack_into(w.out, 0, frame_len)
    return bytes(w.out), data


# -- decoding --------------------------------------------------------------------------------
def split_frame(view: memoryview, cap: int) -> tuple[int, int] | None:
    """``(head_len, data_len)`` of the frame at the start of ``view`` (maybe incomplete), or
    None until enough of it has arrived to tell.

    The head of Write, WriteUnwritten and ReadResponse ends after their data count; every
    other message is all head (data_len 0). Raises BincodeError as soon as the bytes that show
    it have arrived: a length prefix below MIN_FRAME or above ``cap``, an unknown variant, a
    malformed data-message header, a data count that is not the rest of the frame.
    """
    if len(view) < 4:
        return None
    frame_len: int = _LEN.unpack_from(view)[0]
    if frame_len < MIN_FRAME:
        raise BincodeError(
            f"length prefix {frame_len} is below the minimum frame of {MIN_FRAME}", field=_FRAME
        )
    if frame_len > cap:
        raise BincodeError(f"length prefix {frame_len} exceeds the frame cap {cap}", field=_FRAME)
    if len(view) < 8:
        return None
    index: int = _LEN.unpack_from(view, 4)[0]
    if index >= len(VARIANTS):
        raise BincodeError(
            f"Message index {index} is not one of the {len(VARIANTS)} variants", field=_FRAME, offset=4
        )
    header_codec = DATA_MESSAGES.get(index)
    if header_codec is None:
        return frame_len, 0
    # Find where the head ends by decoding the header from what has arrived, with every
    # count bounded by the frame's length.
    have = min(len(view), frame_len)
    r = bincode.Reader(view[8:have], base=8, limit=frame_len - 8)
    r.message = VARIANTS[index].__name__
    try:
        r.push("header")
        header_codec.skip(r)
        r.pop()
        r.push("data")
        count = r.u64()
    except BincodeError as exc:
        if exc.truncated and have < frame_len:
            return None
        raise
    head_len = 8 + r.pos
    if count != frame_len - head_len:
        left = frame_len - head_len
        raise r.error(f"data count {count} is not the {left} bytes left in the frame", at=r.pos - 8)
    return head_len, count


def decode(frame: bytes | bytearray | memoryview) -> Message:
    """The message of one complete frame (length prefix included), checked strictly.

    Raises BincodeError when the frame is short, longer than its length prefix says, above
    MAX_FRAME, or its content does not decode exactly.
    """
    view = memoryview(frame).cast("B")
    known = split_frame(view, MAX_FRAME)
    if known is None:
        need = _LEN.unpack_from(view)[0] if len(view) >= 4 else 4
        raise BincodeError(f"{len(view)} bytes is truncated (needs {need})", field=_FRAME, truncated=True)
    head_len, data_len = known
    end = head_len + data_len
    if len(view) < end:
        raise BincodeError(f"{len(view)} bytes is truncated (needs {end})", field=_FRAME, truncated=True)
    if len(view) > end:
        raise BincodeError(f"{len(view) - end} bytes after the frame's end", field=_FRAME, offset=end)
    return decode_record(view[:head_len], view[head_len:])


def decode_record(head: bytes | bytearray | memoryview, data: bytes | bytearray | memoryview) -> Message:
    """The message of a frame received as ``head`` (length prefix .. data count) + ``data``.

    ``data`` is empty for messages without bulk data (the head is then the whole frame). For
    Write/WriteUnwritten/ReadResponse it becomes the message's ``data`` as is (no copy): pass
    bytes, or a bytearray nobody writes to afterwards.
    """
    r = bincode.Reader(head)
    frame_len = r.u32()
    if frame_len != len(head) + len(data):
        raise BincodeError(
            f"length prefix {frame_len} != the {len(head) + len(data)} bytes received", field=_FRAME
        )
    at = r.pos
    index = r.tag(len(VARIANTS), "Message")
    header_codec = DATA_MESSAGES.get(index)
    if header_codec is None:
        if data:
            raise r.error(f"{VARIANTS[index].__name__} carries no bulk data, got {len(data)} bytes", at=at)
        r.pos = at
        msg: Message = MESSAGE.decode(r)
        if not r.at_end():
            r.push("(end)")
            raise r.error(f"{r.remaining} trailing bytes after the message")
        return msg
    r.message = VARIANTS[index].__name__
    r.push("header")
    header = header_codec.decode(r)
    r.pop()
    r.push("data")
    at = r.pos
    count = r.u64()
    if not r.at_end():
        raise r.error(f"{r.remaining} bytes between the data count and the data")
    if count != len(data):
        raise r.error(f"data count {count} is not the {len(data)} bytes of data that follow", at=at)
    payload = bytes(data) if isinstance(data, memoryview) else data
    # a received bytearray stands for the bytes it holds (see sut.storage.stream.Record)
    return cast(Message, VARIANTS[index](header=header, data=cast(bytes, payload)))
