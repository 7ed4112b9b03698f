"""Crucible's wire protocol (sut.storage.wire): golden bytes, round trips, hostile frames.

Golden frames come from two places: crucible-wire.md (checked byte for byte against the real
binary by whoever wrote it) and ``ORACLE_FRAMES``, captured here from the real
crucible-downstairs by tests/integration/storage/test_wire_oracle.py, which also checks that
the binary still sends exactly these bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import struct
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sut.storage import bincode, wire
from sut.storage.errors import ProtocolError
from sut.storage.stream import RecordStream, RecordWriter, create_server, open_stream
from sut.storage.wire import fields
from sut.storage.wire import messages as m
from sut.storage.wire.blockhash import (
    block_hash,
    encrypted_block_hash,
    unencrypted_contexts,
    verify_unencrypted,
)
from sut.storage.wire.crucible_error import (
    CRUCIBLE_ERROR,
    ERROR_DETAIL,
    NEGOTIATION_ERROR,
    CrucibleError,
    ErrorKind,
    MissingContextSlot,
    NegotiationGenerationNumberTooLow,
    NegotiationUpstairsIdMismatch,
)
from sut.storage.wire.framing import MIN_FRAME, NEGOTIATION_FRAME_CAP, extent_versions_frame_len

# -- golden frames -------------------------------------------------------------------------------
ORACLE_UPSTAIRS = uuid.UUID("262fe0e1-8b82-485d-a489-0bee76e31f29")
ORACLE_SESSION = uuid.UUID("b9f54ec5-2f3b-4cb8-bbe6-c8be5d758a05")
ORACLE_REGION = uuid.UUID("5c1e5a3d-7d4f-4e2b-9a63-0d1f2e3c4b5a")
ORACLE_BLOCK_SIZE = 512


def oracle_pattern(blocks: int) -> bytes:
    """The data the oracle session writes (no block of it is all zeros)."""
    pieces = (bytes([i + 1]) * 16 + bytes(range(256)) * 2 + b"phd-wire" * 30 for i in range(blocks))
    return b"".join(pieces)[: blocks * ORACLE_BLOCK_SIZE]


# Frames the real crucible-downstairs sent (captured by test_wire_oracle.py; uuids above, a
# region of 4 extents of 64 blocks of 512 bytes; the repair port in YesItsMe was 55279).
ORACLE_FRAMES: dict[str, bytes] = {
    "Imok": bytes.fromhex("080000000a000000"),
    "YesItsMe": bytes.fromhex("16000000010000000d000000000000007f000001efd7"),
    "YouAreNowActive": bytes.fromhex(
        "40000000060000001000000000000000262fe0e18b82485da4890bee76e31f291000000000000000b9f54ec52f3b4cb8"
        "bbe6c8be5d758a050100000000000000"
    ),
    "RegionInfo": bytes.fromhex(
        "490000001a00000000020000000000004000000000000000090000000400000010000000000000005c1e5a3d7d4f4e2b"
        "9a630d1f2e3c4b5a0001000000000000000100000000000000"
    ),
    "ExtentVersions": bytes.fromhex(
        "640000001c00000004000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "040000000000000000000000000000000000000000000000000000000000000000000000000000000400000000000000"
        "00000000"
    ),
    "WriteAck": bytes.fromhex(
        "440000001f0000001000000000000000262fe0e18b82485da4890bee76e31f291000000000000000b9f54ec52f3b4cb8"
        "bbe6c8be5d758a05e80300000000000000000000"
    ),
    "FlushAck": bytes.fromhex(
        "44000000210000001000000000000000262fe0e18b82485da4890bee76e31f291000000000000000b9f54ec52f3b4cb8"
        "bbe6c8be5d758a05e90300000000000000000000"
    ),
    "ReadResponse": bytes.fromhex(
        "78060000250000001000000000000000262fe0e18b82485da4890bee76e31f291000000000000000b9f54ec52f3b4cb8"
        "bbe6c8be5d758a05ea03000000000000000000000300000000000000020000006c8f79793445a5710200000013d31d18"
        "d012b95402000000a464d727331f69480006000000000000"
    )
    + oracle_pattern(3),
    "ReadResponseEmpty": bytes.fromhex(
        "5c040000250000001000000000000000262fe0e18b82485da4890bee76e31f291000000000000000b9f54ec52f3b4cb8"
        "bbe6c8be5d758a05eb0300000000000000000000020000000000000000000000000000000004000000000000"
    )
    + bytes(1024),
    "BarrierAck": bytes.fromhex(
        "44000000230000001000000000000000262fe0e18b82485da4890bee76e31f291000000000000000b9f54ec52f3b4cb8"
        "bbe6c8be5d758a05ec0300000000000000000000"
    ),
    "VersionMismatch": bytes.fromhex("0c000000020000000d000000"),
    "UuidMismatch": bytes.fromhex("20000000080000001000000000000000262fe0e18b82485da4890bee76e31f29"),
    "YouAreNoLongerActive": bytes.fromhex(
        "4000000007000000100000000000000000000000000000000000000000000abc10000000000000000000000000000000"
        "0000000000000def0200000000000000"
    ),
    "ExtentLiveAckId": bytes.fromhex(
        "44000000180000001000000000000000262fe0e18b82485da4890bee76e31f291000000000000000b9f54ec52f3b4cb8"
        "bbe6c8be5d758a05eb0300000000000000000000"
    ),
    "ReadResponseNone": bytes.fromhex(
        "54000000250000001000000000000000262fe0e18b82485da4890bee76e31f291000000000000000b9f54ec52f3b4cb8"
        "bbe6c8be5d758a05ed030000000000000000000000000000000000000000000000000000"
    ),
    "ExtentVersionsAfterFlush": bytes.fromhex(
        "640000001c0000000400000000000000000000000000000001000000000000000000000000000000000000000000000004"
        "000000000000000000000000000000080000000000000000000000000000000000000000000000040000000000000000"
        "000000"
    ),
    "ErrorReport": bytes.fromhex(
        "56000000280000001000000000000000262fe0e18b82485da4890bee76e31f291000000000000000b9f54ec52f3b4cb8"
        "bbe6c8be5d758a05e903000000000000000000000a0000000000000074657374206572726f72"
    ),
    "ReadOnlyMismatch": bytes.fromhex("090000000300000000"),
    "EncryptedMismatch": bytes.fromhex("090000000400000000"),
}

# Frames we sent that the real downstairs accepted (HereIAm is also crucible-wire.md's).
SENT_FRAMES: dict[str, bytes] = {
    "HereIAm": bytes.fromhex(
        "4e000000000000000d0000001000000000000000262fe0e18b82485da4890bee76e31f291000000000000000b9f54ec5"
        "2f3b4cb8bbe6c8be5d758a05010000000000000000000000000000000000"
    ),
    "Write": bytes.fromhex(
        "7b0600001e0000001000000000000000262fe0e18b82485da4890bee76e31f291000000000000000b9f54ec52f3b4cb8"
        "bbe6c8be5d758a05e8030000000000000000000000000000050000000000000003000000000000006c8f79793445a571"
        "0013d31d18d012b95400a464d727331f6948000006000000000000"
    )
    + oracle_pattern(3),
}

U, S = ORACLE_UPSTAIRS, ORACLE_SESSION
_HASHES = (0x71A5453479798F6C, 0x54B912D0181DD313, 0x48691F3327D764A4)

ORACLE_MESSAGES: dict[str, wire.Message] = {
    "Imok": m.Imok(),
    "YesItsMe": m.YesItsMe(13, wire.SocketAddr.parse("127.0.0.1", 55279)),
    "YouAreNowActive": m.YouAreNowActive(U, S, 1),
    "RegionInfo": m.RegionInfo(
        wire.RegionDefinition(512, wire.ExtentSize(64, 9), 4, ORACLE_REGION, False, 1, 1)
    ),
    "ExtentVersions": m.ExtentVersions((0,) * 4, (0,) * 4, (False,) * 4),
    "WriteAck": m.WriteAck(U, S, 1000, None),
    "FlushAck": m.FlushAck(U, S, 1001, None),
    "ReadResponse": m.ReadResponse(
        wire.ReadResponseHeader(U, S, 1002, tuple(wire.ReadBlockUnencrypted(h) for h in _HASHES)),
        oracle_pattern(3),
    ),
    "ReadResponseEmpty": m.ReadResponse(
        wire.ReadResponseHeader(U, S, 1003, (wire.ReadBlockEmpty(), wire.ReadBlockEmpty())), bytes(1024)
    ),
    "BarrierAck": m.BarrierAck(U, S, 1004, None),
    "VersionMismatch": m.VersionMismatch(13),
    "UuidMismatch": m.UuidMismatch(U),
    "YouAreNoLongerActive": m.YouAreNoLongerActive(uuid.UUID(int=0xABC), uuid.UUID(int=0xDEF), 2),
    "ExtentLiveAckId": m.ExtentLiveAckId(U, S, 1003, None),
    "ReadResponseNone": m.ReadResponse(wire.ReadResponseHeader(U, S, 1005, ()), b""),
    "ExtentVersionsAfterFlush": m.ExtentVersions((0, 1, 0, 0), (0, 8, 0, 0), (False,) * 4),
    "ErrorReport": m.ErrorReport(U, S, 1001, CrucibleError(ErrorKind.GenericError, "test error")),
    "ReadOnlyMismatch": m.ReadOnlyMismatch(False),
    "EncryptedMismatch": m.EncryptedMismatch(False),
    "HereIAm": m.HereIAm(13, U, S, 1, False, False, ()),
    "Write": m.Write(
        wire.WriteHeader(U, S, 1000, (), 5, tuple(wire.BlockContext(h) for h in _HASHES)), oracle_pattern(3)
    ),
}

UUID_BYTES = "1000000000000000262fe0e18b82485da4890bee76e31f29"  # u64 16 + the upstairs id
SESSION_BYTES = "1000000000000000b9f54ec52f3b4cb8bbe6c8be5d758a05"

# crucible-wire.md "Golden frames", verbatim (spaces removed); <uuid> <uuid> = the two above.
WIRE_MD_FRAMES: list[tuple[str, wire.Message, str]] = [
    (
        "HereIAm",
        m.HereIAm(13, U, S, 1, False, False),
        "4e000000 00000000 0d000000 1000000000000000 262fe0e18b82485da4890bee76e31f29"
        " 1000000000000000 b9f54ec52f3b4cb8bbe6c8be5d758a05 0100000000000000 00 00 0000000000000000",
    ),
    (
        "YesItsMe",
        m.YesItsMe(13, wire.SocketAddr.parse("127.0.0.1", 42100)),
        "16000000 01000000 0d000000 00000000 7f000001 74a4",
    ),
    ("VersionMismatch", m.VersionMismatch(13), "0c000000 02000000 0d000000"),
    ("RegionInfoPlease", m.RegionInfoPlease(), "08000000 19000000"),
    (
        "WriteAck",
        m.WriteAck(U, S, 1000, None),
        f"44000000 1f000000 {UUID_BYTES} {SESSION_BYTES} e803000000000000 00000000",
    ),
]

VARIANT_NAMES = [
    "HereIAm",
    "YesItsMe",
    "VersionMismatch",
    "ReadOnlyMismatch",
    "EncryptedMismatch",
    "PromoteToActive",
    "YouAreNowActive",
    "YouAreNoLongerActive",
    "UuidMismatch",
    "Ruok",
    "Imok",
    "ExtentClose",
    "ExtentReopen",
    "ExtentFlush",
    "ExtentRepair",
    "RepairAckId",
    "ExtentError",
    "ExtentLiveClose",
    "ExtentLiveFlushClose",
    "ExtentLiveRepair",
    "ExtentLiveReopen",
    "ExtentLiveNoOp",
    "ExtentLiveCloseAck",
    "ExtentLiveRepairAckId",
    "ExtentLiveAckId",
    "RegionInfoPlease",
    "RegionInfo",
    "ExtentVersionsPlease",
    "ExtentVersions",
    "LastFlush",
    "Write",
    "WriteAck",
    "Flush",
    "FlushAck",
    "Barrier",
    "BarrierAck",
    "ReadRequest",
    "ReadResponse",
    "WriteUnwritten",
    "WriteUnwrittenAck",
    "ErrorReport",
    "Unknown",
]


@pytest.mark.parametrize(("name", "msg", "hex_"), WIRE_MD_FRAMES, ids=[f[0] for f in WIRE_MD_FRAMES])
def test_frames_of_crucible_wire_md(name: str, msg: wire.Message, hex_: str) -> None:
    frame = bytes.fromhex(hex_.replace(" ", ""))
    assert wire.encode(msg) == frame
    assert wire.decode(frame) == msg


@pytest.mark.parametrize("name", sorted(ORACLE_MESSAGES))
def test_frames_captured_from_the_real_downstairs(name: str) -> None:
    frame = ORACLE_FRAMES.get(name) or SENT_FRAMES[name]
    msg = ORACLE_MESSAGES[name]
    assert wire.decode(frame) == msg
    assert wire.encode(msg) == frame


def test_oracle_hashes_are_xxh64_of_the_blocks() -> None:
    data = oracle_pattern(3)
    assert tuple(c.hash for c in unencrypted_contexts(data, 512)) == _HASHES
    assert block_hash(b"") == 0xEF46DB3751D8E999  # xxHash64 of nothing, seed 0
    assert encrypted_block_hash(b"n" * 12, b"t" * 16, b"c") == block_hash(b"n" * 12 + b"t" * 16 + b"c")
    blocks = tuple(wire.ReadBlockUnencrypted(h) for h in _HASHES)
    assert verify_unencrypted(blocks, data, 512) == []
    assert verify_unencrypted(blocks, data[:512] + bytes(1024), 512) == [1, 2]
    assert verify_unencrypted((wire.ReadBlockEmpty(),), bytes(512), 512) == []
    assert verify_unencrypted((wire.ReadBlockEmpty(),), b"\x01" + bytes(511), 512) == [0]


def test_variant_indices_are_those_of_crucible_wire_md() -> None:
    assert [cls.__name__ for cls in m.VARIANTS] == VARIANT_NAMES
    assert len(VARIANT_NAMES) == 42
    for index, cls in enumerate(m.VARIANTS):
        assert m.MESSAGE.index[cls] == index
    assert sorted(m.DATA_MESSAGES) == [30, 37, 38]


def test_crucible_error_has_every_variant_of_the_source() -> None:
    assert len(ErrorKind) == 42 and [k.value for k in ErrorKind] == list(range(42))
    strings = [k for k, c in ERROR_DETAIL.items() if c is bincode.STRING]
    assert len(strings) == 18
    assert ErrorKind.MissingContextSlot.value == 36 and ErrorKind.NegotiationError.value == 41
    assert len(NEGOTIATION_ERROR.variants) == 8
    frame = wire.encode(
        m.ErrorReport(U, S, 7, CrucibleError(ErrorKind.MissingContextSlot, MissingContextSlot(9, 3)))
    )
    assert frame.endswith(struct.pack("<IQI", 36, 9, 3))
    frame = wire.encode(m.ErrorReport(U, S, 7, CrucibleError(ErrorKind.IoError, "disk")))
    assert frame.endswith(struct.pack("<IQ", 1, 4) + b"disk")
    err = CrucibleError(ErrorKind.NegotiationError, NegotiationGenerationNumberTooLow(3, 4))
    assert wire.encode(m.ErrorReport(U, S, 7, err)).endswith(struct.pack("<IIQQ", 41, 2, 3, 4))


def test_crucible_error_detail_must_fit_the_variant() -> None:
    with pytest.raises(TypeError):
        CrucibleError(ErrorKind.IoError)
    with pytest.raises(TypeError):
        CrucibleError(ErrorKind.HashMismatch, "no text for this one")
    with pytest.raises(TypeError):
        CrucibleError(ErrorKind.NegotiationError, "not a NegotiationError")
    assert str(CrucibleError(ErrorKind.IoError, "x")) == "IoError(x)"


@pytest.mark.parametrize(
    ("msg", "message", "field"),
    [
        (m.HereIAm(2**32, U, S, 1, False, False), "HereIAm", "version"),
        (m.PromoteToActive(U, "not a uuid", 1), "PromoteToActive", "session_id"),  # type: ignore[arg-type]
        (m.Write(wire.WriteHeader(U, S, 1, (-1,), 0, ()), b""), "Write", "header.dependencies[0]"),
        (
            m.Write(wire.WriteHeader(U, S, 1, (), 0, (wire.BlockContext(1), wire.BlockContext(2**64))), b""),
            "Write",
            "header.contexts[1].hash",
        ),
        (m.ExtentError(1, 2, "x"), "ExtentError", "error"),  # type: ignore[arg-type]
        (
            m.ReadResponse(wire.ReadResponseHeader(U, S, 1, (wire.ReadBlockUnencrypted(-5),)), b""),
            "ReadResponse",
            "header.blocks[0].Unencrypted.hash",
        ),
        (m.YesItsMe(13, wire.SocketAddr.parse("127.0.0.1", 65536)), "YesItsMe", "repair_addr"),
    ],
)
def test_encoding_a_bad_field_names_the_message_and_field(
    msg: wire.Message, message: str, field: str
) -> None:
    with pytest.raises(wire.BincodeError, match="cannot encode") as info:
        wire.encode(msg)
    assert (info.value.message, info.value.field) == (message, field)


# -- encode_parts / framing -------------------------------------------------------------------
def test_encode_parts_keeps_the_data_object_and_its_head_ends_with_the_count() -> None:
    data = bytearray(b"\x07" * 4096)
    msg = m.Write(wire.WriteHeader(U, S, 1, (), 0, unencrypted_contexts(data, 512)), bytes(data))
    head, part = wire.encode_parts(msg)
    assert part is msg.data
    assert head[-8:] == struct.pack("<Q", 4096)
    assert struct.unpack_from("<I", head)[0] == len(head) + 4096
    assert wire.FrameSplitter(wire.MAX_FRAME)(memoryview(head + part)) == (len(head), 4096)
    assert wire.decode_record(head, data) == msg
    assert wire.decode_record(head, data).data is data  # received in place: not copied
    assert wire.encode_parts(m.Ruok()) == (wire.encode(m.Ruok()), b"")


def test_frames_above_crucibles_maximum_are_refused() -> None:
    with mmap.mmap(-1, wire.MAX_FRAME) as big:  # untouched pages: no real memory
        data = memoryview(big)
        msg = m.Write(wire.WriteHeader(U, S, 1, (), 0, ()), data)  # type: ignore[arg-type]
        with pytest.raises(wire.BincodeError, match="exceeds the maximum"):
            wire.encode_parts(msg)
        data.release()
    with pytest.raises(wire.BincodeError, match="exceeds the frame cap"):
        wire.FrameSplitter(wire.MAX_FRAME)(memoryview(struct.pack("<II", wire.MAX_FRAME + 1, 30)))
    assert wire.FrameSplitter(wire.MAX_FRAME)(memoryview(struct.pack("<II", wire.MAX_FRAME, 9))) == (
        wire.MAX_FRAME,
        0,
    )


def test_the_negotiation_cap_is_small_and_the_active_cap_is_crucibles() -> None:
    prefix = memoryview(struct.pack("<II", NEGOTIATION_FRAME_CAP + 1, 28))
    with pytest.raises(ProtocolError, match="frame cap"):
        wire.FrameSplitter()(prefix)
    assert wire.FrameSplitter(wire.MAX_FRAME)(prefix) == (NEGOTIATION_FRAME_CAP + 1, 0)
    # the largest negotiation message a downstairs receives fits easily; ExtentVersions of a
    # big region does not, which is why the upstairs raises its cap after RegionInfo
    assert len(wire.encode(m.HereIAm(13, U, S, 1, False, False, tuple(range(1000))))) < NEGOTIATION_FRAME_CAP
    versions = m.ExtentVersions((1,) * 5000, (2,) * 5000, (True,) * 5000)
    assert len(wire.encode(versions)) == extent_versions_frame_len(5000) > NEGOTIATION_FRAME_CAP
    with pytest.raises(ValueError):
        wire.FrameSplitter(4)


@pytest.mark.parametrize("length", [0, 1, 3, 4, 7])
def test_length_prefix_below_a_variant_index_is_refused(length: int) -> None:
    # the real downstairs aborts on 0..3 (test_wire_oracle.py); we refuse them all
    with pytest.raises(wire.BincodeError, match="below the minimum"):
        wire.FrameSplitter()(memoryview(struct.pack("<I", length) + bytes(8)))
    with pytest.raises(wire.BincodeError):
        wire.decode(struct.pack("<I", length) + bytes(max(0, length - 4)))
    assert MIN_FRAME == 8


def test_frame_assembler_grows_with_the_bytes_and_raises_its_cap() -> None:
    frames = [wire.encode(m.Ruok()), *(ORACLE_FRAMES[k] for k in ("RegionInfo", "ReadResponse", "WriteAck"))]
    stream = b"".join(frames)
    asm = wire.FrameAssembler(wire.MAX_FRAME)
    got: list[wire.Message] = []
    for i in range(0, len(stream), 7):
        got += asm.feed(stream[i : i + 7])
        assert asm.buffered < 7 + max(len(f) for f in frames)
    assert got == [m.Ruok(), *(ORACLE_MESSAGES[k] for k in ("RegionInfo", "ReadResponse", "WriteAck"))]
    assert asm.buffered == 0
    # a claimed 100 MiB frame buffers only what arrived
    asm = wire.FrameAssembler(wire.MAX_FRAME)
    assert asm.feed(struct.pack("<II", wire.MAX_FRAME, 9) + bytes(100)) == []
    assert asm.buffered == 108
    small = wire.FrameAssembler()  # negotiation cap
    with pytest.raises(wire.BincodeError, match="frame cap"):
        small.feed(struct.pack("<II", NEGOTIATION_FRAME_CAP + 1, 30))
    with pytest.raises(wire.BincodeError):  # stays failed
        small.feed(wire.encode(m.Ruok()))
    grown = wire.FrameAssembler()
    grown.cap = wire.MAX_FRAME
    assert grown.cap == wire.MAX_FRAME


def test_frame_splitter_feeds_a_record_stream_that_receives_data_in_place() -> None:
    """FrameSplitter is a sut.storage.stream.Splitter: small cap while negotiating, then a
    1 MiB Write arrives as (head, data) once the connection is active."""
    data = bytes(range(256)) * 4096
    write = m.Write(wire.WriteHeader(U, S, 9, (8,), 0, unencrypted_contexts(data, 4096)), data)
    head, part = wire.encode_parts(write)

    async def main() -> list[wire.Message]:
        received: list[wire.Message] = []
        done = asyncio.get_running_loop().create_future()

        async def serve(reader: RecordStream, writer: RecordWriter) -> None:
            reader.set_splitter(wire.FrameSplitter())  # negotiation cap
            record = await reader.read_record()
            assert record is not None
            received.append(wire.decode_record(*record))
            reader.negotiated(wire.MAX_FRAME)
            reader.set_splitter(wire.FrameSplitter(wire.MAX_FRAME))
            writer.write(wire.encode(m.Imok()))
            while (record := await reader.read_record()) is not None:
                received.append(wire.decode_record(*record))
            writer.close()
            done.set_result(None)

        server = await create_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await open_stream("127.0.0.1", port, wire.FrameSplitter())
        writer.write(wire.encode(m.Ruok()))
        reply = await asyncio.wait_for(reader.read_record(), 30)
        assert reply is not None and wire.decode_record(*reply) == m.Imok()
        writer.write(head)
        writer.write(part)
        writer.write(wire.encode(m.Imok()))
        await writer.drain()
        writer.close()
        await asyncio.wait_for(done, 30)
        server.close()
        await server.wait_closed()
        return received

    assert asyncio.run(main()) == [m.Ruok(), write, m.Imok()]


def test_a_record_stream_refuses_a_big_frame_before_negotiation() -> None:
    async def main() -> BaseException | None:
        outcome = asyncio.get_running_loop().create_future()

        async def serve(reader: RecordStream, writer: RecordWriter) -> None:
            reader.set_splitter(wire.FrameSplitter())
            try:
                await reader.read_record()
                outcome.set_result(None)
            except ProtocolError as exc:
                outcome.set_result(exc)
            writer.close()

        server = await create_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await open_stream("127.0.0.1", port)
        writer.write(struct.pack("<II", NEGOTIATION_FRAME_CAP + 1, 26))
        await writer.drain()
        result = await asyncio.wait_for(outcome, 30)
        writer.close()
        server.close()
        await server.wait_closed()
        return result

    assert isinstance(asyncio.run(main()), ProtocolError)


# -- hostile frames --------------------------------------------------------------------------
def _frame(body: bytes) -> bytes:
    return struct.pack("<I", 4 + len(body)) + body


def _error(frame: bytes) -> wire.BincodeError:
    with pytest.raises(wire.BincodeError) as info:
        wire.decode(frame)
    return info.value


def test_a_vec_claiming_2_to_the_60_items_in_a_small_frame_is_an_error_not_an_allocation() -> None:
    body = struct.pack("<IQ", 28, 1 << 60) + bytes(80)  # ExtentVersions.gen_numbers
    err = _error(_frame(body))
    assert err.message == "ExtentVersions" and err.field == "gen_numbers" and err.offset == 8
    assert "count 1152921504606846976" in str(err)
    # the same inside a Write header, seen by the splitter before the frame is complete
    write = SENT_FRAMES["Write"]
    evil = bytearray(write)
    deps_at = 4 + 4 + 24 + 24 + 8
    struct.pack_into("<Q", evil, deps_at, 1 << 60)
    with pytest.raises(wire.BincodeError, match=r"header\.dependencies"):
        wire.FrameSplitter(wire.MAX_FRAME)(memoryview(evil)[:100])


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (struct.pack("<I", 42), "Message index 42"),
        (struct.pack("<I", 0xFFFFFFFF), "Message index 4294967295"),
        (struct.pack("<IQII", 16, 1, 2, 42), "CrucibleError index 42"),  # ExtentError.error
        (struct.pack("<IQIII", 16, 1, 2, 41, 8), "NegotiationError index 8"),
        (struct.pack("<IQ16sQ16sQI", 31, 16, U.bytes, 16, S.bytes, 1, 2), "Result index 2"),
        (struct.pack("<II", 1, 13) + struct.pack("<I", 2), "SocketAddr index 2"),
        (struct.pack("<IB", 29, 2) + bytes(8), "Option tag must be 0 or 1, got 2"),
        (struct.pack("<IB", 3, 2), "bool must be 0 or 1, got 2"),
        (struct.pack("<IQ", 8, 15) + bytes(15), "a UUID is 16 bytes, not 15"),
        (struct.pack("<IQIIQ", 16, 1, 2, 1, 2) + b"\xff\xfe", "not UTF-8"),
    ],
    ids=[
        "message-42",
        "message-max",
        "crucible-error-42",
        "negotiation-error-8",
        "result-2",
        "socketaddr-2",
        "option-2",
        "bool-2",
        "uuid-15",
        "bad-utf8",
    ],
)
def test_bad_tags_and_values_are_errors(body: bytes, where: str) -> None:
    with pytest.raises(wire.BincodeError, match=where):
        wire.decode(_frame(body))


def test_bool_two_in_here_i_am_names_the_field_and_offset() -> None:
    frame = bytearray(SENT_FRAMES["HereIAm"])
    frame[68] = 2  # read_only
    err = _error(bytes(frame))
    assert (err.message, err.field, err.offset) == ("HereIAm", "read_only", 68)


def test_trailing_bytes_are_an_error() -> None:
    # The real downstairs accepts these (bincode's deserialize ignores them); we do not.
    frame = bytearray(SENT_FRAMES["HereIAm"] + b"\x00")
    struct.pack_into("<I", frame, 0, len(frame))
    assert "1 trailing bytes" in str(_error(bytes(frame)))
    with pytest.raises(wire.BincodeError, match="after the frame's end"):
        wire.decode(wire.encode(m.Ruok()) + b"x")


def test_data_count_must_be_the_rest_of_the_frame() -> None:
    write = bytearray(SENT_FRAMES["Write"])
    head_len = len(write) - 1536
    split = wire.FrameSplitter(wire.MAX_FRAME)
    for count in (1535, 1537, 1 << 20, 1 << 63):
        evil = bytearray(write)
        struct.pack_into("<Q", evil, head_len - 8, count)
        with pytest.raises(wire.BincodeError, match="data count"):
            split(memoryview(evil))
        with pytest.raises(wire.BincodeError, match="data count"):
            wire.decode(bytes(evil))
    # bytes between the count and the data (the real downstairs skips them; we refuse)
    evil = bytearray(write[:head_len] + b"JUNK" + write[head_len:])
    struct.pack_into("<I", evil, 0, len(evil))
    with pytest.raises(wire.BincodeError, match="data count"):
        wire.decode(bytes(evil))
    with pytest.raises(wire.BincodeError, match="carries no bulk data"):
        wire.decode_record(struct.pack("<II", 9, 9), b"x")  # Ruok with a byte of "data"
    with pytest.raises(wire.BincodeError, match="length prefix"):
        wire.decode_record(write[:head_len], write[head_len:-1])


# -- negotiation ------------------------------------------------------------------------------
REPAIR = wire.SocketAddr.parse("127.0.0.1", 13000)


@pytest.mark.parametrize(
    ("version", "alternates", "expected"),
    [
        (13, (), 13),
        (13, (12,), 13),
        (12, (), None),
        (14, (), None),
        (12, (11, 10), None),
        (14, (13,), 13),
        (7, (12, 13, 14), 13),
    ],
)
def test_version_choice_is_the_real_downstairs_rule(
    version: int, alternates: tuple[int, ...], expected: int | None
) -> None:
    hello = m.HereIAm(version, U, S, 1, False, False, alternates)
    assert wire.choose_version(hello) == expected
    reply = wire.answer_here_i_am(hello, repair_addr=REPAIR, read_only=False, encrypted=False)
    assert reply == (m.VersionMismatch(13) if expected is None else m.YesItsMe(13, REPAIR))


def test_version_choice_with_several_supported_versions() -> None:
    assert wire.choose_version(m.HereIAm(12, U, S, 1, False, False, (13,)), (12, 13)) == 12
    assert wire.choose_version(m.HereIAm(15, U, S, 1, False, False, (11, 12, 13)), (12, 13)) == 13
    hello = m.HereIAm(15, U, S, 1, False, False)
    reply = wire.answer_here_i_am(
        hello, repair_addr=REPAIR, read_only=False, encrypted=False, supported=(12, 13)
    )
    assert reply == m.VersionMismatch(13)


def test_here_i_am_checks_version_then_read_only_then_encryption() -> None:
    def answer(hello: m.HereIAm) -> wire.Message:
        return wire.answer_here_i_am(hello, repair_addr=REPAIR, read_only=False, encrypted=False)

    assert answer(m.HereIAm(12, U, S, 1, True, True)) == m.VersionMismatch(13)
    assert answer(m.HereIAm(13, U, S, 1, True, True)) == m.ReadOnlyMismatch(False)
    assert answer(m.HereIAm(13, U, S, 1, False, True)) == m.EncryptedMismatch(False)


# -- property tests -----------------------------------------------------------------------------
def _socket_addrs() -> st.SearchStrategy[wire.SocketAddr]:
    ports = st.integers(0, 0xFFFF)
    v4 = st.builds(
        lambda b, c, d, p: wire.SocketAddr.parse(f"127.{b}.{c}.{d}", p), *[st.integers(0, 255)] * 3, ports
    )
    v6 = st.builds(lambda p: wire.SocketAddr.parse("::1", p), ports)
    return st.one_of(v4, v6)


def strategy_for(codec: bincode.Codec[Any]) -> st.SearchStrategy[Any]:
    """Values of the Rust type ``codec`` describes (derived from the codec's structure)."""
    if isinstance(codec, bincode.Int):
        return st.integers(0, codec.max)
    if codec is bincode.BOOL:
        return st.booleans()
    if codec is bincode.UNIT:
        return st.none()
    if codec is bincode.BYTES:
        return st.binary(max_size=600)
    if codec is bincode.STRING:
        return st.text(max_size=40)
    if codec is bincode.UUID:
        return st.uuids()
    if isinstance(codec, bincode.FixedBytes):
        return st.binary(min_size=codec.min_size, max_size=codec.min_size)
    if isinstance(codec, bincode.SocketAddrCodec):
        return _socket_addrs()
    if isinstance(codec, bincode.VecOf):
        return st.lists(strategy_for(codec.item), max_size=40).map(tuple)
    if isinstance(codec, bincode.OptionOf):
        return st.one_of(st.none(), strategy_for(codec.item))
    if isinstance(codec, bincode.ResultOf):
        return st.one_of(strategy_for(codec.ok), strategy_for(codec.err))
    if isinstance(codec, bincode.TupleOf):
        return st.tuples(*(strategy_for(c) for c in codec.items))
    if isinstance(codec, bincode.StructOf):
        return st.builds(codec.cls, **{name: strategy_for(c) for name, c in codec.fields})
    if isinstance(codec, bincode.EnumOf):
        return st.one_of(*(strategy_for(v) for v in codec.variants))
    if codec is CRUCIBLE_ERROR:
        return st.sampled_from(ErrorKind).flatmap(
            lambda kind: st.builds(
                CrucibleError,
                st.just(kind),
                st.none() if ERROR_DETAIL[kind] is None else strategy_for(ERROR_DETAIL[kind]),  # type: ignore[arg-type]
            )
        )
    raise AssertionError(f"no strategy for {codec!r}")


messages_st = strategy_for(m.MESSAGE)
PROPERTY = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.mark.parametrize("cls", m.VARIANTS, ids=VARIANT_NAMES)
@settings(max_examples=25, deadline=None, database=None)
@given(data=st.data())
def test_every_variant_round_trips(cls: type, data: st.DataObject) -> None:
    msg = data.draw(strategy_for(m.MESSAGE.variants[m.MESSAGE.index[cls]]))
    frame = wire.encode(msg)
    assert wire.decode(frame) == msg
    head, part = wire.encode_parts(msg)
    assert head + part == frame
    assert wire.decode_record(head, part) == msg


@PROPERTY
@given(msg=messages_st)
def test_round_trip_and_every_truncation_is_a_protocol_error(msg: wire.Message) -> None:
    frame = wire.encode(msg)
    assert wire.decode(frame) == msg
    split = wire.FrameSplitter(wire.MAX_FRAME)
    whole = split(memoryview(frame))
    assert whole is not None and sum(whole) == len(frame)
    for cut in range(len(frame)):
        with pytest.raises(wire.BincodeError):
            wire.decode(frame[:cut])
        # a prefix of a valid frame is never an error to the splitter: unknown yet, or known
        assert split(memoryview(frame[:cut])) in (None, whole)


@PROPERTY
@given(msg=messages_st, data=st.data())
def test_corrupted_frames_raise_only_the_package_error(msg: wire.Message, data: st.DataObject) -> None:
    frame = bytearray(wire.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    # a BincodeError is fine; anything else (IndexError, struct.error, MemoryError) fails the test
    with contextlib.suppress(ProtocolError):
        wire.decode(bytes(frame))


@settings(max_examples=300, deadline=None, database=None)
@given(raw=st.binary(max_size=200))
def test_garbage_raises_only_the_package_error(raw: bytes) -> None:
    for frame in (raw, _frame(raw)):
        with contextlib.suppress(ProtocolError):
            wire.decode(frame)


@settings(max_examples=100, deadline=None, database=None)
@given(msgs=st.lists(messages_st, max_size=5), chunk=st.integers(1, 300))
def test_assembler_cuts_any_chunking_into_the_messages(msgs: list[wire.Message], chunk: int) -> None:
    stream = b"".join(wire.encode(x) for x in msgs)
    asm = wire.FrameAssembler(wire.MAX_FRAME)
    got: list[wire.Message] = []
    for i in range(0, len(stream), chunk):
        got += asm.feed(stream[i : i + chunk])
    assert got == msgs and asm.buffered == 0


@pytest.mark.parametrize("kind", list(ErrorKind), ids=[k.name for k in ErrorKind])
def test_every_crucible_error_variant_round_trips(kind: ErrorKind) -> None:
    detail: Any = {
        None: None,
        bincode.STRING: f"{kind.name} text \u00e9",
        NEGOTIATION_ERROR: NegotiationUpstairsIdMismatch(U, S),
    }.get(ERROR_DETAIL[kind], MissingContextSlot(1 << 63, 7))
    err = CrucibleError(kind, detail)
    for msg in (
        m.ExtentError(3, 4, err),
        m.ErrorReport(U, S, 5, err),
        m.ExtentLiveCloseAck(U, S, 6, err),
        m.ReadResponse(wire.ReadResponseHeader(U, S, 7, err), b""),
    ):
        frame = wire.encode(msg)
        assert wire.decode(frame) == msg
        assert frame[8:].count(struct.pack("<I", kind.value)) >= 1


# -- the bulk paths for block contexts give the generic path's bytes ---------------------------------
GENERIC_CONTEXTS = bincode.VecOf(fields.BLOCK_CONTEXT)
GENERIC_READ_CONTEXTS = bincode.VecOf(fields.READ_BLOCK_CONTEXT)
FAST_CONTEXTS = dict(fields.WRITE_HEADER.fields)["contexts"]
FAST_READ_CONTEXTS = dict(fields.READ_RESPONSE_HEADER.fields)["blocks"].ok  # type: ignore[attr-defined]


def _same_both_ways(fast: bincode.Codec[Any], generic: bincode.Codec[Any], value: tuple[Any, ...]) -> None:
    w_fast, w_generic = bincode.Writer(), bincode.Writer()
    fast.encode(w_fast, value)
    generic.encode(w_generic, value)
    assert w_fast.out == w_generic.out
    encoded = bytes(w_fast.out)
    for codec in (fast, generic):
        r = bincode.Reader(encoded)
        assert codec.decode(r) == value and r.at_end()
        r = bincode.Reader(encoded)
        codec.skip(r)
        assert r.at_end()
        for cut in range(0, len(encoded), 7):  # a prefix: truncated, whichever path
            with pytest.raises(wire.BincodeError) as info:
                codec.decode(bincode.Reader(encoded[:cut], limit=len(encoded)))
            assert info.value.truncated


@settings(max_examples=150, deadline=None, database=None)
@given(
    st.lists(
        st.one_of(
            st.builds(wire.BlockContext, st.integers(0, 2**64 - 1)),
            strategy_for(fields.BLOCK_CONTEXT),
        ),
        max_size=60,
    ).map(tuple)
)
def test_bulk_block_contexts_match_the_generic_codec(contexts: tuple[wire.BlockContext, ...]) -> None:
    _same_both_ways(FAST_CONTEXTS, GENERIC_CONTEXTS, contexts)


@settings(max_examples=150, deadline=None, database=None)
@given(
    st.lists(
        st.one_of(
            st.builds(wire.ReadBlockUnencrypted, st.integers(0, 2**64 - 1)),
            strategy_for(fields.READ_BLOCK_CONTEXT),
        ),
        max_size=60,
    ).map(tuple)
)
def test_bulk_read_block_contexts_match_the_generic_codec(blocks: tuple[wire.ReadBlockContext, ...]) -> None:
    _same_both_ways(FAST_READ_CONTEXTS, GENERIC_READ_CONTEXTS, blocks)


def test_long_vectors_round_trip() -> None:
    data = bytes(range(256)) * 2 * 2048  # 1 MiB
    contexts = unencrypted_contexts(data, 512)
    big = [
        m.Write(wire.WriteHeader(U, S, 2**64 - 1, tuple(range(500)), 2**63, contexts), data),
        m.ReadResponse(
            wire.ReadResponseHeader(U, S, 1, tuple(wire.ReadBlockUnencrypted(c.hash) for c in contexts)), data
        ),
        m.ExtentVersions(tuple(range(10_000)), (2**64 - 1,) * 10_000, (True, False) * 5_000),
    ]
    for msg in big:
        head, part = wire.encode_parts(msg)
        assert wire.decode_record(head, part) == msg
        assert wire.decode(head + part) == msg
    mixed = (*contexts[:10], wire.BlockContext(5, wire.EncryptionContext(b"n" * 12, b"t" * 16)))
    write = m.Write(wire.WriteHeader(U, S, 1, (), 0, mixed), bytes(512 * 11))
    assert wire.decode(wire.encode(write)) == write
