"""A downstairs region on disk: ``region.json`` plus one sparse data file per extent.

Each extent keeps metadata ``{gen, flush, dirty, written}`` in ``NNNNN.meta`` (JSON), where
``written`` is a per-block bitmap (hex) so reads can fall through to a read-only parent.
Durability rules (Crucible's): the first write to a clean extent marks it dirty on disk
BEFORE the write is acknowledged; a flush fsyncs dirty extent data, then stamps gen + flush
number and clears dirty. Metadata is replaced atomically (temp file, fsync, rename).
The written bitmap is persisted with the dirty mark and at flush; unflushed writes carry no
durability promise, exactly like Crucible. Stdlib only (runs inside the downstairs image).
"""

from __future__ import annotations

import json
import os
import uuid as uuid_mod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sut.storage.errors import StorageError

__all__ = ["ExtentMeta", "Region", "RegionError", "RegionInfo"]

_REGION_FILE = "region.json"
_FORMAT_VERSION = 1


class RegionError(StorageError):
    """A region cannot be created, opened or accessed as asked."""


@dataclass(frozen=True)
class RegionInfo:
    uuid: str
    block_size: int
    extent_size: int  # blocks per extent
    extent_count: int
    encrypted: bool

    @property
    def extent_bytes(self) -> int:
        return self.block_size * self.extent_size

    @property
    def total_blocks(self) -> int:
        return self.extent_size * self.extent_count


@dataclass
class ExtentMeta:
    gen: int
    flush: int
    dirty: bool
    written: bytearray  # one bit per block

    def to_json(self) -> dict[str, Any]:
        return {
            "gen": self.gen,
            "flush": self.flush,
            "dirty": self.dirty,
            "written": self.written.hex(),
        }

    def is_written(self, block: int) -> bool:
        return bool(self.written[block >> 3] & (1 << (block & 7)))

    def mark_written(self, block: int) -> None:
        self.written[block >> 3] |= 1 << (block & 7)

    # Range forms of the two methods above. A 1 MiB I/O covers 2048 blocks of 512 B, and a
    # Python loop of per-block bit operations cost more CPU than the pwrite itself (profile:
    # ~1.4 M mark_written calls per downstairs in one bench run). Bit k of the bitmap (as a
    # little-endian integer) is block k; whole bytes are handled as bytes, so only the at most
    # 7 + 7 blocks at the ends of a range that share a byte with blocks outside it are
    # handled one by one, and a 4 KiB I/O never converts the whole 4 KiB bitmap to an int.
    def written_bits(self, block: int, count: int) -> str:
        """Per-block ``"0"``/``"1"`` string for ``count`` blocks from ``block``."""
        if count <= 0:
            return ""
        end = block + count
        if not block & 7 and not end & 7:
            chunk = self.written[block >> 3 : end >> 3]
            if chunk.count(0xFF) == len(chunk):
                return "1" * count
            if chunk.count(0) == len(chunk):
                return "0" * count
        first, last = block >> 3, (end + 7) >> 3
        bits = (int.from_bytes(self.written[first:last], "little") >> (block & 7)) & ((1 << count) - 1)
        # format() prints the highest block first; reverse so character i is block + i
        return format(bits, f"0{count}b")[::-1]

    def mark_written_range(self, block: int, count: int) -> None:
        if count <= 0:
            return
        end = block + count
        full_lo, full_hi = (block + 7) >> 3, end >> 3  # bytes whose 8 blocks are all in range
        if full_lo < full_hi:
            self.written[full_lo:full_hi] = b"\xff" * (full_hi - full_lo)
            edges = [*range(block, full_lo << 3), *range(full_hi << 3, end)]
        else:
            edges = list(range(block, end))  # under 16 blocks
        for b in edges:
            self.written[b >> 3] |= 1 << (b & 7)


# Large writes go to the page cache in pieces of at most this size. The kernel sizes a page
# cache folio after the write that creates it, and a later 4 KiB write into a 1 MiB folio makes
# ext4 walk all 256 of its buffer heads (perf, 4 KiB random writes after sequential 1 MiB
# ones: ext4_block_write_begin ~30 % of a downstairs' CPU; 45 instead of 65 us per write with
# 256 KiB pieces, sequential 1 MiB writes unchanged).
_WRITE_PIECE = 256 * 1024


def _pwrite_pieces(fd: int, data: memoryview, offset: int) -> None:
    for pos in range(0, len(data), _WRITE_PIECE):
        os.pwrite(fd, data[pos : pos + _WRITE_PIECE], offset + pos)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    # the rename itself must be durable too, or a crash could resurrect the old metadata
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Region:
    """An opened region. Not thread safe: one downstairs event loop owns it."""

    def __init__(self, directory: Path, info: RegionInfo) -> None:
        self.directory = directory
        self.info = info
        self._fds: list[int] = []
        self._meta: list[ExtentMeta] = []
        for eid in range(info.extent_count):
            self._fds.append(os.open(self._data_path(eid), os.O_RDWR))
            self._meta.append(self._load_meta(eid))

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        region_uuid: str,
        block_size: int,
        extent_size: int,
        extent_count: int,
        encrypted: bool = False,
    ) -> Region:
        if (directory / _REGION_FILE).exists():
            raise RegionError(
                f"a region already exists in {directory}; use `run -d {directory}` to serve it "
                "or choose an empty directory"
            )
        if block_size < 512 or block_size & (block_size - 1):
            raise RegionError(f"--block-size must be a power of two >= 512, got {block_size}")
        if extent_size <= 0 or extent_count <= 0:
            raise RegionError("--extent-size and --extent-count must be positive")
        try:
            canonical = str(uuid_mod.UUID(region_uuid))
        except ValueError:
            raise RegionError(f"-u/--uuid: {region_uuid!r} is not a UUID") from None
        info = RegionInfo(canonical, block_size, extent_size, extent_count, encrypted)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "extents").mkdir(exist_ok=True)
        blank = ExtentMeta(0, 0, False, bytearray((extent_size + 7) // 8))
        for eid in range(extent_count):
            with open(cls._data_path_in(directory, eid), "wb") as f:
                f.truncate(info.extent_bytes)  # sparse: no blocks allocated until written
            _write_atomic(cls._meta_path_in(directory, eid), json.dumps(blank.to_json()).encode())
        # region.json last: its presence marks a completely created region
        record = {"format": _FORMAT_VERSION, **info.__dict__}
        _write_atomic(directory / _REGION_FILE, json.dumps(record, indent=1).encode())
        return cls(directory, info)

    @classmethod
    def open(cls, directory: Path) -> Region:
        path = directory / _REGION_FILE
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise RegionError(
                f"no region in {directory} ({_REGION_FILE} missing); run `create` first"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise RegionError(f"cannot read {path}: {exc}") from None
        try:
            info = RegionInfo(
                uuid=str(record["uuid"]),
                block_size=int(record["block_size"]),
                extent_size=int(record["extent_size"]),
                extent_count=int(record["extent_count"]),
                encrypted=bool(record["encrypted"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RegionError(f"{path} is malformed: {exc!r}") from None
        return cls(directory, info)

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    # -- paths -----------------------------------------------------------------------------
    @staticmethod
    def _data_path_in(directory: Path, eid: int) -> Path:
        return directory / "extents" / f"{eid:05d}.dat"

    @staticmethod
    def _meta_path_in(directory: Path, eid: int) -> Path:
        return directory / "extents" / f"{eid:05d}.meta"

    def _data_path(self, eid: int) -> Path:
        return self._data_path_in(self.directory, eid)

    def _load_meta(self, eid: int) -> ExtentMeta:
        path = self._meta_path_in(self.directory, eid)
        try:
            raw = json.loads(path.read_text())
            return ExtentMeta(
                int(raw["gen"]),
                int(raw["flush"]),
                bool(raw["dirty"]),
                bytearray.fromhex(raw["written"]),
            )
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise RegionError(f"extent metadata {path} is unreadable: {exc!r}") from None

    def _save_meta(self, eid: int) -> None:
        data = json.dumps(self._meta[eid].to_json()).encode()
        _write_atomic(self._meta_path_in(self.directory, eid), data)

    # -- metadata --------------------------------------------------------------------------
    def meta(self, eid: int) -> ExtentMeta:
        self._check_extent(eid)  # a negative index would be another extent's metadata
        return self._meta[eid]

    def versions(self) -> tuple[list[int], list[int], list[bool]]:
        return (
            [m.gen for m in self._meta],
            [m.flush for m in self._meta],
            [m.dirty for m in self._meta],
        )

    # -- I/O -------------------------------------------------------------------------------
    def _check_range(self, block: int, count: int) -> None:
        if block < 0 or count < 0 or block + count > self.info.total_blocks:
            raise RegionError(
                f"blocks {block}..{block + count} outside the region (0..{self.info.total_blocks})"
            )

    def _spans(self, block: int, count: int) -> list[tuple[int, int, int]]:
        """Split a block range into (extent, first block in extent, block count) pieces."""
        spans = []
        size = self.info.extent_size
        while count > 0:
            eid, offset = divmod(block, size)
            n = min(count, size - offset)
            spans.append((eid, offset, n))
            block += n
            count -= n
        return spans

    def read(self, block: int, count: int) -> tuple[bytes, list[bool]]:
        """Return the data and, per block, whether it was ever written."""
        data, bits = self.read_bits(block, count)
        return data, [c == "1" for c in bits]

    def read_bits(self, block: int, count: int) -> tuple[bytes, str]:
        """Like :meth:`read`, with the written map as the wire's ``"0"``/``"1"`` string."""
        self._check_range(block, count)
        bs = self.info.block_size
        spans = self._spans(block, count)
        if len(spans) == 1:  # the common case: no join, so no second copy of the data
            eid, offset, n = spans[0]
            data = os.pread(self._fds[eid], n * bs, offset * bs)
            if len(data) < n * bs:
                data = data.ljust(n * bs, b"\0")
            return data, self._meta[eid].written_bits(offset, n)
        chunks: list[bytes] = []
        bits: list[str] = []
        for eid, offset, n in spans:
            data = os.pread(self._fds[eid], n * bs, offset * bs)
            chunks.append(data.ljust(n * bs, b"\0"))
            bits.append(self._meta[eid].written_bits(offset, n))
        return b"".join(chunks), "".join(bits)

    def write(self, block: int, data: bytes, *, only_unwritten: bool = False) -> None:
        bs = self.info.block_size
        if len(data) % bs:
            raise RegionError(f"write of {len(data)} bytes is not a multiple of {bs}")
        count = len(data) // bs
        self._check_range(block, count)
        pos = 0
        view = memoryview(data)  # slices of a memoryview are not copies; pwrite takes them
        for eid, offset, n in self._spans(block, count):
            meta = self._meta[eid]
            if not meta.dirty:
                meta.dirty = True
                self._save_meta(eid)  # durable dirty mark before the write can be acked
            fd = self._fds[eid]
            if only_unwritten:
                for i, flag in enumerate(meta.written_bits(offset, n)):
                    if flag == "0":
                        os.pwrite(fd, view[pos + i * bs : pos + (i + 1) * bs], (offset + i) * bs)
                        meta.mark_written(offset + i)
            else:
                _pwrite_pieces(fd, view[pos : pos + n * bs], offset * bs)
                meta.mark_written_range(offset, n)
            pos += n * bs

    def flush(self, flush_number: int, gen: int, extent_limit: int | None = None) -> None:
        """Fsync and stamp every dirty extent (below ``extent_limit`` if given).

        The limit is Crucible's: a downstairs under live repair flushes only the extents
        already repaired; stamping a stale one would make it look current.
        """
        for eid, meta in enumerate(self._meta):
            if extent_limit is not None and eid >= extent_limit:
                break
            if meta.dirty:
                os.fsync(self._fds[eid])
                meta.gen, meta.flush, meta.dirty = gen, flush_number, False
                self._save_meta(eid)

    def extent_data(self, eid: int) -> bytes:
        self._check_extent(eid)
        return os.pread(self._fds[eid], self.info.extent_bytes, 0).ljust(self.info.extent_bytes, b"\0")

    def put_extent(
        self, eid: int, data: bytes, *, gen: int, flush: int, written: bytes, dirty: bool = False
    ) -> None:
        """Replace a whole extent (reconciliation / repair) and make it durable at once.

        ``dirty`` copies a live-repair source's unflushed state, so the next flush stamps
        both copies alike; reconciliation ends every copy clean (``dirty=False``).
        """
        self._check_extent(eid)
        if len(data) != self.info.extent_bytes:
            raise RegionError(f"extent {eid}: got {len(data)} bytes, need {self.info.extent_bytes}")
        if len(written) != len(self._meta[eid].written):
            raise RegionError(f"extent {eid}: written bitmap has the wrong length")
        fd = self._fds[eid]
        _pwrite_pieces(fd, memoryview(data), 0)
        os.fsync(fd)
        self._meta[eid] = ExtentMeta(gen, flush, dirty, bytearray(written))
        self._save_meta(eid)

    def _check_extent(self, eid: int) -> None:
        if not 0 <= eid < self.info.extent_count:
            raise RegionError(f"extent {eid} does not exist (0..{self.info.extent_count - 1})")
