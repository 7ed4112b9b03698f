"""The structs and enums Crucible's messages carry, and the wire type of every field.

A field's annotation names its Rust type: ``JobId`` is ``Annotated[int, bincode.U64]``, so
``bincode.dataclass_codec`` reads the wire layout straight from the dataclass. Sequences
decode to tuples; ``Result<T, CrucibleError>`` is the T value itself, or the CrucibleError.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from sut.storage import bincode
from sut.storage.bincode import SocketAddr
from sut.storage.wire.crucible_error import CRUCIBLE_ERROR, CrucibleError

__all__ = [
    "BLOCK_CONTEXT",
    "READ_BLOCK_CONTEXT",
    "READ_RESPONSE_HEADER",
    "REGION_DEFINITION",
    "WRITE_HEADER",
    "BlockContext",
    "EncryptionContext",
    "ExtentSize",
    "ReadBlockContext",
    "ReadBlockEmpty",
    "ReadBlockEncrypted",
    "ReadBlockUnencrypted",
    "ReadResponseHeader",
    "RegionDefinition",
    "SnapshotDetails",
    "WriteHeader",
]

# -- scalar wire types ---------------------------------------------------------------------------
U8 = Annotated[int, bincode.U8]
U32 = Annotated[int, bincode.U32]
U64 = Annotated[int, bincode.U64]
Bool = Annotated[bool, bincode.BOOL]
Uuid = Annotated[uuid.UUID, bincode.UUID]
String = Annotated[str, bincode.STRING]
Bytes = Annotated[bytes, bincode.BYTES]
Addr = Annotated[SocketAddr, bincode.SocketAddrCodec()]
JobId = U64
ReconciliationId = U64
BlockIndex = U64  # an absolute block number in the region
ExtentId = U32
ClientId = U8  # 0..2 in Crucible, not checked on the wire
JobIds = Annotated[tuple[int, ...], bincode.VecOf(bincode.U64)]
U32s = Annotated[tuple[int, ...], bincode.VecOf(bincode.U32)]
U64s = Annotated[tuple[int, ...], bincode.VecOf(bincode.U64)]
Bools = Annotated[tuple[bool, ...], bincode.VecOf(bincode.BOOL)]
ClientIds = Annotated[tuple[int, ...], bincode.VecOf(bincode.U8)]
Error = Annotated[CrucibleError, CRUCIBLE_ERROR]
UnitResult = Annotated[CrucibleError | None, bincode.ResultOf(bincode.UNIT, CRUCIBLE_ERROR, CrucibleError)]
"""``Result<(), CrucibleError>``: None for Ok(()), else the error."""


# -- block contexts -----------------------------------------------------------------------------
@dataclass(frozen=True)
class EncryptionContext:
    nonce: Annotated[bytes, bincode.FixedBytes(12)]
    tag: Annotated[bytes, bincode.FixedBytes(16)]


ENCRYPTION_CONTEXT = bincode.dataclass_codec(EncryptionContext)


@dataclass(frozen=True)
class BlockContext:
    """Sent with every written block. ``hash``: xxHash64 (seed 0) of the block's data, or of
    nonce + tag + ciphertext when encrypted (see ``sut.storage.wire.blockhash``)."""

    hash: U64
    encryption_context: Annotated[EncryptionContext | None, bincode.OptionOf(ENCRYPTION_CONTEXT)] = None


BLOCK_CONTEXT = bincode.dataclass_codec(BlockContext)


@dataclass(frozen=True)
class ReadBlockEmpty:
    """The block was never written: its data reads as zeros."""


@dataclass(frozen=True)
class ReadBlockEncrypted:
    ctx: Annotated[EncryptionContext, ENCRYPTION_CONTEXT]


@dataclass(frozen=True)
class ReadBlockUnencrypted:
    hash: U64


ReadBlockContext = ReadBlockEmpty | ReadBlockEncrypted | ReadBlockUnencrypted
READ_BLOCK_CONTEXT = bincode.EnumOf(
    "ReadBlockContext",
    [
        bincode.dataclass_codec(ReadBlockEmpty, "Empty"),
        bincode.dataclass_codec(ReadBlockEncrypted, "Encrypted"),
        bincode.dataclass_codec(ReadBlockUnencrypted, "Unencrypted"),
    ],
)


# -- region ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtentSize:
    """Crucible's ``Block``: a count of blocks (``value``) and the block size as a power of two."""

    value: U64
    shift: U32


@dataclass(frozen=True)
class RegionDefinition:
    block_size: U64
    extent_size: Annotated[ExtentSize, bincode.dataclass_codec(ExtentSize)]
    extent_count: U32
    uuid: Uuid
    encrypted: Bool
    database_read_version: U64  # usize in Rust: 8 bytes on the wire
    database_write_version: U64


REGION_DEFINITION = bincode.dataclass_codec(RegionDefinition)


@dataclass(frozen=True)
class SnapshotDetails:
    snapshot_name: String


SNAPSHOT_DETAILS = bincode.dataclass_codec(SnapshotDetails)


# -- the headers of the messages with bulk data ----------------------------------------------------
@dataclass(frozen=True)
class WriteHeader:
    """Write / WriteUnwritten: the blocks from ``start`` on, one context per block."""

    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    dependencies: JobIds
    start: BlockIndex
    contexts: Annotated[tuple[BlockContext, ...], bincode.VecOf(BLOCK_CONTEXT)]


WRITE_HEADER = bincode.dataclass_codec(WriteHeader)


@dataclass(frozen=True)
class ReadResponseHeader:
    """``blocks``: one context per block read, or the CrucibleError the read failed with."""

    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    blocks: Annotated[
        tuple[ReadBlockContext, ...] | CrucibleError,
        bincode.ResultOf(bincode.VecOf(READ_BLOCK_CONTEXT), CRUCIBLE_ERROR, CrucibleError),
    ]


READ_RESPONSE_HEADER = bincode.dataclass_codec(ReadResponseHeader)
