"""Block contexts held as one array of hashes (PlainContexts, PlainReadContexts) and the bulk
paths of the raw extent that use them: same bytes, same answers as the per-block objects."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sut.storage import bincode
from sut.storage.extent_raw import RawExtent, RawRegion
from sut.storage.wire import fields
from sut.storage.wire.blockhash import block_hash, block_hashes, unencrypted_contexts, verify_unencrypted
from sut.storage.wire.fields import (
    BlockContext,
    PlainContexts,
    PlainReadContexts,
    ReadBlockEmpty,
    ReadBlockUnencrypted,
)

BS = 512
HASHES = st.lists(st.integers(0, 2**64 - 1), max_size=40)


def _encode(codec: bincode.Codec[Any], value: object) -> bytes:
    w = bincode.Writer()
    codec.encode(w, value)
    return bytes(w.out)


@settings(max_examples=100, deadline=None, database=None)
@given(HASHES)
def test_plain_contexts_are_the_tuple_of_their_contexts(hashes: list[int]) -> None:
    packed = PlainContexts(hashes)
    objects = tuple(BlockContext(h) for h in hashes)
    assert packed == objects and objects == packed and list(packed) == list(objects)
    assert hash(packed) == hash(objects)
    assert len(packed) == len(hashes)
    assert packed[1:3] == objects[1:3] and type(packed[1:3]) is PlainContexts
    if hashes:
        assert packed[-1] == BlockContext(hashes[-1])
    codec = fields.WRITE_HEADER
    head = fields.WriteHeader(uuid.UUID(int=1), uuid.UUID(int=2), 1000, (999,), 7, packed)
    same = fields.WriteHeader(uuid.UUID(int=1), uuid.UUID(int=2), 1000, (999,), 7, objects)
    assert _encode(codec, head) == _encode(codec, same)
    decoded = codec.decode(bincode.Reader(_encode(codec, head)))
    assert decoded == same
    if hashes:
        assert type(decoded.contexts) is PlainContexts


@settings(max_examples=100, deadline=None, database=None)
@given(HASHES)
def test_plain_read_contexts_encode_like_their_objects(hashes: list[int]) -> None:
    packed = PlainReadContexts(hashes)
    objects = tuple(ReadBlockUnencrypted(h) for h in hashes)
    codec = fields.READ_RESPONSE_HEADER
    head = fields.ReadResponseHeader(uuid.UUID(int=1), uuid.UUID(int=2), 5, packed)
    same = fields.ReadResponseHeader(uuid.UUID(int=1), uuid.UUID(int=2), 5, objects)
    assert _encode(codec, head) == _encode(codec, same)
    decoded = codec.decode(bincode.Reader(_encode(codec, head)))
    assert decoded == same and decoded.blocks == packed


def test_a_mixed_read_decodes_block_by_block() -> None:
    mixed = (ReadBlockUnencrypted(5), ReadBlockEmpty(), ReadBlockUnencrypted(2**64 - 1))
    codec = fields.READ_RESPONSE_HEADER
    head = fields.ReadResponseHeader(uuid.UUID(int=1), uuid.UUID(int=2), 5, mixed)
    decoded = codec.decode(bincode.Reader(_encode(codec, head)))
    assert decoded.blocks == mixed and type(decoded.blocks) is tuple


def test_a_hash_out_of_range_is_named_not_packed() -> None:
    with pytest.raises(OverflowError):
        PlainContexts([2**64])
    bad = (BlockContext(1), BlockContext(2**64))
    head = fields.WriteHeader(uuid.UUID(int=1), uuid.UUID(int=2), 1000, (), 0, bad)
    with pytest.raises(bincode.BincodeError) as info:
        _encode(fields.WRITE_HEADER, head)
    assert "contexts[1]" in str(info.value)


def test_verify_finds_exactly_the_bad_blocks() -> None:
    data = bytearray(os.urandom(8 * BS))
    contexts = PlainReadContexts(block_hashes(data, BS))
    assert verify_unencrypted(contexts, data, BS) == []
    data[3 * BS] ^= 1
    data[7 * BS + 100] ^= 0x80
    assert verify_unencrypted(contexts, data, BS) == [3, 7]
    assert list(block_hashes(data[:BS], BS)) == [block_hash(data[:BS])]
    with pytest.raises(ValueError, match="whole number"):
        block_hashes(data[:100], BS)


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary(min_size=8, max_size=8), st.integers(0, 63), st.integers(0, 64), st.integers(0, 1))
def test_range_runs_and_flips_agree_with_the_per_block_walk(
    bitmap: bytes, start: int, count: int, flip: int
) -> None:
    count = min(count, 64 - start)
    ext = RawExtent(Path("/nonexistent"), 0, BS, 64, -1)
    ext.active_b[:] = bitmap
    assert ext._range_runs(start, count, flip) == ext._slot_runs(range(start, start + count), flip)
    expected = bytearray(bitmap)
    for b in range(start, start + count):
        expected[b >> 3] ^= 1 << (b & 7)
    ext._flip_range(start, count)
    assert ext.active_b == expected


def test_reads_over_written_and_unwritten_runs(tmp_path: Path) -> None:
    with RawRegion.create(
        tmp_path / "r", uuid.UUID(int=3), block_size=BS, extent_size=8, extent_count=3
    ) as region:
        data = os.urandom(6 * BS)
        region.write(5, data, unencrypted_contexts(data, BS))  # blocks 5..10: two extents
        got, ctx = region.read(5, 6)
        assert got == data and type(ctx) is PlainReadContexts
        assert list(ctx) == [ReadBlockUnencrypted(block_hash(data[i * BS : (i + 1) * BS])) for i in range(6)]
        got, ctx = region.read(3, 10)  # empty, written, empty
        assert got == bytes(2 * BS) + data + bytes(2 * BS)
        assert ctx[:2] == [ReadBlockEmpty()] * 2 and ctx[8:] == [ReadBlockEmpty()] * 2
        assert ctx[2:8] == [ReadBlockUnencrypted(block_hash(data[i * BS : (i + 1) * BS])) for i in range(6)]
        again = os.urandom(2 * BS)
        region.write(4, again, unencrypted_contexts(again, BS), only_unwritten=True)  # 4 only
        assert region.read(4, 2)[0] == again[:BS] + data[:BS]
