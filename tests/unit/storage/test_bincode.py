"""bincode 1 (fixint, little-endian): exact bytes of every type, and a reader that never trusts a count."""

from __future__ import annotations

import contextlib
import ipaddress
import struct
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sut.storage import bincode
from sut.storage.bincode import BincodeError, Reader, SocketAddr, Writer
from sut.storage.errors import ProtocolError

ID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")


def enc(codec: bincode.Codec[Any], value: Any) -> bytes:
    w = Writer()
    codec.encode(w, value)
    return bytes(w.out)


def dec(codec: bincode.Codec[Any], data: bytes) -> Any:
    r = Reader(data)
    value = codec.decode(r)
    assert r.at_end(), f"{r.remaining} bytes left"
    return value


@dataclass(frozen=True)
class Pair:
    a: Annotated[int, bincode.U32]
    b: Annotated[tuple[int, ...], bincode.VecOf(bincode.U64)]


@dataclass(frozen=True)
class Other:
    flag: Annotated[bool, bincode.BOOL]


PAIR = bincode.dataclass_codec(Pair)
ENUM = bincode.EnumOf("Thing", [PAIR, bincode.dataclass_codec(Other)])

CASES: list[tuple[str, bincode.Codec[Any], Any, str]] = [
    ("u8", bincode.U8, 0xAB, "ab"),
    ("u16", bincode.U16, 0x1234, "3412"),
    ("u32", bincode.U32, 13, "0d000000"),
    ("u64", bincode.U64, 1000, "e803000000000000"),
    ("u64-max", bincode.U64, 2**64 - 1, "ffffffffffffffff"),
    ("bool-false", bincode.BOOL, False, "00"),
    ("bool-true", bincode.BOOL, True, "01"),
    ("unit", bincode.UNIT, None, ""),
    ("string", bincode.STRING, "h\u00e9", "0300000000000000" + "68c3a9"),
    ("string-empty", bincode.STRING, "", "0000000000000000"),
    ("bytes", bincode.BYTES, b"\x01\x02", "0200000000000000" + "0102"),
    ("uuid", bincode.UUID, ID, "1000000000000000" + "00112233445566778899aabbccddeeff"),
    ("array-4", bincode.FixedBytes(4), b"abcd", "61626364"),
    ("vec-u32", bincode.VecOf(bincode.U32), (8, 9), "0200000000000000" + "08000000" + "09000000"),
    ("vec-bool", bincode.VecOf(bincode.BOOL), (True, False), "0200000000000000" + "0100"),
    ("vec-empty", bincode.VecOf(bincode.U64), (), "0000000000000000"),
    ("vec-of-str", bincode.VecOf(bincode.STRING), ("a",), "0100000000000000" + "0100000000000000" + "61"),
    ("option-none", bincode.OptionOf(bincode.U32), None, "00"),
    ("option-some", bincode.OptionOf(bincode.U32), 5, "01" + "05000000"),
    ("result-ok-unit", bincode.ResultOf(bincode.UNIT, bincode.STRING, str), None, "00000000"),
    (
        "result-err",
        bincode.ResultOf(bincode.UNIT, bincode.STRING, str),
        "no",
        "01000000" + "0200000000000000" + "6e6f",
    ),
    (
        "tuple",
        bincode.TupleOf(bincode.U64, bincode.U64, bincode.BOOL),
        (1, 2, True),
        "01" + "00" * 7 + "02" + "00" * 7 + "01",
    ),
    (
        "socketaddr-v4",
        bincode.SocketAddrCodec(),
        SocketAddr.parse("127.0.0.1", 123),
        "00000000" + "7f000001" + "7b00",
    ),
    (
        "socketaddr-v6",
        bincode.SocketAddrCodec(),
        SocketAddr.parse("::1", 456),
        "01000000" + "00" * 15 + "01" + "c801",
    ),
    ("struct", PAIR, Pair(7, (1,)), "07000000" + "0100000000000000" + "0100000000000000"),
    ("enum-0", ENUM, Pair(7, ()), "00000000" + "07000000" + "0000000000000000"),
    ("enum-1", ENUM, Other(True), "01000000" + "01"),
]


@pytest.mark.parametrize(("name", "codec", "value", "hex_"), CASES, ids=[c[0] for c in CASES])
def test_exact_bytes_both_ways(name: str, codec: bincode.Codec[Any], value: Any, hex_: str) -> None:
    assert enc(codec, value).hex() == hex_
    assert dec(codec, bytes.fromhex(hex_)) == value
    assert codec.min_size <= len(bytes.fromhex(hex_))


@pytest.mark.parametrize(("name", "codec", "value", "hex_"), CASES, ids=[c[0] for c in CASES])
def test_every_truncation_is_a_truncated_error(
    name: str, codec: bincode.Codec[Any], value: Any, hex_: str
) -> None:
    data = bytes.fromhex(hex_)
    for cut in range(len(data)):
        with pytest.raises(BincodeError) as info:
            codec.decode(Reader(data[:cut]))
        assert isinstance(info.value, ProtocolError)


def test_socket_addr_text() -> None:
    assert str(SocketAddr.parse("127.0.0.1", 80)) == "127.0.0.1:80"
    assert str(SocketAddr.parse("::1", 80)) == "[::1]:80"
    assert SocketAddr.parse("::1", 1).ip == ipaddress.IPv6Address("::1")


# -- the bounded reader ------------------------------------------------------------------------
def test_a_count_is_checked_against_the_bytes_left_before_anything_is_allocated() -> None:
    data = struct.pack("<Q", 1 << 60) + bytes(92)  # a 100-byte input claiming 2**60 u64s
    with pytest.raises(BincodeError, match="count 1152921504606846976 needs at least") as info:
        bincode.VecOf(bincode.U64).decode(Reader(data))
    assert info.value.offset == 0 and not info.value.truncated
    # the bound is the smallest item: 12 u64s cannot be in 92 bytes, 11 can
    with pytest.raises(BincodeError):
        bincode.VecOf(bincode.U64).decode(Reader(struct.pack("<Q", 12) + bytes(92)))
    assert bincode.VecOf(bincode.U64).decode(Reader(struct.pack("<Q", 11) + bytes(88))) == (0,) * 11
    for codec in (bincode.BYTES, bincode.STRING, bincode.VecOf(bincode.STRING), bincode.VecOf(PAIR)):
        with pytest.raises(BincodeError, match="needs at least"):
            codec.decode(Reader(struct.pack("<Q", 2**64 - 1) + bytes(8)))


def test_a_prefix_still_arriving_is_truncated_but_counts_use_the_final_length() -> None:
    full = enc(bincode.VecOf(bincode.U64), (1, 2, 3))
    r = Reader(full[:20], limit=len(full))
    with pytest.raises(BincodeError) as info:
        bincode.VecOf(bincode.U64).decode(r)
    assert info.value.truncated  # more bytes would help
    evil = struct.pack("<Q", 1000) + bytes(12)
    with pytest.raises(BincodeError) as info:
        bincode.VecOf(bincode.U64).decode(Reader(evil, limit=100))
    assert not info.value.truncated  # 1000 items can never fit in 100 bytes


@pytest.mark.parametrize(
    ("codec", "data", "problem"),
    [
        (bincode.BOOL, b"\x02", "bool must be 0 or 1, got 2"),
        (bincode.BOOL, b"\xff", "bool must be 0 or 1, got 255"),
        (bincode.OptionOf(bincode.U8), b"\x02\x00", "Option tag must be 0 or 1, got 2"),
        (bincode.ResultOf(bincode.UNIT, bincode.STRING, str), b"\x02\x00\x00\x00", "Result index 2"),
        (bincode.SocketAddrCodec(), struct.pack("<I", 2) + bytes(18), "SocketAddr index 2"),
        (ENUM, struct.pack("<I", 2), "Thing index 2 is not one of the 2 variants"),
        (bincode.UUID, struct.pack("<Q", 17) + bytes(17), "a UUID is 16 bytes, not 17"),
        (bincode.STRING, struct.pack("<Q", 1) + b"\x80", "not UTF-8"),
    ],
)
def test_invalid_values_are_errors(codec: bincode.Codec[Any], data: bytes, problem: str) -> None:
    with pytest.raises(BincodeError, match=problem):
        codec.decode(Reader(data))


def test_errors_name_the_message_the_field_path_and_the_offset() -> None:
    data = struct.pack("<II", 0, 7) + struct.pack("<QQ", 2, 5)  # Pair.b claims 2 items, has 1
    with pytest.raises(BincodeError) as info:
        ENUM.decode(Reader(data, base=4))
    err = info.value
    assert (err.field, err.offset) == ("Pair.b", 4 + 8)
    outer = bincode.EnumOf("Message", [PAIR], is_message=True)
    with pytest.raises(BincodeError) as info:
        outer.decode(Reader(struct.pack("<IIQ", 0, 7, 1) + b"\x01", base=4))
    assert (info.value.message, info.value.field, info.value.offset) == ("Pair", "b", 4 + 8)
    assert str(info.value).startswith("Pair.b at offset 12: ")
    vec = bincode.VecOf(ENUM)
    with pytest.raises(BincodeError) as info:
        vec.decode(Reader(struct.pack("<QIB", 1, 1, 7)))
    assert info.value.field == "[0].Other.flag"


def test_encoding_checks_values_against_their_types() -> None:
    for codec, value in [
        (bincode.U32, 2**32),
        (bincode.U8, -1),
        (bincode.U64, True),
        (bincode.U64, 1.0),
        (bincode.BOOL, 1),
        (bincode.STRING, b"x"),
        (bincode.BYTES, "x"),
        (bincode.UUID, str(ID)),
        (bincode.FixedBytes(4), b"abc"),
        (bincode.VecOf(bincode.U8), "abc"),
        (bincode.VecOf(bincode.U8), (256,)),
        (bincode.UNIT, 0),
        (bincode.TupleOf(bincode.U8), (1, 2)),
        (bincode.SocketAddrCodec(), SocketAddr.parse("127.0.0.1", 70000)),
        (ENUM, "not a variant"),
    ]:
        with pytest.raises(BincodeError, match="cannot encode"):
            enc(codec, value)
    with pytest.raises(BincodeError, match=r"cannot encode") as info:
        enc(ENUM, Pair(1, (2**64,)))
    assert info.value.field == "Pair.b[0]"


def test_codec_construction_rules() -> None:
    with pytest.raises(ValueError):
        bincode.VecOf(bincode.UNIT)  # unbounded: a count of 2**64 zero-size items fits in 0 bytes

    @dataclass(frozen=True)
    class Unannotated:
        x: int

    with pytest.raises(TypeError, match=r"Unannotated\.x"):
        bincode.dataclass_codec(Unannotated)


@settings(max_examples=200, deadline=None, database=None)
@given(values=st.lists(st.integers(0, 2**64 - 1), max_size=50), extra=st.binary(max_size=20))
def test_vec_u64_round_trips_and_leaves_what_follows(values: list[int], extra: bytes) -> None:
    data = enc(bincode.VecOf(bincode.U64), values) + extra
    r = Reader(data)
    assert bincode.VecOf(bincode.U64).decode(r) == tuple(values)
    assert r.remaining == len(extra)


@settings(max_examples=300, deadline=None, database=None)
@given(raw=st.binary(max_size=64))
def test_any_bytes_decode_or_raise_the_package_error(raw: bytes) -> None:
    for codec in (
        ENUM,
        bincode.VecOf(bincode.STRING),
        bincode.OptionOf(bincode.UUID),
        bincode.SocketAddrCodec(),
    ):
        with contextlib.suppress(BincodeError):
            codec.decode(Reader(raw))
