"""bincode 1.x with fixed-width little-endian integers: a writer, a BOUNDED reader and codecs.

This is the serialisation under Crucible's wire protocol (see ``sut.storage.wire``). Rust
types map to bytes as follows (u32 enum tags, u64 lengths):

=====================  ======================================================================
Rust type              bytes
=====================  ======================================================================
u8 / u16 / u32 / u64   1 / 2 / 4 / 8 bytes little-endian (usize is u64)
bool                   u8 0 or 1; anything else is an error
Vec<T>, String, Bytes  u64 count, then the items (String: UTF-8, strictly checked)
Option<T>              u8 0, or u8 1 then T
Result<T, E>           u32 0 then T, or u32 1 then E
enum                   u32 variant index (declaration order), then the variant's fields
struct, tuple          the fields in declaration order, nothing else
[u8; N]                N raw bytes
Uuid                   u64 16, then the 16 bytes in RFC 4122 order
SocketAddr             u32 0 + 4 address bytes + u16 port, or u32 1 + 16 bytes + u16 port
=====================  ======================================================================

The reader never trusts a count: before a Vec/String/Bytes is allocated, its count times the
smallest encoding of one item must fit in the bytes actually left, so a Vec<u64> claiming
2**60 items in a 100-byte frame is a :class:`BincodeError`, not a MemoryError. Every failure
(short input, bad count, enum index, bool, option tag, UTF-8, UUID length) is a
:class:`BincodeError` that names the message, the field path and the byte offset.

A :class:`Codec` describes one Rust type; codecs compose (``VecOf(U64)``,
``OptionOf(StructOf(...))``) and expose their parts, so tests can derive value generators
from them. Stdlib only: the downstairs container image imports this module.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
import typing
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from sut.storage.errors import ProtocolError

__all__ = [
    "BOOL",
    "BYTES",
    "STRING",
    "U8",
    "U16",
    "U32",
    "U64",
    "UNIT",
    "UUID",
    "BincodeError",
    "Codec",
    "EnumOf",
    "FixedBytes",
    "Int",
    "OptionOf",
    "Reader",
    "ResultOf",
    "SocketAddr",
    "SocketAddrCodec",
    "StructOf",
    "TupleOf",
    "VecOf",
    "Writer",
    "dataclass_codec",
]

T = TypeVar("T")

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class BincodeError(ProtocolError):
    """A value could not be read from (or written to) bincode.

    ``message`` is the outermost enum variant being decoded (the Crucible message, if any),
    ``field`` the dotted path to the failing field, ``offset`` the byte offset in the frame.
    ``truncated`` is True when more input would have let decoding go on (used by frame
    splitters that see a frame before all of it has arrived).
    """

    def __init__(
        self, problem: str, *, message: str = "", field: str = "", offset: int = 0, truncated: bool = False
    ) -> None:
        where = _join(message, field) or "value"
        super().__init__(f"{where} at offset {offset}: {problem}")
        self.problem = problem
        self.message = message
        self.field = field
        self.offset = offset
        self.truncated = truncated


@dataclasses.dataclass(frozen=True)
class SocketAddr:
    """Rust's ``std::net::SocketAddr`` (V6 flow info and scope id are not on the wire)."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    @classmethod
    def parse(cls, host: str, port: int) -> SocketAddr:
        return cls(ipaddress.ip_address(host), port)

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


# -- reader / writer -------------------------------------------------------------------------
class Reader:
    """Reads bincode from ``data`` (bytes-like), checking every length against what is left.

    ``base`` is added to offsets in errors (e.g. 4 when ``data`` starts after a frame's length
    prefix). ``limit`` is the length the input will have once complete; when it exceeds
    ``len(data)`` the input is a prefix still arriving: running out of it raises an error with
    ``truncated=True``, while counts are checked against ``limit``.
    """

    def __init__(
        self, data: bytes | bytearray | memoryview, *, base: int = 0, limit: int | None = None
    ) -> None:
        self._view = memoryview(data).cast("B")
        self.pos = 0
        self._end = len(self._view)
        self._limit = self._end if limit is None else max(limit, self._end)
        self._base = base
        self._path: list[str] = []
        self.message = ""

    # -- context for errors
    def push(self, name: str) -> None:
        self._path.append(name)

    def pop(self) -> None:
        self._path.pop()

    def error(self, problem: str, *, at: int | None = None, truncated: bool = False) -> BincodeError:
        offset = self._base + (self.pos if at is None else at)
        return BincodeError(
            problem, message=self.message, field=_join(*self._path), offset=offset, truncated=truncated
        )

    @property
    def remaining(self) -> int:
        """Bytes left before the end of the complete input (``limit``)."""
        return self._limit - self.pos

    def at_end(self) -> bool:
        return self.pos == self._limit

    def peek(self, n: int) -> memoryview | None:
        """The next ``n`` bytes without consuming them; None if fewer have arrived."""
        if n > self._end - self.pos:
            return None
        return self._view[self.pos : self.pos + n]

    def take(self, n: int) -> memoryview:
        if n > self._end - self.pos:
            soft = n <= self._limit - self.pos
            raise self.error(f"needs {n} bytes, {self._end - self.pos} left", truncated=soft)
        start = self.pos
        self.pos += n
        return self._view[start : self.pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = _U16.unpack(self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = _U32.unpack(self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = _U64.unpack(self.take(8))[0]
        return value

    def bool(self) -> bool:
        at = self.pos
        value = self.u8()
        if value > 1:
            raise self.error(f"bool must be 0 or 1, got {value}", at=at)
        return value == 1

    def count(self, min_item_bytes: int) -> int:
        """A u64 count of items that each take at least ``min_item_bytes`` bytes."""
        at = self.pos
        n = self.u64()
        if n * min_item_bytes > self.remaining:
            raise self.error(
                f"count {n} needs at least {n * min_item_bytes} bytes, {self.remaining} left", at=at
            )
        return n

    def tag(self, variants: int, what: str) -> int:
        at = self.pos
        index = self.u32()
        if index >= variants:
            raise self.error(f"{what} index {index} is not one of the {variants} variants", at=at)
        return index


class Writer:
    """Accumulates bincode in one bytearray."""

    def __init__(self) -> None:
        self.out = bytearray()

    def raw(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def u8(self, value: int) -> None:
        self.out.append(value)

    def u16(self, value: int) -> None:
        self.out += _U16.pack(value)

    def u32(self, value: int) -> None:
        self.out += _U32.pack(value)

    def u64(self, value: int) -> None:
        self.out += _U64.pack(value)


def _encode_error(problem: str, field: str, w: Writer) -> BincodeError:
    return BincodeError(f"cannot encode: {problem}", field=field, offset=len(w.out))


# -- codecs ----------------------------------------------------------------------------------
class Codec(ABC, Generic[T]):
    """One Rust type: how a Python value of it is written and read."""

    min_size: int
    """Bytes of the smallest encoding; bounds the counts a reader accepts."""

    @abstractmethod
    def encode(self, w: Writer, value: T) -> None: ...

    @abstractmethod
    def decode(self, r: Reader) -> T: ...

    def skip(self, r: Reader) -> None:
        """Move past one value, checking its structure (counts, tags) but not building it.

        Frame splitters use this to find where a head ends; the default decodes and drops.
        """
        self.decode(r)


class Int(Codec[int]):
    """An unsigned little-endian integer of ``size`` bytes."""

    def __init__(self, size: int, name: str) -> None:
        self.min_size = size
        self.name = name
        self.max = (1 << (8 * size)) - 1
        self.format_char = {1: "B", 2: "H", 4: "I", 8: "Q"}[size]
        self._struct = struct.Struct("<" + self.format_char)

    def encode(self, w: Writer, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= self.max:
            raise _encode_error(f"{value!r} is not a {self.name}", "", w)
        w.out += self._struct.pack(value)

    def decode(self, r: Reader) -> int:
        value: int = self._struct.unpack(r.take(self.min_size))[0]
        return value

    def skip(self, r: Reader) -> None:
        r.take(self.min_size)

    def __repr__(self) -> str:
        return self.name


class _Bool(Codec[bool]):
    min_size = 1

    def encode(self, w: Writer, value: bool) -> None:
        if not isinstance(value, bool):
            raise _encode_error(f"{value!r} is not a bool", "", w)
        w.u8(int(value))

    def decode(self, r: Reader) -> bool:
        return r.bool()


class _Unit(Codec[None]):
    """``()``: no bytes; its Python value is None."""

    min_size = 0

    def encode(self, w: Writer, value: None) -> None:
        if value is not None:
            raise _encode_error(f"{value!r} is not ()", "", w)

    def decode(self, r: Reader) -> None:
        return None


class _Bytes(Codec[bytes]):
    """Vec<u8> / bytes::Bytes: u64 count + raw bytes. Decodes to a copy (bytes)."""

    min_size = 8

    def encode(self, w: Writer, value: bytes) -> None:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise _encode_error(f"{type(value).__name__} is not bytes", "", w)
        w.u64(len(value))
        w.raw(value)

    def decode(self, r: Reader) -> bytes:
        return bytes(r.take(r.count(1)))


class _String(Codec[str]):
    min_size = 8

    def encode(self, w: Writer, value: str) -> None:
        if not isinstance(value, str):
            raise _encode_error(f"{value!r} is not a str", "", w)
        data = value.encode("utf-8")  # lone surrogates raise here, as they have no UTF-8 form
        w.u64(len(data))
        w.raw(data)

    def decode(self, r: Reader) -> str:
        at = r.pos
        data = r.take(r.count(1))
        try:
            return str(data, "utf-8")
        except UnicodeDecodeError as exc:
            raise r.error(f"string is not UTF-8 ({exc.reason} at byte {exc.start})", at=at) from None


class _Uuid(Codec[uuid.UUID]):
    min_size = 24

    def encode(self, w: Writer, value: uuid.UUID) -> None:
        if not isinstance(value, uuid.UUID):
            raise _encode_error(f"{value!r} is not a UUID", "", w)
        w.u64(16)
        w.raw(value.bytes)

    def decode(self, r: Reader) -> uuid.UUID:
        at = r.pos
        n = r.u64()
        if n != 16:
            raise r.error(f"a UUID is 16 bytes, not {n}", at=at)
        return uuid.UUID(bytes=bytes(r.take(16)))


class FixedBytes(Codec[bytes]):
    """``[u8; N]``: N raw bytes, no length."""

    def __init__(self, size: int) -> None:
        self.min_size = size

    def encode(self, w: Writer, value: bytes) -> None:
        if not isinstance(value, bytes | bytearray) or len(value) != self.min_size:
            raise _encode_error(f"{value!r} is not {self.min_size} bytes", "", w)
        w.raw(value)

    def decode(self, r: Reader) -> bytes:
        return bytes(r.take(self.min_size))

    def skip(self, r: Reader) -> None:
        r.take(self.min_size)

    def __repr__(self) -> str:
        return f"[u8; {self.min_size}]"


class SocketAddrCodec(Codec[SocketAddr]):
    min_size = 4 + 4 + 2

    def encode(self, w: Writer, value: SocketAddr) -> None:
        if not isinstance(value, SocketAddr) or not 0 <= value.port <= 0xFFFF:
            raise _encode_error(f"{value!r} is not a SocketAddr", "", w)
        w.u32(0 if value.ip.version == 4 else 1)
        w.raw(value.ip.packed)
        w.u16(value.port)

    def decode(self, r: Reader) -> SocketAddr:
        kind = r.tag(2, "SocketAddr")
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address
        if kind == 0:
            ip = ipaddress.IPv4Address(bytes(r.take(4)))
        else:
            ip = ipaddress.IPv6Address(bytes(r.take(16)))
        return SocketAddr(ip, r.u16())


class VecOf(Codec[tuple[T, ...]]):
    """``Vec<T>``: u64 count + items. Decodes to a tuple (values stay immutable)."""

    min_size = 8

    def __init__(self, item: Codec[T]) -> None:
        if item.min_size == 0:
            raise ValueError("a Vec of zero-sized items has no bounded decoding")
        self.item = item

    def encode(self, w: Writer, value: Sequence[T]) -> None:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise _encode_error(f"{type(value).__name__} is not a sequence", "", w)
        w.u64(len(value))
        item = self.item
        if isinstance(item, Int) and all(type(v) is int for v in value):
            try:  # one pack for the whole vector; range errors fall back to the checked path
                w.out += struct.pack(f"<{len(value)}{item.format_char}", *value)
                return
            except struct.error:
                pass
        for i, v in enumerate(value):
            try:
                item.encode(w, v)
            except BincodeError as exc:
                raise BincodeError(
                    exc.problem, message=exc.message, field=_join(f"[{i}]", exc.field), offset=exc.offset
                ) from None

    def decode(self, r: Reader) -> tuple[T, ...]:
        n = r.count(self.item.min_size)
        item = self.item
        if isinstance(item, Int):
            fmt = f"<{n}{item.format_char}"
            return tuple(struct.unpack(fmt, r.take(n * item.min_size)))
        out = []
        for i in range(n):
            r.push(f"[{i}]")
            out.append(item.decode(r))
            r.pop()
        return tuple(out)

    def skip(self, r: Reader) -> None:
        n = r.count(self.item.min_size)
        if isinstance(self.item, Int):
            r.take(n * self.item.min_size)
            return
        for i in range(n):
            r.push(f"[{i}]")
            self.item.skip(r)
            r.pop()


class OptionOf(Codec[T | None]):
    """``Option<T>``: None, or the value."""

    min_size = 1

    def __init__(self, item: Codec[T]) -> None:
        self.item = item

    def encode(self, w: Writer, value: T | None) -> None:
        if value is None:
            w.u8(0)
        else:
            w.u8(1)
            self.item.encode(w, value)

    def decode(self, r: Reader) -> T | None:
        at = r.pos
        present = r.u8()
        if present == 0:
            return None
        if present != 1:
            raise r.error(f"Option tag must be 0 or 1, got {present}", at=at)
        return self.item.decode(r)

    def skip(self, r: Reader) -> None:
        at = r.pos
        present = r.u8()
        if present > 1:
            raise r.error(f"Option tag must be 0 or 1, got {present}", at=at)
        if present:
            self.item.skip(r)


E = TypeVar("E")


class ResultOf(Codec[Any]):
    """``Result<T, E>``: Ok(value) is the value itself, Err(e) is the ``err_type`` instance e.

    The two are told apart by type, so ``T`` must never be ``err_type``.
    """

    def __init__(self, ok: Codec[Any], err: Codec[Any], err_type: type) -> None:
        self.ok = ok
        self.err = err
        self.err_type = err_type
        self.min_size = 4 + min(ok.min_size, err.min_size)

    def encode(self, w: Writer, value: Any) -> None:
        if isinstance(value, self.err_type):
            w.u32(1)
            self.err.encode(w, value)
        else:
            w.u32(0)
            self.ok.encode(w, value)

    def decode(self, r: Reader) -> Any:
        if r.tag(2, "Result") == 0:
            return self.ok.decode(r)
        r.push("Err")
        value = self.err.decode(r)
        r.pop()
        return value

    def skip(self, r: Reader) -> None:
        (self.ok if r.tag(2, "Result") == 0 else self.err).skip(r)


class TupleOf(Codec[tuple[Any, ...]]):
    """A Rust tuple ``(A, B, ...)``: the items back to back."""

    def __init__(self, *items: Codec[Any]) -> None:
        self.items = items
        self.min_size = sum(i.min_size for i in items)

    def encode(self, w: Writer, value: tuple[Any, ...]) -> None:
        if not isinstance(value, tuple) or len(value) != len(self.items):
            raise _encode_error(f"{value!r} is not a {len(self.items)}-tuple", "", w)
        for codec, v in zip(self.items, value, strict=True):
            codec.encode(w, v)

    def decode(self, r: Reader) -> tuple[Any, ...]:
        return tuple(codec.decode(r) for codec in self.items)


class StructOf(Codec[T]):
    """A struct (or enum variant body): ``fields`` in declaration order, built with ``cls(**kw)``."""

    def __init__(self, cls: type[T], fields: Sequence[tuple[str, Codec[Any]]], name: str) -> None:
        self.cls = cls
        self.fields = tuple(fields)
        self.name = name
        self.min_size = sum(codec.min_size for _, codec in self.fields)

    def encode(self, w: Writer, value: T) -> None:
        for name, codec in self.fields:
            try:
                codec.encode(w, getattr(value, name))
            except BincodeError as exc:
                raise BincodeError(
                    exc.problem, message=exc.message, field=_join(name, exc.field), offset=exc.offset
                ) from None
            except AttributeError:
                raise _encode_error(f"{type(value).__name__} has no field {name!r}", self.name, w) from None

    def decode(self, r: Reader) -> T:
        values: dict[str, Any] = {}
        for name, codec in self.fields:
            r.push(name)
            values[name] = codec.decode(r)
            r.pop()
        return self.cls(**values)

    def skip(self, r: Reader) -> None:
        for name, codec in self.fields:
            r.push(name)
            codec.skip(r)
            r.pop()


class EnumOf(Codec[Any]):
    """A Rust enum whose variants are Python classes; the u32 index is the position in ``variants``.

    ``variants`` holds one codec per variant (a :class:`StructOf`, or any codec whose values are
    instances of a class of their own); the index of a value is found by its exact type.
    """

    def __init__(self, name: str, variants: Sequence[StructOf[Any]], *, is_message: bool = False) -> None:
        self.name = name
        self.variants = tuple(variants)
        self.index: dict[type, int] = {v.cls: i for i, v in enumerate(self.variants)}
        self.is_message = is_message
        self.min_size = 4 + min(v.min_size for v in self.variants)

    def encode(self, w: Writer, value: Any) -> None:
        index = self.index.get(type(value))
        if index is None:
            raise _encode_error(f"{type(value).__name__} is not a {self.name} variant", "", w)
        w.u32(index)
        variant = self.variants[index]
        try:
            variant.encode(w, value)
        except BincodeError as exc:
            if self.is_message:
                raise BincodeError(
                    exc.problem, message=variant.name, field=exc.field, offset=exc.offset
                ) from None
            raise BincodeError(
                exc.problem, message=exc.message, field=_join(variant.name, exc.field), offset=exc.offset
            ) from None

    def decode(self, r: Reader) -> Any:
        index = r.tag(len(self.variants), self.name)
        variant = self.variants[index]
        if self.is_message:
            r.message = variant.name
            return variant.decode(r)
        r.push(variant.name)
        value = variant.decode(r)
        r.pop()
        return value


def dataclass_codec(cls: type[T], name: str | None = None) -> StructOf[T]:
    """The :class:`StructOf` of a dataclass whose fields are annotated with their codecs.

    Each field's annotation is ``Annotated[python_type, codec]`` (usually through an alias such
    as ``U64 = Annotated[int, bincode.U64]``); the fields' order is the wire order.
    """
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = []
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        codecs = [m for m in getattr(hints[field.name], "__metadata__", ()) if isinstance(m, Codec)]
        if len(codecs) != 1:
            raise TypeError(f"{cls.__name__}.{field.name} must be annotated with exactly one Codec")
        fields.append((field.name, codecs[0]))
    return StructOf(cls, fields, name or cls.__name__)


def _join(*parts: str) -> str:
    """A field path: names joined by dots, vector indices attached (``contexts[3].hash``)."""
    out = ""
    for part in parts:
        if part:
            out += part if not out or part.startswith("[") else "." + part
    return out


U8 = Int(1, "u8")
U16 = Int(2, "u16")
U32 = Int(4, "u32")
U64 = Int(8, "u64")
BOOL: Codec[bool] = _Bool()
UNIT: Codec[None] = _Unit()
BYTES: Codec[bytes] = _Bytes()
STRING: Codec[str] = _String()
UUID: Codec[uuid.UUID] = _Uuid()
