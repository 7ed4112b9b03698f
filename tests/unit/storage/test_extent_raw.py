"""Crucible's raw extent format (sut.storage.extent_raw): layout, slots, flush, recovery."""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

import pytest

from sut.storage.extent_raw import (
    CONTEXT_SLOT_BYTES,
    META_BYTES,
    ExtentFailure,
    RawExtent,
    RawRegion,
    extent_path,
)
from sut.storage.wire import (
    BlockContext,
    EncryptionContext,
    ErrorKind,
    ReadBlockEmpty,
    ReadBlockEncrypted,
    ReadBlockUnencrypted,
)
from sut.storage.wire.blockhash import block_hash, encrypted_block_hash, unencrypted_contexts

RID = uuid.UUID("12345678-1234-1234-1234-123456789abc")
BS = 512
EXT = 8


def pattern(blocks: int, seed: int = 1) -> bytes:
    return b"".join(bytes([(seed + i) & 0xFF or 1]) * BS for i in range(blocks))


@pytest.fixture
def region(tmp_path: Path) -> RawRegion:
    return RawRegion.create(tmp_path / "r", RID, block_size=BS, extent_size=EXT, extent_count=3)


def test_extent_paths_follow_crucible() -> None:
    root = Path("/r")
    assert extent_path(root, 0) == root / "00/000/000"
    assert extent_path(root, 0xABC) == root / "00/000/ABC"
    assert extent_path(root, 0x1234) == root / "00/001/234"
    assert extent_path(root, 0x12345678) == root / "12/345/678"


def test_created_files_have_crucibles_layout(region: RawRegion) -> None:
    region.close()
    text = (region.dir / "region.json").read_text()
    assert text.endswith("}\n") and '"extent_size": {\n    "value": 8,\n    "shift": 9\n  }' in text
    assert oct((region.dir / "region.json").stat().st_mode & 0o777) == "0o600"
    raw = (region.dir / "00/000/002").read_bytes()
    assert len(raw) == EXT * BS + 2 * EXT * CONTEXT_SLOT_BYTES + 1 + META_BYTES == 4897
    meta = raw[-META_BYTES:]
    assert struct.unpack_from("<BQQIII", meta) == (0, 0, 0, 2, 0, 0)  # clean, gen 0, flush 0, raw
    assert raw[:-META_BYTES] == bytes(len(raw) - META_BYTES)


def test_create_refuses_an_existing_region(region: RawRegion) -> None:
    with pytest.raises(FileExistsError):
        RawRegion.create(region.dir, RID, block_size=BS, extent_size=EXT, extent_count=3)


def test_write_read_contexts_and_slot_alternation(region: RawRegion) -> None:
    data = pattern(3)
    region.write(6, data, unencrypted_contexts(data, BS))  # blocks 6,7 of extent 0 and 8 of extent 1
    got, ctx = region.read(5, 5)
    assert got == bytes(BS) + data + bytes(BS)
    hashes = [block_hash(data[i * BS : (i + 1) * BS]) for i in range(3)]
    assert ctx == [ReadBlockEmpty(), *(ReadBlockUnencrypted(h) for h in hashes), ReadBlockEmpty()]
    assert region.versions() == ((0, 0, 0), (0, 0, 0), (True, True, False))
    ext0 = region.extents[0]
    # a first write lands in slot B (the inactive one), a second in A again
    assert ext0._active(6) == 1
    again = pattern(1, seed=9)
    region.write(6, again, unencrypted_contexts(again, BS))
    assert ext0._active(6) == 0
    assert region.read(6, 1) == (again, [ReadBlockUnencrypted(block_hash(again))])


def test_write_unwritten_only_fills_never_written_blocks(region: RawRegion) -> None:
    first = pattern(1, seed=3)
    region.write(1, first, unencrypted_contexts(first, BS))
    second = pattern(2, seed=7)
    region.write(1, second, unencrypted_contexts(second, BS), only_unwritten=True)
    assert region.read(1, 2)[0] == first + second[BS:]


def test_hash_mismatch_writes_nothing(region: RawRegion) -> None:
    data = pattern(2)
    bad = (BlockContext(block_hash(data[:BS])), BlockContext(123))
    with pytest.raises(ExtentFailure) as err:
        region.write(0, data, bad)
    assert err.value.error.kind == ErrorKind.HashMismatch
    assert region.read(0, 2) == (bytes(2 * BS), [ReadBlockEmpty(), ReadBlockEmpty()])
    assert region.versions()[2] == (False, False, False)


@pytest.mark.parametrize(("start", "count"), [(-1, 1), (23, 2), (24, 1), (0, 25)])
def test_out_of_range_is_offset_invalid(region: RawRegion, start: int, count: int) -> None:
    with pytest.raises(ExtentFailure) as err:
        region.read(start, count)
    assert err.value.error.kind == ErrorKind.OffsetInvalid
    data = pattern(max(count, 0))
    with pytest.raises(ExtentFailure) as err:
        region.write(start, data, unencrypted_contexts(data, BS))
    assert err.value.error.kind == ErrorKind.OffsetInvalid


def test_flush_stamps_dirty_extents_only_and_honours_extent_limit(region: RawRegion) -> None:
    data = pattern(1)
    ctx = unencrypted_contexts(data, BS)
    region.write(0, data, ctx)
    region.write(EXT * 2, data, ctx)
    region.flush(5, 2, extent_limit=1)
    assert region.versions() == ((2, 0, 0), (5, 0, 0), (False, False, True))
    region.flush(6, 3)
    assert region.versions() == ((2, 0, 3), (5, 0, 6), (False, False, False))
    with pytest.raises(ExtentFailure) as err:
        region.flush(7, 3, extent_limit=4)
    assert err.value.error.kind == ErrorKind.InvalidExtent
    region.flush(7, 3, extent_limit=3)  # == extent_count is allowed, as in Crucible


def test_flushed_state_survives_reopen(region: RawRegion) -> None:
    data = pattern(4)
    region.write(2, data, unencrypted_contexts(data, BS))
    region.write(2, data[:BS], unencrypted_contexts(data[:BS], BS))  # block 2 back in slot A
    region.flush(1, 1)
    region.close()
    with RawRegion.open(region.dir) as again:
        assert again.versions() == ((1, 0, 0), (1, 0, 0), (False, False, False))
        got, ctx = again.read(0, 8)
        assert got == bytes(2 * BS) + data + bytes(2 * BS)
        assert ctx[2:6] == [ReadBlockUnencrypted(block_hash(data[i * BS : (i + 1) * BS])) for i in range(4)]
        assert [again.extents[0]._active(b) for b in range(8)] == [0, 0, 0, 1, 1, 1, 0, 0]


def test_dirty_extent_reopens_by_matching_hashes(region: RawRegion) -> None:
    """A crash after writes but before a flush: the bitmap on disk is stale, so open picks for
    each block the slot whose on-disk hash matches the data."""
    one, two = pattern(1, seed=1), pattern(1, seed=2)
    region.write(0, one, unencrypted_contexts(one, BS))
    region.flush(1, 1)
    region.write(0, two, unencrypted_contexts(two, BS))  # slot A now, bitmap on disk says B
    region.close()
    with RawRegion.open(region.dir) as again:
        assert again.versions()[2] == (True, False, False)
        assert again.read(0, 1) == (two, [ReadBlockUnencrypted(block_hash(two))])
        assert again.dirty_extents == {0}


def test_dirty_extent_with_no_matching_slot_is_refused(region: RawRegion) -> None:
    one = pattern(1)
    region.write(0, one, unencrypted_contexts(one, BS))
    region.write(0, one, unencrypted_contexts(one, BS))  # both slots hold a context
    region.close()
    path = extent_path(region.dir, 0)
    with open(path, "r+b") as f:
        f.write(b"\xee" * BS)  # data matches neither slot
    with pytest.raises(ExtentFailure) as err:
        RawRegion.open(region.dir)
    assert err.value.error.kind == ErrorKind.MissingContextSlot


def test_encrypted_contexts_round_trip(tmp_path: Path) -> None:
    with RawRegion.create(
        tmp_path / "e", RID, block_size=BS, extent_size=EXT, extent_count=1, encrypted=True
    ) as r:
        data = pattern(1)
        enc = EncryptionContext(bytes(range(12)), bytes(range(16)))
        ctx = BlockContext(encrypted_block_hash(enc.nonce, enc.tag, data), enc)
        r.write(3, data, (ctx,))
        r.flush(1, 1)
    with RawRegion.open(tmp_path / "e") as r:
        assert r.definition.encrypted is True
        assert r.read(3, 1) == (data, [ReadBlockEncrypted(enc)])


def test_wrong_size_and_wrong_version_are_refused(region: RawRegion) -> None:
    region.close()
    path = extent_path(region.dir, 1)
    with open(path, "r+b") as f:
        f.seek(-META_BYTES + 17, os.SEEK_END)
        f.write(struct.pack("<I", 1))  # ext_version 1: SQLite
    with pytest.raises(ExtentFailure) as err:
        RawRegion.open(region.dir)
    assert err.value.error.kind == ErrorKind.BadMetadata
    os.truncate(path, 10)
    with pytest.raises(ExtentFailure) as err:
        RawExtent.open(region.dir, 1, BS, EXT)
    assert err.value.error.kind == ErrorKind.IoError


def test_write_and_flush_order_of_writes_and_fsyncs(
    region: RawRegion, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crucible's crash-consistent order: dirty byte + fsync, contexts before data, an fsync
    before a block is rewritten since the last one, and a flush writes the bitmap and metadata
    BEFORE its fsync."""
    ext = region.extents[0]
    calls: list[str] = []
    real_pwrite, real_fsync = os.pwrite, os.fsync

    def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        if offset == ext.meta_offset:
            calls.append("dirty")
        elif offset == ext.bitmap_offset:
            calls.append("bitmap+meta")
        elif offset >= ext.slots_offset:
            calls.append("slot")
        else:
            calls.append("data")
        return real_pwrite(fd, data, offset)

    def fsync(fd: int) -> None:
        calls.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "fsync", fsync)
    data = pattern(1)
    region.write(0, data, unencrypted_contexts(data, BS))
    assert calls == ["dirty", "fsync", "slot", "data"]
    calls.clear()
    region.write(1, data, unencrypted_contexts(data, BS))  # another block: no sync needed
    assert calls == ["slot", "data"]
    calls.clear()
    region.write(0, data, unencrypted_contexts(data, BS))  # block 0 again before an fsync
    assert calls == ["fsync", "slot", "data"]
    calls.clear()
    region.flush(1, 1)
    assert calls == ["bitmap+meta", "fsync"]
    calls.clear()
    region.flush(2, 1)  # nothing dirty: nothing written
    assert calls == []


def test_a_write_over_blocks_with_mixed_active_slots(region: RawRegion) -> None:
    first, second, third = pattern(4, seed=1), pattern(1, seed=50), pattern(4, seed=90)
    region.write(0, first, unencrypted_contexts(first, BS))  # blocks 0-3 -> B
    region.write(1, second, unencrypted_contexts(second, BS))  # block 1 -> A
    region.write(0, third, unencrypted_contexts(third, BS))  # A, B, A, A: three context runs
    ext = region.extents[0]
    assert [ext._active(b) for b in range(4)] == [0, 1, 0, 0]
    expected = [ReadBlockUnencrypted(block_hash(third[i * BS : (i + 1) * BS])) for i in range(4)]
    assert region.read(0, 4) == (third, expected)
    region.close()
    with RawRegion.open(region.dir) as again:  # dirty: the slots are recomputed from hashes
        assert again.read(0, 4) == (third, expected)
        again.flush(1, 1)
    with RawRegion.open(region.dir) as clean:  # clean: the bitmap is trusted
        assert clean.read(0, 4) == (third, expected)
        assert [clean.extents[0]._active(b) for b in range(4)] == [0, 1, 0, 0]
