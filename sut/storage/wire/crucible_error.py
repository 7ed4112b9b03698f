"""``CrucibleError`` and ``NegotiationError``: the error values that travel inside messages.

These are data (a downstairs reports one in an ack), not Python exceptions. The variant
indices follow the declaration order in Crucible's ``common/src/lib.rs`` at the commit named
in ``sut.storage.wire``; a variant is added at the end there, so indices never move.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from sut.storage import bincode

__all__ = [
    "CRUCIBLE_ERROR",
    "ERROR_DETAIL",
    "NEGOTIATION_ERROR",
    "CrucibleError",
    "ErrorKind",
    "MissingContextSlot",
    "NegotiationEncryptionMismatch",
    "NegotiationError",
    "NegotiationGenerationNumberTooLow",
    "NegotiationGenerationZeroIsIllegal",
    "NegotiationIncompatibleVersion",
    "NegotiationOutOfOrder",
    "NegotiationReadOnlyMismatch",
    "NegotiationSessionIdMismatch",
    "NegotiationUpstairsIdMismatch",
]

U32 = Annotated[int, bincode.U32]
U64 = Annotated[int, bincode.U64]
Bool = Annotated[bool, bincode.BOOL]
Uuid = Annotated[uuid.UUID, bincode.UUID]


# -- NegotiationError (a CrucibleError detail): one class per variant ---------------------------
@dataclass(frozen=True)
class NegotiationOutOfOrder:
    pass


@dataclass(frozen=True)
class NegotiationGenerationZeroIsIllegal:
    pass


@dataclass(frozen=True)
class NegotiationGenerationNumberTooLow:
    requested: U64
    actual: U64


@dataclass(frozen=True)
class NegotiationIncompatibleVersion:
    expected: U32
    actual: U32


@dataclass(frozen=True)
class NegotiationEncryptionMismatch:
    expected: Bool
    actual: Bool


@dataclass(frozen=True)
class NegotiationReadOnlyMismatch:
    expected: Bool
    actual: Bool


@dataclass(frozen=True)
class NegotiationUpstairsIdMismatch:
    expected: Uuid
    actual: Uuid


@dataclass(frozen=True)
class NegotiationSessionIdMismatch:
    expected: Uuid
    actual: Uuid


NegotiationError = (
    NegotiationOutOfOrder
    | NegotiationGenerationZeroIsIllegal
    | NegotiationGenerationNumberTooLow
    | NegotiationIncompatibleVersion
    | NegotiationEncryptionMismatch
    | NegotiationReadOnlyMismatch
    | NegotiationUpstairsIdMismatch
    | NegotiationSessionIdMismatch
)

NEGOTIATION_ERROR = bincode.EnumOf(
    "NegotiationError",
    [
        bincode.dataclass_codec(cls, cls.__name__.removeprefix("Negotiation"))
        for cls in (
            NegotiationOutOfOrder,
            NegotiationGenerationZeroIsIllegal,
            NegotiationGenerationNumberTooLow,
            NegotiationIncompatibleVersion,
            NegotiationEncryptionMismatch,
            NegotiationReadOnlyMismatch,
            NegotiationUpstairsIdMismatch,
            NegotiationSessionIdMismatch,
        )
    ],
)


_NEGOTIATION_ERROR_TYPES: tuple[type, ...] = tuple(NEGOTIATION_ERROR.index)


@dataclass(frozen=True)
class MissingContextSlot:
    """The detail of ``ErrorKind.MissingContextSlot``."""

    block: U64
    extent: U32


MISSING_CONTEXT_SLOT = bincode.dataclass_codec(MissingContextSlot)


# -- CrucibleError -----------------------------------------------------------------------------
class ErrorKind(enum.IntEnum):
    """CrucibleError's variants; the value is the wire index."""

    GenericError = 0
    IoError = 1
    Unsupported = 2
    Disconnect = 3
    DataLockError = 4
    RwLockError = 5
    RecvDisconnected = 6
    SendError = 7
    OffsetUnaligned = 8
    DataLenUnaligned = 9
    BlockSizeMismatch = 10
    InvalidNumberOfBlocks = 11
    OffsetInvalid = 12
    UpstairsActivateInProgress = 13
    UpstairsDeactivating = 14
    UpstairsInactive = 15
    UuidMismatch = 16
    EncryptionError = 17
    DecryptionError = 18
    HashMismatch = 19
    LBARangeOverlap = 20
    SubvolumeSizeMismatch = 21
    SubvolumeTypeMismatch = 22
    CannotServeBlocks = 23
    CannotReceiveBlocks = 24
    SnapshotFailed = 25
    ModifyingReadOnlyRegion = 26
    InvalidExtent = 27
    RepairRequestError = 28
    RepairFilesInvalid = 29
    RepairStreamError = 30
    GenerationNumberInvalid = 31
    NoLongerActive = 32
    RegionAssembleError = 33
    PropertyNotAvailable = 34
    ReplaceRequestInvalid = 35
    MissingContextSlot = 36
    BadMetadata = 37
    BadContextSlot = 38
    MissingBlockContext = 39
    RegionIncompatible = 40
    NegotiationError = 41


_STRING_KINDS = {
    ErrorKind.GenericError,
    ErrorKind.IoError,
    ErrorKind.Unsupported,
    ErrorKind.RwLockError,
    ErrorKind.SendError,
    ErrorKind.InvalidNumberOfBlocks,
    ErrorKind.EncryptionError,
    ErrorKind.CannotServeBlocks,
    ErrorKind.CannotReceiveBlocks,
    ErrorKind.SnapshotFailed,
    ErrorKind.RepairRequestError,
    ErrorKind.RepairFilesInvalid,
    ErrorKind.RepairStreamError,
    ErrorKind.PropertyNotAvailable,
    ErrorKind.ReplaceRequestInvalid,
    ErrorKind.BadMetadata,
    ErrorKind.BadContextSlot,
    ErrorKind.RegionIncompatible,
}

ERROR_DETAIL: dict[ErrorKind, bincode.Codec[Any] | None] = {
    kind: (
        bincode.STRING
        if kind in _STRING_KINDS
        else MISSING_CONTEXT_SLOT
        if kind is ErrorKind.MissingContextSlot
        else NEGOTIATION_ERROR
        if kind is ErrorKind.NegotiationError
        else None
    )
    for kind in ErrorKind
}
"""What follows each variant's index on the wire: a String, a struct, a NegotiationError or nothing."""

Detail = str | MissingContextSlot | NegotiationError | None


@dataclass(frozen=True)
class CrucibleError:
    """One ``CrucibleError``: its variant and the variant's payload (``detail``).

    ``detail`` is a str for the String variants (``IoError("...")``), a MissingContextSlot, a
    NegotiationError variant, or None for the variants without fields.
    """

    kind: ErrorKind
    detail: Detail = None

    def __post_init__(self) -> None:
        codec = ERROR_DETAIL[ErrorKind(self.kind)]
        expected: type | tuple[type, ...] = (
            type(None)
            if codec is None
            else str
            if codec is bincode.STRING
            else MissingContextSlot
            if codec is MISSING_CONTEXT_SLOT
            else _NEGOTIATION_ERROR_TYPES
        )
        if not isinstance(self.detail, expected):
            name = ErrorKind(self.kind).name
            raise TypeError(f"CrucibleError {name}: detail {self.detail!r} has the wrong type")

    def __str__(self) -> str:
        name = ErrorKind(self.kind).name
        return name if self.detail is None else f"{name}({self.detail})"


class _CrucibleErrorCodec(bincode.Codec[CrucibleError]):
    min_size = 4

    def encode(self, w: bincode.Writer, value: CrucibleError) -> None:
        if not isinstance(value, CrucibleError):
            raise bincode.BincodeError(f"cannot encode: {value!r} is not a CrucibleError", offset=len(w.out))
        w.u32(value.kind)
        codec = ERROR_DETAIL[ErrorKind(value.kind)]
        if codec is not None:
            codec.encode(w, value.detail)

    def decode(self, r: bincode.Reader) -> CrucibleError:
        kind = ErrorKind(r.tag(len(ErrorKind), "CrucibleError"))
        codec = ERROR_DETAIL[kind]
        if codec is None:
            return CrucibleError(kind)
        r.push(kind.name)
        detail = codec.decode(r)
        r.pop()
        return CrucibleError(kind, detail)


CRUCIBLE_ERROR: bincode.Codec[CrucibleError] = _CrucibleErrorCodec()
