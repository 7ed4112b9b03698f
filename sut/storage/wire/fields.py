"""The structs and enums Crucible's messages carry, and the wire type of every field.

A field's annotation names its Rust type: ``JobId`` is ``Annotated[int, bincode.U64]``, so
``bincode.dataclass_codec`` reads the wire layout straight from the dataclass. Sequences
decode to tuples; ``Result<T, CrucibleError>`` is the T value itself, or the CrucibleError.
"""

from __future__ import annotations

import struct
import sys
import uuid
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Generic, TypeVar, overload

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
    "PlainContexts",
    "PlainReadContexts",
    "ReadBlockContext",
    "ReadBlockEmpty",
    "ReadBlockEncrypted",
    "ReadBlockUnencrypted",
    "ReadResponseHeader",
    "RegionDefinition",
    "SnapshotDetails",
    "WriteHeader",
    "gather_hashes",
    "hash_array",
    "interleave_hashes",
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

_T = TypeVar("_T")
_LITTLE = sys.byteorder == "little"


def hash_array(raw: bytes | bytearray | memoryview) -> array[int]:
    """Little-endian u64s (as on the wire) as an array of ints."""
    out = array("Q")
    out.frombytes(raw)
    if not _LITTLE:
        out.byteswap()
    return out


def _le_bytes(hashes: array[int]) -> bytes:
    if _LITTLE:
        return hashes.tobytes()
    swapped = array("Q", hashes)
    swapped.byteswap()
    return swapped.tobytes()


def interleave_hashes(
    hashes: array[int], record: int, offsets: tuple[int, ...], base: bytes | None = None
) -> bytearray:
    """``len(hashes)`` records of ``record`` bytes with each hash (LE u64) at every offset in
    ``offsets``; the other bytes from ``base`` (one record, repeated) or zero. Eight strided
    slice copies per offset instead of a Python step per block."""
    n = len(hashes)
    out = bytearray(base * n) if base is not None else bytearray(record * n)
    raw = _le_bytes(hashes)
    for at in offsets:
        for k in range(8):
            out[at + k :: record] = raw[k::8]
    return out


def gather_hashes(chunk: bytes | bytearray | memoryview, n: int, record: int, at: int) -> array[int]:
    """The LE u64 at offset ``at`` of each of ``n`` records of ``record`` bytes."""
    raw = bytearray(8 * n)
    for k in range(8):
        raw[k::8] = chunk[at + k :: record]
    return hash_array(raw)


class _Hashes(Sequence[_T], Generic[_T]):
    """Many contexts that are each just a hash, held as one array: what most blocks are, and
    what a 1 MiB request of 512-byte blocks carries 2048 of. Equal to any sequence of the same
    contexts; the per-block objects are only made when someone iterates."""

    __slots__ = ("_wire", "hashes")

    def __init__(self, hashes: array[int] | Sequence[int]) -> None:
        self.hashes = hashes if isinstance(hashes, array) and hashes.typecode == "Q" else array("Q", hashes)
        self._wire: bytes | None = None

    def _make(self, h: int) -> _T:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.hashes)

    @overload
    def __getitem__(self, index: int) -> _T: ...
    @overload
    def __getitem__(self, index: slice) -> _Hashes[_T]: ...
    def __getitem__(self, index: int | slice) -> _T | _Hashes[_T]:
        if isinstance(index, slice):
            return type(self)(self.hashes[index])
        return self._make(self.hashes[index])

    def __iter__(self) -> Iterator[_T]:
        return map(self._make, self.hashes)

    def __eq__(self, other: object) -> bool:
        if type(other) is type(self):
            return self.hashes == other.hashes
        if isinstance(other, tuple | list | _Hashes):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.hashes)} blocks)"


class PlainContexts(_Hashes[BlockContext]):
    """The contexts of a Write to an unencrypted region (``BlockContext(hash)`` per block)."""

    __slots__ = ()

    def _make(self, h: int) -> BlockContext:
        return BlockContext(h)

    def wire(self) -> bytes:
        """The encoded contexts after the length: hash + Option tag 0, 9 bytes per block."""
        if self._wire is None:
            self._wire = bytes(interleave_hashes(self.hashes, 9, (0,)))
        return self._wire


class _BlockContexts(bincode.VecOf[BlockContext]):
    """``Vec<BlockContext>``, with a fast path for the common case of a Write's contexts: all
    unencrypted, 9 bytes each, packed and unpacked in bulk (a 1 MiB write of 512-byte blocks
    has 2048 of them). Same bytes as the generic path; mixed vectors take the generic path."""

    def __init__(self) -> None:
        super().__init__(BLOCK_CONTEXT)

    def encode(self, w: bincode.Writer, value: Sequence[BlockContext]) -> None:
        if type(value) is PlainContexts:
            w.u64(len(value))
            w.raw(value.wire())
            return
        n = len(value) if isinstance(value, tuple | list) else 0
        if n and all(type(c) is BlockContext and c.encryption_context is None for c in value):
            try:
                hashes = array("Q", [c.hash for c in value])
            except (OverflowError, TypeError):
                pass  # a hash out of range: the generic path names it
            else:
                w.u64(n)
                w.raw(interleave_hashes(hashes, 9, (0,)))  # the Option tags stay 0
                return
        super().encode(w, value)

    def _unencrypted(self, r: bincode.Reader) -> memoryview | None:
        """The contexts' bytes, consumed, if all are unencrypted; else None and nothing read."""
        start = r.pos
        n = r.count(self.item.min_size)
        chunk = r.peek(9 * n)
        if n and chunk is not None and bytes(chunk[8::9]) == bytes(n):
            return r.take(9 * n)
        r.pos = start
        return None

    def decode(self, r: bincode.Reader) -> Sequence[BlockContext]:  # type: ignore[override]
        chunk = self._unencrypted(r)
        if chunk is not None:
            return PlainContexts(gather_hashes(chunk, len(chunk) // 9, 9, 0))
        return super().decode(r)

    def skip(self, r: bincode.Reader) -> None:
        if self._unencrypted(r) is None:
            super().skip(r)


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
_UNENCRYPTED_TAG = struct.pack("<I", 2)  # ReadBlockContext::Unencrypted: index 2, then the hash
_UNENCRYPTED_BASE = _UNENCRYPTED_TAG + bytes(8)


class PlainReadContexts(_Hashes[ReadBlockUnencrypted]):
    """The contexts of a read of written blocks of an unencrypted region."""

    __slots__ = ()

    def _make(self, h: int) -> ReadBlockUnencrypted:
        return ReadBlockUnencrypted(h)

    def wire(self) -> bytes:
        """The encoded contexts after the length: u32 variant 2 + hash, 12 bytes per block."""
        if self._wire is None:
            self._wire = bytes(interleave_hashes(self.hashes, 12, (4,), _UNENCRYPTED_BASE))
        return self._wire


class _ReadBlockContexts(bincode.VecOf[ReadBlockContext]):
    """``Vec<ReadBlockContext>``, with a fast path for a read of written unencrypted blocks
    (12 bytes each, in bulk); any other mix takes the generic path. Same bytes either way."""

    def __init__(self) -> None:
        super().__init__(READ_BLOCK_CONTEXT)

    def encode(self, w: bincode.Writer, value: Sequence[ReadBlockContext]) -> None:
        if type(value) is PlainReadContexts:
            w.u64(len(value))
            w.raw(value.wire())
            return
        n = len(value) if isinstance(value, tuple | list) else 0
        if n and all(type(c) is ReadBlockUnencrypted for c in value):
            try:
                hashes = array("Q", [c.hash for c in value])  # type: ignore[union-attr]
            except (OverflowError, TypeError):
                pass
            else:
                w.u64(n)
                w.raw(interleave_hashes(hashes, 12, (4,), _UNENCRYPTED_BASE))
                return
        super().encode(w, value)

    def _unencrypted(self, r: bincode.Reader) -> memoryview | None:
        """The contexts' bytes, consumed, if all are Unencrypted; else None and nothing read."""
        start = r.pos
        n = r.count(self.item.min_size)
        chunk = r.peek(12 * n)
        if n and chunk is not None:
            zeros = bytes(n)
            tags = bytes(chunk[0::12]), bytes(chunk[1::12]), bytes(chunk[2::12]), bytes(chunk[3::12])
            if tags == (_UNENCRYPTED_TAG[:1] * n, zeros, zeros, zeros):
                return r.take(12 * n)
        r.pos = start
        return None

    def decode(self, r: bincode.Reader) -> Sequence[ReadBlockContext]:  # type: ignore[override]
        chunk = self._unencrypted(r)
        if chunk is not None:
            return PlainReadContexts(gather_hashes(chunk, len(chunk) // 12, 12, 4))
        return super().decode(r)

    def skip(self, r: bincode.Reader) -> None:
        if self._unencrypted(r) is None:
            super().skip(r)


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
    contexts: Annotated[Sequence[BlockContext], _BlockContexts()]


WRITE_HEADER = bincode.dataclass_codec(WriteHeader)


@dataclass(frozen=True)
class ReadResponseHeader:
    """``blocks``: one context per block read, or the CrucibleError the read failed with."""

    upstairs_id: Uuid
    session_id: Uuid
    job_id: JobId
    blocks: Annotated[
        Sequence[ReadBlockContext] | CrucibleError,
        bincode.ResultOf(_ReadBlockContexts(), CRUCIBLE_ERROR, CrucibleError),
    ]


READ_RESPONSE_HEADER = bincode.dataclass_codec(ReadResponseHeader)
