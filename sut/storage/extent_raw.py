"""Crucible's raw extent files and region directory, so the real downstairs and ours share disks.

Facts from oxidecomputer/crucible 6d037cb (``downstairs/src/extent_inner_raw.rs``,
``raw-extent/src/lib.rs``, ``downstairs/src/extent.rs``, ``downstairs/src/region.rs``); the
code is ours. A region directory holds ``region.json`` (the RegionDefinition as JSON) and one
file per extent N at ``{N>>24:02X}/{(N>>12)&0xFFF:03X}/{N&0xFFF:03X}``. An extent of B blocks
of S bytes is one file:

====================  ===========================================================
offset                what
====================  ===========================================================
0                     block data, B * S bytes (never-written blocks are zeros)
B*S                   context slot A of every block, 48 bytes each
B*S + 48B             context slot B of every block
B*S + 96B             active-slot bitmap, ceil(B/8) bytes, bit i of byte i//8 (LSB
                      first) set = slot B is active for block i
then                  metadata, 32 bytes: bincode of dirty u8, gen u64, flush u64,
                      ext_version u32 (= 2, raw), bonus_sync_count u32,
                      defrag_count u32, zero padding
====================  ===========================================================

A context slot is the bincode of ``Option<{BlockContext, on_disk_hash u64, flush_id u16}>``
(zero padded): None = the block was never written. ``on_disk_hash`` is the xxHash64 of the
stored bytes (for an encrypted block the ciphertext), ``flush_id`` the low 16 bits of the
extent's flush number when the slot was written.

Write (crash-consistent order, as Crucible): set the dirty byte and fsync (first write since
a flush only); if a block is written twice since the last fsync, fsync first; write the new
contexts into each block's INACTIVE slot; write the data; then flip the active slot in memory
only. The bitmap reaches the disk with the metadata at the next flush. Flush of a dirty
extent: write bitmap + metadata (dirty 0, new gen and flush), then fsync; a clean extent is
left alone. Opening a clean extent trusts the bitmap; opening a DIRTY one (a crash since the
last flush) recomputes each block's active slot: the slot whose on_disk_hash matches the
data, else an empty slot (A first), else MissingContextSlot.

Not done (Crucible does it, nothing visible on the wire depends on it): defragmenting the
slots after a flush. A region with SQLite extents (ext_version 1) is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sut.storage import bincode
from sut.storage.wire.blockhash import block_hash, block_hashes, encrypted_block_hash
from sut.storage.wire.crucible_error import ERROR_DETAIL, CrucibleError, ErrorKind, MissingContextSlot
from sut.storage.wire.fields import (
    BlockContext,
    EncryptionContext,
    ExtentSize,
    PlainContexts,
    PlainReadContexts,
    ReadBlockContext,
    ReadBlockEmpty,
    ReadBlockEncrypted,
    ReadBlockUnencrypted,
    RegionDefinition,
    gather_hashes,
    interleave_hashes,
)

__all__ = [
    "CONTEXT_SLOT_BYTES",
    "EXT_VERSION_RAW",
    "META_BYTES",
    "ExtentFailure",
    "RawExtent",
    "RawRegion",
    "SlotContext",
    "definition_dict",
    "extent_dir",
    "extent_file_name",
    "extent_path",
    "finish_replacement",
    "recover_repair_dirs",
    "repair_dir",
]

CONTEXT_SLOT_BYTES = 48
META_BYTES = 32
EXT_VERSION_RAW = 2
DATABASE_VERSION = 1  # database_read_version / database_write_version of a raw region
REGION_JSON = "region.json"
REPAIR_STAGES = ("copy", "replace", "completed")

_META = struct.Struct("<BQQIII")  # dirty, gen, flush, ext_version, bonus_sync_count, defrag_count
_SLOT_HEAD = struct.Struct("<BQB")  # Some, hash, encryption Option tag
_SLOT_TAIL = struct.Struct("<QH")  # on_disk_hash, flush_id
# A whole unencrypted slot in one pack/unpack (the hot paths): Some, hash, None, on_disk_hash,
# flush_id, zero padding; byte for byte what _encode_slot writes for such a slot.
_SLOT_PLAIN = struct.Struct(f"<BQBQH{CONTEXT_SLOT_BYTES - 20}x")
_SLOT_FRONT = struct.Struct(f"<BQB{CONTEXT_SLOT_BYTES - 10}x")  # Some, hash, encryption tag
_EMPTY_READ = ReadBlockEmpty()
_PLAIN_SOME = b"\x01"  # byte 0 of a slot holding a context; byte 9 is its encryption tag


def _joined(parts: Sequence[PlainReadContexts]) -> PlainReadContexts:
    if len(parts) == 1:
        return parts[0]
    hashes = parts[0].hashes[:]
    for part in parts[1:]:
        hashes.extend(part.hashes)
    return PlainReadContexts(hashes)


class ExtentFailure(Exception):
    """An extent or region operation failed; ``error`` is the CrucibleError to report (its
    variant may carry no text: the exception's message has the detail for the log)."""

    def __init__(self, error: CrucibleError, message: str | None = None) -> None:
        super().__init__(message or str(error))
        self.error = error


def _fail(kind: ErrorKind, detail: str | None = None) -> ExtentFailure:
    """The failure of ``kind``; ``detail`` goes on the wire only for variants with a String."""
    wire_detail = detail if ERROR_DETAIL[kind] is bincode.STRING else None
    text = f"{kind.name}: {detail}" if detail else kind.name
    return ExtentFailure(CrucibleError(kind, wire_detail), text)


@dataclass(frozen=True)
class SlotContext:
    """One written block's context slot."""

    context: BlockContext
    on_disk_hash: int
    flush_id: int


def _encode_slot(slot: SlotContext | None) -> bytes:
    out = bytearray(CONTEXT_SLOT_BYTES)
    if slot is None:
        return bytes(out)
    enc = slot.context.encryption_context
    _SLOT_HEAD.pack_into(out, 0, 1, slot.context.hash, 0 if enc is None else 1)
    pos = _SLOT_HEAD.size
    if enc is not None:
        out[pos : pos + 28] = enc.nonce + enc.tag
        pos += 28
    _SLOT_TAIL.pack_into(out, pos, slot.on_disk_hash, slot.flush_id & 0xFFFF)
    return bytes(out)


def _decode_slot(raw: bytes | memoryview, where: str) -> SlotContext | None:
    if raw[0] == 0:
        return None
    some, hash_, enc_tag = _SLOT_HEAD.unpack_from(raw, 0)
    if some != 1 or enc_tag > 1:
        raise _fail(ErrorKind.BadContextSlot, f"{where}: bad option tag")
    pos = _SLOT_HEAD.size
    enc = None
    if enc_tag:
        enc = EncryptionContext(bytes(raw[pos : pos + 12]), bytes(raw[pos + 12 : pos + 28]))
        pos += 28
    on_disk, flush_id = _SLOT_TAIL.unpack_from(raw, pos)
    return SlotContext(BlockContext(hash_, enc), on_disk, flush_id)


def extent_dir(region_dir: Path, number: int) -> Path:
    """The directory holding extent ``number``'s file (and its repair scratch directories)."""
    return region_dir / f"{(number >> 24) & 0xFF:02X}" / f"{(number >> 12) & 0xFFF:03X}"


def extent_file_name(number: int) -> str:
    """The name of extent ``number``'s file inside :func:`extent_dir` (what ``/files`` lists)."""
    return f"{number & 0xFFF:03X}"


def extent_path(region_dir: Path, number: int) -> Path:
    """Where Crucible keeps extent ``number``'s file."""
    return extent_dir(region_dir, number) / extent_file_name(number)


def repair_dir(region_dir: Path, number: int, stage: str) -> Path:
    """A repair scratch directory of extent ``number``: ``stage`` is ``copy`` (the download in
    progress), ``replace`` (complete, being copied over the extent) or ``completed``."""
    if stage not in REPAIR_STAGES:
        raise ValueError(f"unknown repair stage {stage!r}")
    return extent_dir(region_dir, number) / f"{extent_file_name(number)}.{stage}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish_replacement(region_dir: Path, number: int) -> None:
    """Copy ``NNN.replace/NNN`` over extent ``number``'s file and retire the scratch directory
    (``.replace`` -> ``.completed`` -> removed), syncing each step: safe to redo after a crash
    at any point, which :meth:`RawRegion.open` does when it finds a ``.replace`` directory."""
    where = extent_dir(region_dir, number)
    replace = repair_dir(region_dir, number, "replace")
    completed = repair_dir(region_dir, number, "completed")
    target = extent_path(region_dir, number)
    shutil.copyfile(replace / extent_file_name(number), target)
    _fsync_path(target)
    _fsync_path(where)
    os.rename(replace, completed)
    _fsync_path(where)
    shutil.rmtree(completed)
    _fsync_path(where)


def recover_repair_dirs(region_dir: Path, number: int, read_only: bool) -> None:
    """What opening an extent does first, as Crucible: drop an unfinished download (``.copy``)
    and a finished repair's leftovers (``.completed``); finish a replacement whose download had
    completed (``.replace``; not in read-only mode)."""
    for stage in ("copy", "completed"):
        leftover = repair_dir(region_dir, number, stage)
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        elif leftover.exists() or leftover.is_symlink():
            leftover.unlink()
    if not read_only and repair_dir(region_dir, number, "replace").is_dir():
        finish_replacement(region_dir, number)


def _stored_hash(ctx: BlockContext, data: bytes | memoryview) -> int:
    """The hash a BlockContext must carry for ``data`` (over nonce + tag + data if encrypted)."""
    enc = ctx.encryption_context
    return block_hash(data) if enc is None else encrypted_block_hash(enc.nonce, enc.tag, data)


class RawExtent:
    """One open raw extent file (``create`` / ``open``, then I/O, then ``close``)."""

    def __init__(self, path: Path, number: int, block_size: int, blocks: int, fd: int) -> None:
        self.path = path
        self.number = number
        self.block_size = block_size
        self.blocks = blocks
        self._fd = fd
        self.slots_offset = blocks * block_size
        self.bitmap_offset = self.slots_offset + 2 * blocks * CONTEXT_SLOT_BYTES
        self.meta_offset = self.bitmap_offset + (blocks + 7) // 8
        self.active_b = bytearray((blocks + 7) // 8)  # bit set = slot B active
        self.dirty = False
        self.gen = 0
        self.flush = 0
        self._bonus_sync_count = 0
        self._defrag_count = 0
        self._unsynced = 0  # bit b set: block b was written since the last fsync

    @staticmethod
    def file_size(block_size: int, blocks: int) -> int:
        return blocks * block_size + 2 * blocks * CONTEXT_SLOT_BYTES + (blocks + 7) // 8 + META_BYTES

    # -- lifecycle -----------------------------------------------------------------------
    @classmethod
    def create(cls, region_dir: Path, number: int, block_size: int, blocks: int) -> RawExtent:
        path = extent_path(region_dir, number)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        ext = cls(path, number, block_size, blocks, fd)
        try:
            os.ftruncate(fd, cls.file_size(block_size, blocks))
            ext._write_bitmap_and_meta(dirty=False, gen=0, flush=0)
            os.fsync(fd)
        except BaseException:
            ext.close()
            raise
        return ext

    @classmethod
    def open(
        cls, region_dir: Path, number: int, block_size: int, blocks: int, read_only: bool = False
    ) -> RawExtent:
        path = extent_path(region_dir, number)
        try:
            recover_repair_dirs(region_dir, number, read_only)
        except OSError as exc:
            raise _fail(ErrorKind.IoError, f"extent {number}: repair recovery failed: {exc}") from exc
        try:
            fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        except OSError as exc:
            raise _fail(ErrorKind.IoError, f"extent {number}: open of {path} failed: {exc}") from exc
        ext = cls(path, number, block_size, blocks, fd)
        try:
            ext._load(read_only)
        except BaseException:
            ext.close()
            raise
        return ext

    def _load(self, read_only: bool) -> None:
        size = os.fstat(self._fd).st_size
        expected = self.file_size(self.block_size, self.blocks)
        if size != expected:
            raise _fail(
                ErrorKind.IoError,
                f"extent {self.number}: file size {size} does not match expected {expected}",
            )
        if not read_only:
            os.fsync(self._fd)
        meta = os.pread(self._fd, META_BYTES, self.meta_offset)
        dirty, gen, flush, version, bonus, defrag = _META.unpack_from(meta)
        if dirty > 1:
            raise _fail(ErrorKind.BadMetadata, f"extent {self.number}: dirty byte {dirty}")
        if version != EXT_VERSION_RAW:
            raise _fail(ErrorKind.BadMetadata, f"extent {self.number}: ext_version {version} is not raw (2)")
        self.dirty, self.gen, self.flush = bool(dirty), gen, flush
        self._bonus_sync_count, self._defrag_count = bonus, defrag
        if not self.dirty:
            self.active_b[:] = os.pread(self._fd, len(self.active_b), self.bitmap_offset)
            return
        # dirty: a crash may have left new contexts without their data (or the reverse)
        slots_a = self._read_slots(0, self.blocks, 0)
        slots_b = self._read_slots(0, self.blocks, 1)
        for block in range(self.blocks):
            a, b = slots_a[block], slots_b[block]
            if a is None and b is None:
                self._set_active(block, 0)
                continue
            data_hash = block_hash(os.pread(self._fd, self.block_size, block * self.block_size))
            match = next(
                (s for s, c in ((0, a), (1, b)) if c is not None and c.on_disk_hash == data_hash), None
            )
            empty = next((s for s, c in ((0, a), (1, b)) if c is None), None)
            slot = match if match is not None else empty
            if slot is None:
                raise ExtentFailure(
                    CrucibleError(ErrorKind.MissingContextSlot, MissingContextSlot(block, self.number)),
                    f"extent {self.number}: neither context slot of block {block} matches its data",
                )
            self._set_active(block, slot)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- slots -----------------------------------------------------------------------------
    def _active(self, block: int) -> int:
        return (self.active_b[block >> 3] >> (block & 7)) & 1

    def _set_active(self, block: int, slot: int) -> None:
        if slot:
            self.active_b[block >> 3] |= 1 << (block & 7)
        else:
            self.active_b[block >> 3] &= ~(1 << (block & 7)) & 0xFF

    def _slot_offset(self, block: int, slot: int) -> int:
        return self.slots_offset + (slot * self.blocks + block) * CONTEXT_SLOT_BYTES

    def _read_slots(self, start: int, count: int, slot: int) -> list[SlotContext | None]:
        raw = os.pread(self._fd, count * CONTEXT_SLOT_BYTES, self._slot_offset(start, slot))
        view = memoryview(raw)
        return [
            _decode_slot(
                view[i * CONTEXT_SLOT_BYTES : (i + 1) * CONTEXT_SLOT_BYTES],
                f"extent {self.number} block {start + i}",
            )
            for i in range(count)
        ]

    def active_contexts(self, start: int, count: int) -> list[SlotContext | None]:
        """The active slot of blocks ``start .. start+count`` (extent-relative): one pread per
        run of blocks whose active slot is the same."""
        self._check(start, count)
        out: list[SlotContext | None] = []
        for first, n, slot in self._runs(range(start, start + count), self._active):
            out += self._read_slots(first, n, slot)
        return out

    @staticmethod
    def _runs(blocks: Sequence[int], slot_of: Callable[[int], int]) -> list[tuple[int, int, int]]:
        """``blocks`` (ascending) as (first block, count, slot) runs of consecutive blocks with
        the same ``slot_of``."""
        runs: list[tuple[int, int, int]] = []
        for block in blocks:
            slot = slot_of(block)
            if runs and runs[-1][0] + runs[-1][1] == block and runs[-1][2] == slot:
                first, n, _ = runs[-1]
                runs[-1] = (first, n + 1, slot)
            else:
                runs.append((block, 1, slot))
        return runs

    def _slot_runs(self, blocks: Sequence[int], flip: int) -> list[tuple[int, int, int]]:
        """``_runs`` of ``blocks`` by active slot (``flip`` 0) or inactive slot (``flip`` 1),
        the bitmap read inline: this runs once per block of every read and write."""
        active = self.active_b
        runs: list[tuple[int, int, int]] = []
        first = prev = cur = -2
        for b in blocks:
            slot = ((active[b >> 3] >> (b & 7)) & 1) ^ flip
            if b == prev + 1 and slot == cur:
                prev = b
                continue
            if cur >= 0:
                runs.append((first, prev - first + 1, cur))
            first = prev = b
            cur = slot
        if cur >= 0:
            runs.append((first, prev - first + 1, cur))
        return runs

    def _range_runs(self, start: int, count: int, flip: int) -> list[tuple[int, int, int]]:
        """``_slot_runs`` of the consecutive blocks ``start .. start+count``, in one step when
        their active slots are all the same (the bitmap bits read as one integer)."""
        if count <= 0:
            return []
        lo, hi = start >> 3, (start + count + 7) >> 3
        every = (1 << count) - 1
        bits = (int.from_bytes(self.active_b[lo:hi], "little") >> (start & 7)) & every
        if bits == 0:
            return [(start, count, flip)]
        if bits == every:
            return [(start, count, 1 ^ flip)]
        return self._slot_runs(range(start, start + count), flip)

    def _flip_range(self, start: int, count: int) -> None:
        """Toggle the active slot of the consecutive blocks ``start .. start+count``."""
        lo, hi = start >> 3, (start + count + 7) >> 3
        bits = int.from_bytes(self.active_b[lo:hi], "little") ^ (((1 << count) - 1) << (start & 7))
        self.active_b[lo:hi] = bits.to_bytes(hi - lo, "little")

    def _check(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self.blocks:
            raise _fail(
                ErrorKind.OffsetInvalid, f"extent {self.number}: blocks {start}+{count} beyond {self.blocks}"
            )

    # -- I/O ---------------------------------------------------------------------------------
    def read(self, start: int, count: int) -> tuple[bytes, Sequence[ReadBlockContext]]:
        """Data and one context per block: Empty (never written), Encrypted or Unencrypted
        (all Unencrypted: one PlainReadContexts)."""
        self._check(start, count)
        plain: list[PlainReadContexts] = []  # while every slot so far holds a plain context
        contexts: list[ReadBlockContext] = []
        for first, n, slot_no in self._range_runs(start, count, 0):
            raw = os.pread(self._fd, n * CONTEXT_SLOT_BYTES, self._slot_offset(first, slot_no))
            if len(raw) != n * CONTEXT_SLOT_BYTES:
                raise _fail(ErrorKind.IoError, f"extent {self.number}: incomplete context read")
            if not contexts and self._all_plain(raw, n):
                # the common case, in bulk: every slot written and unencrypted
                plain.append(PlainReadContexts(gather_hashes(raw, n, CONTEXT_SLOT_BYTES, 1)))
                continue
            for run in plain:
                contexts += run
            plain = []
            # the common slots (empty, unencrypted) straight from one unpack per slot; anything
            # else through _decode_slot, which also reports a malformed one
            for i, (some, hash_, enc_tag) in enumerate(_SLOT_FRONT.iter_unpack(raw)):
                if some == 0:
                    contexts.append(_EMPTY_READ)
                elif some == 1 and enc_tag == 0:
                    contexts.append(ReadBlockUnencrypted(hash_))
                else:
                    off = i * CONTEXT_SLOT_BYTES
                    where = f"extent {self.number} block {first + i}"
                    slot = _decode_slot(raw[off : off + CONTEXT_SLOT_BYTES], where)
                    assert slot is not None and slot.context.encryption_context is not None
                    contexts.append(ReadBlockEncrypted(slot.context.encryption_context))
        data = os.pread(self._fd, count * self.block_size, start * self.block_size)
        if len(data) != count * self.block_size:
            raise _fail(ErrorKind.IoError, f"extent {self.number}: incomplete read")
        if plain and not contexts:
            return data, _joined(plain)
        return data, contexts

    @staticmethod
    def _all_plain(raw: bytes, n: int) -> bool:
        return raw[0::CONTEXT_SLOT_BYTES] == _PLAIN_SOME * n and raw[9::CONTEXT_SLOT_BYTES] == bytes(n)

    def write(
        self,
        start: int,
        data: bytes | memoryview,
        contexts: Sequence[BlockContext],
        only_unwritten: bool = False,
        validated: bool = False,
    ) -> None:
        """Write whole blocks from extent-relative ``start`` (hashes are the caller's check;
        ``validated``: they were checked, so an unencrypted block's on-disk hash is its
        context's hash and is not computed again)."""
        bs = self.block_size
        self._check(start, len(contexts))
        if len(data) != len(contexts) * bs:
            raise _fail(ErrorKind.DataLenUnaligned, f"{len(data)} bytes for {len(contexts)} blocks")
        view = memoryview(data)
        todo: Sequence[int] = range(len(contexts))
        if only_unwritten:
            current = self.active_contexts(start, len(contexts))
            todo = [i for i in todo if current[i] is None]
            if not todo:
                return
        if not self.dirty:
            os.pwrite(self._fd, b"\x01", self.meta_offset)
            os.fsync(self._fd)
            self.dirty = True
        consecutive = len(todo) == len(contexts)  # one run of blocks: every block of the write
        blocks: Sequence[int] = range(start, start + len(todo)) if consecutive else [start + i for i in todo]
        if consecutive:
            written = ((1 << len(todo)) - 1) << start
        else:
            written = 0
            for b in blocks:
                written |= 1 << b
        if self._unsynced & written:  # a block rewritten before an fsync: sync first
            os.fsync(self._fd)
            self._unsynced = 0
            self._bonus_sync_count += 1
        self._unsynced |= written
        # contexts first (one pwrite per run of blocks going to the same slot), then the data
        # (one pwrite per run of consecutive blocks)
        flush_id = self.flush & 0xFFFF
        if type(contexts) is PlainContexts and validated:
            # the common case, in bulk: every slot is Some(hash), no encryption, the same hash
            # on disk (validated), this flush id
            base = _SLOT_PLAIN.pack(1, 0, 0, 0, flush_id)
            slots = interleave_hashes(contexts.hashes, CONTEXT_SLOT_BYTES, (1, 10), base)
            runs = self._range_runs(start, len(todo), 1) if consecutive else self._slot_runs(blocks, 1)
            for first, n, slot in runs:
                i = first - start
                os.pwrite(
                    self._fd,
                    slots[i * CONTEXT_SLOT_BYTES : (i + n) * CONTEXT_SLOT_BYTES],
                    self._slot_offset(first, slot),
                )
        else:
            pack = _SLOT_PLAIN.pack
            for first, n, slot in self._slot_runs(blocks, 1):
                encoded = []
                for i in range(first - start, first - start + n):
                    ctx = contexts[i]
                    if ctx.encryption_context is None:
                        on_disk = ctx.hash if validated else block_hash(view[i * bs : (i + 1) * bs])
                        encoded.append(pack(1, ctx.hash, 0, on_disk, flush_id))
                    else:
                        on_disk = block_hash(view[i * bs : (i + 1) * bs])
                        encoded.append(_encode_slot(SlotContext(ctx, on_disk, flush_id)))
                os.pwrite(self._fd, b"".join(encoded), self._slot_offset(first, slot))
        if consecutive:
            os.pwrite(self._fd, view, start * bs)
            self._flip_range(start, len(todo))  # each written block's other slot becomes active
        else:
            for first, n, _ in self._runs(blocks, lambda _b: 0):
                i = first - start
                os.pwrite(self._fd, view[i * bs : (i + n) * bs], first * bs)
            active = self.active_b
            for block in blocks:  # each written block's other slot becomes the active one
                active[block >> 3] ^= 1 << (block & 7)

    # -- flush ---------------------------------------------------------------------------------
    def _write_bitmap_and_meta(self, *, dirty: bool, gen: int, flush: int) -> None:
        meta = bytearray(META_BYTES)
        _META.pack_into(
            meta, 0, int(dirty), gen, flush, EXT_VERSION_RAW, self._bonus_sync_count, self._defrag_count
        )
        os.pwrite(self._fd, bytes(self.active_b) + bytes(meta), self.bitmap_offset)

    def pre_flush(self, flush_number: int, gen_number: int) -> bool:
        """Stamp a dirty extent (bitmap + metadata, not yet synced); False if it was clean."""
        if not self.dirty:
            return False
        self._write_bitmap_and_meta(dirty=False, gen=gen_number, flush=flush_number)
        self.dirty, self.gen, self.flush = False, gen_number, flush_number
        return True

    def sync(self) -> None:
        os.fsync(self._fd)
        self._unsynced = 0

    def flush_extent(self, flush_number: int, gen_number: int) -> bool:
        if not self.pre_flush(flush_number, gen_number):
            return False
        self.sync()
        return True


# -- region ------------------------------------------------------------------------------------
def definition_dict(d: RegionDefinition) -> dict[str, object]:
    """The RegionDefinition as Crucible's JSON has it (region.json, the repair API's /region-info)."""
    return {
        "block_size": d.block_size,
        "extent_size": {"value": d.extent_size.value, "shift": d.extent_size.shift},
        "extent_count": d.extent_count,
        "uuid": str(d.uuid),
        "encrypted": d.encrypted,
        "database_read_version": d.database_read_version,
        "database_write_version": d.database_write_version,
    }


def _definition_json(d: RegionDefinition) -> str:
    return json.dumps(definition_dict(d), indent=2)


def _parse_definition(text: str, where: Path) -> RegionDefinition:
    try:
        raw = json.loads(text)
        ext = raw["extent_size"]
        d = RegionDefinition(
            int(raw["block_size"]),
            ExtentSize(int(ext["value"]), int(ext["shift"])),
            int(raw["extent_count"]),
            uuid.UUID(raw["uuid"]),
            bool(raw["encrypted"]),
            int(raw["database_read_version"]),
            int(raw["database_write_version"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise _fail(ErrorKind.RegionAssembleError, f"{where}: {exc!r}") from exc
    if d.database_read_version != DATABASE_VERSION or d.database_write_version != DATABASE_VERSION:
        raise _fail(ErrorKind.RegionIncompatible, f"{where}: database versions are not {DATABASE_VERSION}")
    if d.block_size <= 0 or d.block_size != 1 << d.extent_size.shift or d.extent_size.value <= 0:
        raise _fail(ErrorKind.RegionIncompatible, f"{where}: inconsistent block size / extent size")
    return d


class RawRegion:
    """A Crucible region directory of raw extents: ``create`` / ``open``, absolute-block I/O."""

    def __init__(
        self, region_dir: Path, definition: RegionDefinition, extents: list[RawExtent], read_only: bool
    ) -> None:
        self.dir = region_dir
        self.definition = definition
        self.extents = extents
        self.read_only = read_only
        self.dirty_extents = {e.number for e in extents if e.dirty}
        self.closed: set[int] = set()  # extents closed for repair (their last versions stay readable)

    @property
    def block_size(self) -> int:
        return self.definition.block_size

    @property
    def extent_blocks(self) -> int:
        return self.definition.extent_size.value

    @property
    def total_blocks(self) -> int:
        return self.extent_blocks * self.definition.extent_count

    @classmethod
    def create(
        cls,
        region_dir: Path,
        region_id: uuid.UUID,
        *,
        block_size: int = 512,
        extent_size: int = 100,
        extent_count: int = 15,
        encrypted: bool = False,
    ) -> RawRegion:
        """Like ``crucible-downstairs create``: refuses a directory that has a region.json."""
        if block_size < 512 or block_size & (block_size - 1):
            raise ValueError(f"block size {block_size} is not a power of two >= 512")
        if extent_size < 1 or extent_count < 1:
            raise ValueError("extent size and count must be positive")
        config = region_dir / REGION_JSON
        if config.exists():
            raise FileExistsError(f"Config file already exists {config}")
        region_dir.mkdir(parents=True, exist_ok=True)
        definition = RegionDefinition(
            block_size,
            ExtentSize(extent_size, block_size.bit_length() - 1),
            extent_count,
            region_id,
            encrypted,
            DATABASE_VERSION,
            DATABASE_VERSION,
        )
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(_definition_json(definition) + "\n")
            f.flush()
            os.fsync(f.fileno())
        extents: list[RawExtent] = []
        try:
            for n in range(extent_count):
                extents.append(RawExtent.create(region_dir, n, block_size, extent_size))
        except BaseException:
            for e in extents:
                e.close()
            raise
        return cls(region_dir, definition, extents, read_only=False)

    @classmethod
    def open(cls, region_dir: Path, read_only: bool = False) -> RawRegion:
        config = region_dir / REGION_JSON
        try:
            text = config.read_text()
        except OSError as exc:
            raise _fail(ErrorKind.RegionAssembleError, f"opening region config {config}: {exc}") from exc
        d = _parse_definition(text, config)
        extents: list[RawExtent] = []
        try:
            for n in range(d.extent_count):
                extents.append(RawExtent.open(region_dir, n, d.block_size, d.extent_size.value, read_only))
        except BaseException:
            for e in extents:
                e.close()
            raise
        return cls(region_dir, d, extents, read_only)

    def close(self) -> None:
        for e in self.extents:
            e.close()

    def __enter__(self) -> RawRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- versions ---------------------------------------------------------------------------------
    def versions(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
        """(gen numbers, flush numbers, dirty bits), one per extent: ExtentVersions' fields."""
        return (
            tuple(e.gen for e in self.extents),
            tuple(e.flush for e in self.extents),
            tuple(e.dirty for e in self.extents),
        )

    # -- I/O ----------------------------------------------------------------------------------------
    def check_range(self, start: int, count: int) -> None:
        """OffsetInvalid unless blocks ``start .. start+count`` lie in the region (Crucible panics)."""
        if start < 0 or count < 0 or start + count > self.total_blocks:
            raise _fail(
                ErrorKind.OffsetInvalid, f"blocks {start}+{count} beyond the region's {self.total_blocks}"
            )

    def _pieces(self, start: int, count: int) -> list[tuple[RawExtent, int, int, int]]:
        """(extent, extent-relative start, count, offset in blocks into the request); an
        IoError if one of them is closed (Crucible panics)."""
        out = []
        done = 0
        while done < count:
            block = start + done
            eid, rel = divmod(block, self.extent_blocks)
            n = min(count - done, self.extent_blocks - rel)
            if eid in self.closed:
                raise _fail(ErrorKind.IoError, f"extent {eid} is closed")
            out.append((self.extents[eid], rel, n, done))
            done += n
        return out

    # -- repair: close, flush one, download into scratch directories, reopen -----------------------
    def _check_extent(self, eid: int, *, is_open: bool) -> None:
        """InvalidExtent if ``eid`` is not in the region; GenericError unless it is open (or
        closed, as ``is_open`` says). Crucible panics on either."""
        if not 0 <= eid < self.definition.extent_count:
            raise _fail(
                ErrorKind.InvalidExtent, f"extent {eid} is not in a region of {self.definition.extent_count}"
            )
        if (eid in self.closed) == is_open:
            state = "closed" if is_open else "open"
            raise _fail(ErrorKind.GenericError, f"extent {eid} is {state}")

    def close_extent(self, eid: int) -> tuple[int, int, bool]:
        """Close an open extent for repair; its (gen, flush, dirty) as ExtentLiveCloseAck carries."""
        self._check_extent(eid, is_open=True)
        ext = self.extents[eid]
        ext.close()
        self.closed.add(eid)
        return ext.gen, ext.flush, ext.dirty

    def flush_one(self, eid: int, flush_number: int, gen_number: int) -> None:
        """Flush just extent ``eid`` (if dirty) with these numbers (ExtentFlush)."""
        self._check_extent(eid, is_open=True)
        if self.read_only and self.extents[eid].dirty:
            raise _fail(ErrorKind.ModifyingReadOnlyRegion)
        self.extents[eid].flush_extent(flush_number, gen_number)

    def reopen_extent(self, eid: int) -> None:
        """Open a closed extent again from its file (finishing a pending replacement first)."""
        self._check_extent(eid, is_open=False)
        try:
            ext = RawExtent.open(self.dir, eid, self.block_size, self.extent_blocks, self.read_only)
        except ExtentFailure as exc:
            # as Crucible: the open's error reaches the wire as a GenericError carrying its text
            raise _fail(ErrorKind.GenericError, str(exc)) from exc
        self.extents[eid] = ext
        self.closed.discard(eid)
        if ext.dirty:
            self.dirty_extents.add(eid)

    def begin_repair(self, eid: int) -> Path:
        """The new, empty ``NNN.copy`` directory to download extent ``eid``'s file into; the
        extent must be closed and no earlier repair's scratch directory may be left (IoError)."""
        self._check_extent(eid, is_open=False)
        if self.read_only:
            raise _fail(ErrorKind.ModifyingReadOnlyRegion)
        for stage in ("replace", "copy"):
            if os.path.lexists(repair_dir(self.dir, eid, stage)):
                raise _fail(ErrorKind.IoError, f"extent {eid}: the {stage} directory already exists")
        copy = repair_dir(self.dir, eid, "copy")
        try:
            copy.mkdir(parents=True)
        except OSError as exc:
            raise _fail(ErrorKind.IoError, f"extent {eid}: creating the copy directory: {exc}") from exc
        return copy

    def commit_repair(self, eid: int) -> None:
        """The download in ``NNN.copy`` is complete and synced: rename it to ``NNN.replace`` and
        copy it over the extent (:func:`finish_replacement`). The extent stays closed."""
        self._check_extent(eid, is_open=False)
        try:
            os.rename(repair_dir(self.dir, eid, "copy"), repair_dir(self.dir, eid, "replace"))
            _fsync_path(extent_dir(self.dir, eid))
            finish_replacement(self.dir, eid)
        except OSError as exc:
            raise _fail(ErrorKind.IoError, f"extent {eid}: replacing the extent: {exc}") from exc

    def read(self, start: int, count: int) -> tuple[bytes, Sequence[ReadBlockContext]]:
        self.check_range(start, count)
        pieces = [ext.read(rel, n) for ext, rel, n, _ in self._pieces(start, count)]
        if len(pieces) == 1:
            return pieces[0]
        data = b"".join(d for d, _ in pieces)
        if pieces and all(type(c) is PlainReadContexts for _, c in pieces):
            return data, _joined([c for _, c in pieces])  # type: ignore[misc]
        contexts: list[ReadBlockContext] = []
        for _, c in pieces:
            contexts += c
        return data, contexts

    def validate_hashes(self, data: bytes | memoryview, contexts: Sequence[BlockContext]) -> None:
        bs = self.block_size
        if len(data) != len(contexts) * bs:
            raise _fail(
                ErrorKind.DataLenUnaligned, f"{len(data)} bytes of data for {len(contexts)} block contexts"
            )
        if type(contexts) is PlainContexts:
            if block_hashes(data, bs) != contexts.hashes:
                raise _fail(ErrorKind.HashMismatch)
            return
        view = memoryview(data)
        for i, ctx in enumerate(contexts):
            if _stored_hash(ctx, view[i * bs : (i + 1) * bs]) != ctx.hash:
                raise _fail(ErrorKind.HashMismatch)

    def write(
        self,
        start: int,
        data: bytes | memoryview,
        contexts: Sequence[BlockContext],
        only_unwritten: bool = False,
    ) -> None:
        """Hashes first (HashMismatch, nothing written), then each extent's part."""
        if self.read_only:
            raise _fail(ErrorKind.ModifyingReadOnlyRegion)
        self.check_range(start, len(contexts))
        self.validate_hashes(data, contexts)
        view = memoryview(data)
        bs = self.block_size
        for ext, rel, n, off in self._pieces(start, len(contexts)):
            self.dirty_extents.add(ext.number)
            ext.write(
                rel, view[off * bs : (off + n) * bs], contexts[off : off + n], only_unwritten, validated=True
            )

    def flush(self, flush_number: int, gen_number: int, extent_limit: int | None = None) -> None:
        """Stamp every dirty extent (up to ``extent_limit`` inclusive), then fsync them."""
        if extent_limit is not None and extent_limit > self.definition.extent_count:
            raise _fail(ErrorKind.InvalidExtent)
        chosen = sorted(
            e
            for e in self.dirty_extents
            if (extent_limit is None or e <= extent_limit) and e not in self.closed
        )  # a closed extent stays a candidate for the flush after its reopen (Crucible panics)
        for eid in chosen:
            self.extents[eid].flush_extent(flush_number, gen_number)
        self.dirty_extents.difference_update(chosen)
