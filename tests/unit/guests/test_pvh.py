"""The PVH kernel extraction (guests/common/pvh.py) on hand-made bzImages: the real Debian kernel
goes through it in every tiny guest build (tests/integration/guests/test_tiny_boot.py boots it)."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest

from guests.common.pvh import PVH_KERNEL_NAME, direct_boot_kernel, extract_pvh_elf, has_pvh_note

PT_LOAD, PT_NOTE = 1, 4


def _note(owner: bytes, kind: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)
    return struct.pack("<III", len(owner), len(desc), kind) + pad(owner) + pad(desc)


def make_elf(*, pvh: bool = True, body: bytes = b"\x90" * 256) -> bytes:
    """An ELF64 with one PT_LOAD (``body``) and one PT_NOTE (a Xen note: PVH entry or not)."""
    notes = _note(b"Xen\0", 6, b"linux\0") + _note(b"Xen\0", 18 if pvh else 17, b"\0\0\0\x01")
    ehsize, phentsize, phnum = 64, 56, 2
    load_at = ehsize + phentsize * phnum
    note_at = load_at + len(body)
    header = bytearray(ehsize)
    header[:16] = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    struct.pack_into("<HHIQQQIHHHHHH", header, 16, 2, 62, 1, 0x1000000, ehsize, 0, 0, ehsize,
                     phentsize, phnum, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", PT_LOAD, 5, load_at, 0x1000000, 0x1000000, len(body), len(body), 16)
    note = struct.pack("<IIQQQQQQ", PT_NOTE, 4, note_at, 0, 0, len(notes), len(notes), 4)
    return bytes(header) + load + note + body + notes


def make_bzimage(payload: bytes, *, setup_sects: int = 4, claimed: int | None = None) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", setup, 0x248, 0, len(payload) if claimed is None else claimed)
    return bytes(setup) + payload + b"\0" * 64  # the decompressor's own code/padding follows


RELOCS = b"\xee" * 1000  # the payload's relocation table after the ELF


@pytest.mark.parametrize("compress", [lambda b: lzma.compress(b, format=lzma.FORMAT_XZ), gzip.compress,
                                      lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE)],
                         ids=["xz", "gzip", "lzma"])
def test_the_elf_is_extracted_without_its_relocations(tmp_path: Path, compress: object) -> None:
    elf = make_elf()
    image = tmp_path / "vmlinuz"
    image.write_bytes(make_bzimage(compress(elf + RELOCS)))  # type: ignore[operator]
    assert extract_pvh_elf(image, tmp_path / "vmlinux") is None
    assert (tmp_path / "vmlinux").read_bytes() == elf


def test_a_kernel_without_the_pvh_note_is_refused_with_the_reason(tmp_path: Path) -> None:
    elf = make_elf(pvh=False)
    assert not has_pvh_note(elf) and has_pvh_note(make_elf())
    image = tmp_path / "vmlinuz"
    image.write_bytes(make_bzimage(lzma.compress(elf)))
    reason = extract_pvh_elf(image, tmp_path / "vmlinux")
    assert reason is not None and "PVH" in reason
    assert not (tmp_path / "vmlinux").exists()


@pytest.mark.parametrize(("image", "words"), [
    (b"MZ" + b"\0" * 4096, "not a bzImage"),
    (make_bzimage(b"\x28\xb5\x2f\xfd" + b"\0" * 64), "not XZ, LZMA or gzip"),
    (make_bzimage(b"\xfd7zXZ\x00" + b"\x01" * 64), "damaged"),
    (make_bzimage(lzma.compress(b"not an elf at all" * 10)), "not a little-endian 64-bit ELF"),
    (make_bzimage(lzma.compress(make_elf()[:150])), "claims"),
    (make_bzimage(b"x" * 100, claimed=0xFFFFFFFF), "outside"),
    (make_bzimage(b"", claimed=0), "outside"),
    (b"", "not a bzImage"),
], ids=["pe-only", "zstd", "damaged-xz", "not-elf", "truncated-elf", "huge-length", "empty-payload",
        "empty-file"])
def test_hostile_or_foreign_images_are_a_reason_not_a_traceback(tmp_path: Path, image: bytes,
                                                                words: str) -> None:
    path = tmp_path / "vmlinuz"
    path.write_bytes(image)
    reason = extract_pvh_elf(path, tmp_path / "vmlinux")
    assert reason is not None and words in reason, reason


def test_the_recipe_names_the_file_direct_boot_loads(tmp_path: Path) -> None:
    said: list[str] = []
    (tmp_path / "vmlinuz").write_bytes(make_bzimage(lzma.compress(make_elf())))
    assert direct_boot_kernel(tmp_path, said.append) == PVH_KERNEL_NAME
    (tmp_path / "vmlinuz").write_bytes(make_bzimage(lzma.compress(make_elf(pvh=False))))
    assert direct_boot_kernel(tmp_path, said.append) == "vmlinuz"
    assert "PVH entry" in said[0] and "no PVH kernel" in said[1]
