"""Region on disk: creation, metadata durability rules, flush stamping, extent transfer."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from sut.storage.region import ExtentMeta, Region, RegionError

UUID = "557cb12a-396f-4e06-b3c5-75bcc770db89"


def make(tmp_path: Path) -> Region:
    return Region.create(tmp_path / "r", region_uuid=UUID, block_size=512, extent_size=8, extent_count=3)


def meta_file(tmp_path: Path, eid: int) -> dict[str, object]:
    return json.loads((tmp_path / "r" / "extents" / f"{eid:05d}.meta").read_text())  # type: ignore[no-any-return]


def test_create_writes_region_json_and_sparse_extents(tmp_path: Path) -> None:
    region = make(tmp_path)
    record = json.loads((tmp_path / "r" / "region.json").read_text())
    assert record["uuid"] == UUID
    assert record["extent_size"] == 8
    assert record["encrypted"] is False
    data = tmp_path / "r" / "extents" / "00000.dat"
    assert data.stat().st_size == 8 * 512
    assert data.stat().st_blocks == 0  # sparse
    assert region.versions() == ([0, 0, 0], [0, 0, 0], [False, False, False])
    region.close()


def test_create_refuses_an_existing_region_and_bad_arguments(tmp_path: Path) -> None:
    make(tmp_path).close()
    with pytest.raises(RegionError, match="already exists"):
        make(tmp_path)
    with pytest.raises(RegionError, match="power of two"):
        Region.create(tmp_path / "x", region_uuid=UUID, block_size=1000, extent_size=8, extent_count=1)
    with pytest.raises(RegionError, match="not a UUID"):
        Region.create(tmp_path / "y", region_uuid="nope", block_size=512, extent_size=8, extent_count=1)
    with pytest.raises(RegionError, match="run `create` first"):
        Region.open(tmp_path / "missing")


def test_first_write_marks_dirty_on_disk_and_flush_stamps(tmp_path: Path) -> None:
    region = make(tmp_path)
    region.write(6, b"\x01" * 1024)  # blocks 6,7 (extent 0) and 8 is not touched
    assert meta_file(tmp_path, 0)["dirty"] is True  # durable before any ack
    assert meta_file(tmp_path, 1)["dirty"] is False
    region.write(8, b"\x02" * 512)  # extent 1 block 0
    region.flush(flush_number=4, gen=7)
    for eid in (0, 1):
        m = meta_file(tmp_path, eid)
        assert (m["gen"], m["flush"], m["dirty"]) == (7, 4, False)
    assert meta_file(tmp_path, 2)["gen"] == 0  # clean extents are not stamped
    region.close()
    reopened = Region.open(tmp_path / "r")
    data, written = reopened.read(5, 4)
    assert data == bytes(512) + b"\x01" * 1024 + b"\x02" * 512
    assert written == [False, True, True, True]
    assert not [p for p in (tmp_path / "r" / "extents").iterdir() if p.suffix == ".tmp"]
    reopened.close()


def test_write_unwritten_skips_written_blocks(tmp_path: Path) -> None:
    region = make(tmp_path)
    region.write(0, b"\xaa" * 512)
    region.write(0, b"\xbb" * 1024, only_unwritten=True)
    data, written = region.read(0, 2)
    assert data == b"\xaa" * 512 + b"\xbb" * 512
    assert written == [True, True]
    region.close()


def test_out_of_range_and_partial_block_io_is_refused(tmp_path: Path) -> None:
    region = make(tmp_path)
    with pytest.raises(RegionError, match="outside the region"):
        region.read(20, 8)
    with pytest.raises(RegionError, match="not a multiple"):
        region.write(0, b"x" * 100)
    region.close()


def test_extent_transfer_copies_data_and_metadata(tmp_path: Path) -> None:
    src = make(tmp_path)
    src.write(9, b"\x33" * 512)
    src.flush(1, 2)
    dst = Region.create(tmp_path / "d", region_uuid=UUID, block_size=512, extent_size=8, extent_count=3)
    meta = src.meta(1)
    dst.put_extent(1, src.extent_data(1), gen=meta.gen, flush=meta.flush, written=bytes(meta.written))
    assert dst.read(8, 2) == src.read(8, 2)
    assert dst.versions() == src.versions()
    with pytest.raises(RegionError, match="does not exist"):
        dst.extent_data(3)
    src.close()
    dst.close()
    assert os.path.exists(tmp_path / "d" / "region.json")


def test_dirty_mark_and_flush_stamp_are_fsynced_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crucible's durability order, recorded at the os seam (the strace test in
    tests/integration/storage/test_durability.py checks the same on a real downstairs):
    write = durable dirty mark, then data; flush = fsync data, then replace the metadata."""
    region = make(tmp_path)
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace, real_pwrite = os.fsync, os.replace, os.pwrite

    def name_of(fd: int) -> str:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    def fsync(fd: int) -> None:
        calls.append(("fsync", name_of(fd)))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        calls.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        calls.append(("pwrite", name_of(fd)))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "pwrite", pwrite)
    region.write(8, b"\x01" * 512)  # first write to clean extent 1
    assert calls == [
        ("fsync", "00001.meta.tmp"),
        ("replace", "00001.meta"),
        ("fsync", "extents"),
        ("pwrite", "00001.dat"),
    ]
    calls.clear()
    region.write(9, b"\x02" * 512)  # extent already dirty: no metadata write on the data path
    assert calls == [("pwrite", "00001.dat")]
    calls.clear()
    region.flush(flush_number=1, gen=1)
    assert calls == [
        ("fsync", "00001.dat"),
        ("fsync", "00001.meta.tmp"),
        ("replace", "00001.meta"),
        ("fsync", "extents"),
    ]
    region.close()


def _reference_bits(written: bytearray, block: int, count: int) -> str:
    return "".join("1" if written[b >> 3] & (1 << (b & 7)) else "0" for b in range(block, block + count))


def test_written_bitmap_range_operations_match_per_block_operations() -> None:
    rng = random.Random(7)
    for _ in range(400):
        nblocks = rng.choice([8, 16, 64, 200, 4096])
        fast = ExtentMeta(0, 0, False, bytearray((nblocks + 7) // 8))
        slow = bytearray(len(fast.written))
        for _ in range(rng.randint(0, 6)):
            block = rng.randrange(nblocks)
            count = rng.randint(0, nblocks - block)
            fast.mark_written_range(block, count)
            for b in range(block, block + count):
                slow[b >> 3] |= 1 << (b & 7)
        assert fast.written == slow
        block = rng.randrange(nblocks)
        count = rng.randint(0, nblocks - block)
        assert fast.written_bits(block, count) == _reference_bits(slow, block, count)
    full = ExtentMeta(0, 0, False, bytearray(b"\xff" * 4))
    assert full.written_bits(8, 16) == "1" * 16
    assert ExtentMeta(0, 0, False, bytearray(4)).written_bits(8, 16) == "0" * 16
