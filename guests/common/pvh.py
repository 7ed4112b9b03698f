"""The guest's kernel as a plain ELF with a PVH entry point, for QEMU's direct kernel boot.

Why: Debian ships its kernel as an XZ-compressed bzImage. Booted with ``-kernel`` under TCG,
SeaBIOS's linuxboot path copies it through fw_cfg and the kernel's own decompressor inflates
~65 MB in emulated code before the kernel's first instruction: 3.7 s of the tiny guest's 6.3 s
to ``login:`` here. The same kernel's ELF image (the bzImage's payload) carries a Xen PVH note
(CONFIG_PVH), so QEMU loads its segments itself and jumps to the 32-bit PVH entry: the tiny
guest reaches ``login:`` in about 2.6 s. Nothing changes inside the guest - same kernel build,
same initrd, same command line; only the loader differs.

Firmware boot (OVMF) keeps the bzImage: the unified kernel image needs its EFI stub.

``extract_pvh_elf`` returns None (the recipe then ships the bzImage as the kernel) when the
payload is compressed in a way Python's standard library cannot inflate or the ELF has no PVH
note, so a different kernel build still boots, just slower.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

__all__ = ["PVH_KERNEL_NAME", "direct_boot_kernel", "extract_pvh_elf", "has_pvh_note"]

PVH_KERNEL_NAME = "vmlinux"
_ELF_MAGIC = b"\x7fELF"
_PT_NOTE = 4
_XEN_NOTE_OWNER = b"Xen\x00"
_XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point QEMU looks for
# bzImage setup header (Documentation/arch/x86/boot.rst): "HdrS" at 0x202, the number of
# 512-byte setup sectors at 0x1f1, payload_offset/payload_length at 0x248/0x24c (protocol 2.08+).
_HDRS_AT = 0x202
_MAX_ELF_BYTES = 512 << 20  # a hostile or broken payload must not inflate without bound


class PvhError(ValueError):
    """The file is not a kernel this module can turn into a PVH ELF."""


def _payload(bzimage: bytes) -> bytes:
    if bzimage[_HDRS_AT:_HDRS_AT + 4] != b"HdrS":
        raise PvhError("not a bzImage (no HdrS setup header)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if length == 0 or start + length > len(bzimage):
        raise PvhError(f"payload {offset}+{length} is outside the {len(bzimage)}-byte image")
    return bzimage[start:start + length]


def _inflate(payload: bytes) -> bytes:
    """The payload's decompressed bytes (XZ, LZMA or gzip: what Debian's kernels use)."""
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload, _MAX_ELF_BYTES)
        if payload.startswith(b"\x1f\x8b"):
            return zlib.decompressobj(wbits=31).decompress(payload, _MAX_ELF_BYTES)
        if payload[:1] == b"\x5d":
            return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload, _MAX_ELF_BYTES)
    except (lzma.LZMAError, zlib.error, EOFError) as exc:
        raise PvhError(f"the compressed payload is damaged: {exc}") from None
    raise PvhError(f"the payload's compression ({payload[:4].hex()}) is not XZ, LZMA or gzip")


def _segment(elf: bytes, header: int) -> tuple[int, int]:
    """(p_offset, p_filesz) of the ELF64 program header at ``header``."""
    offset = struct.unpack_from("<Q", elf, header + 8)[0]
    filesz = struct.unpack_from("<Q", elf, header + 32)[0]
    return offset, filesz


def _elf_end(elf: bytes) -> int:
    """Where the ELF ends: the payload has the kernel's relocation table after it, which QEMU's
    ELF loader ignores and the guest does not need with PVH (no KASLR on that path)."""
    if elf[:4] != _ELF_MAGIC or elf[4] != 2 or elf[5] != 1:
        raise PvhError("the payload is not a little-endian 64-bit ELF")
    phoff, shoff = struct.unpack_from("<QQ", elf, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", elf, 0x36)
    end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    if phoff + phentsize * phnum > len(elf):
        raise PvhError(f"the ELF claims program headers up to byte {phoff + phentsize * phnum} "
                       f"but the payload has {len(elf)}")
    for i in range(phnum):
        p_offset, p_filesz = _segment(elf, phoff + i * phentsize)
        end = max(end, p_offset + p_filesz)
    if end > len(elf):
        raise PvhError(f"the ELF claims {end} bytes but the payload has {len(elf)}")
    return end


def has_pvh_note(elf: bytes) -> bool:
    """Whether one of the ELF's PT_NOTE segments holds Xen's PHYS32_ENTRY note."""
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        p_type = struct.unpack_from("<I", elf, base)[0]
        if p_type != _PT_NOTE:
            continue
        offset, size = _segment(elf, base)
        at, end = offset, min(offset + size, len(elf))
        while at + 12 <= end:
            namesz, descsz, kind = struct.unpack_from("<III", elf, at)
            name = elf[at + 12:at + 12 + namesz]
            if name == _XEN_NOTE_OWNER and kind == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_pvh_elf(bzimage: Path, dest: Path) -> str | None:
    """Write the bzImage's kernel ELF to ``dest`` if it can boot through PVH; None if written,
    else the reason it cannot (the caller ships the bzImage and says why)."""
    try:
        elf = _inflate(_payload(bzimage.read_bytes()))
        end = _elf_end(elf)
        if not has_pvh_note(elf):
            return "its ELF has no PVH entry note (a kernel built without CONFIG_PVH)"
    except (PvhError, struct.error, IndexError) as exc:
        return str(exc)
    dest.write_bytes(elf[:end])
    return None


def direct_boot_kernel(staging: Path, log: Callable[[str], None]) -> str:
    """The name of the kernel file in ``staging`` that direct kernel boot should load: the PVH
    ELF written beside ``vmlinuz``, or ``vmlinuz`` itself (with the reason logged)."""
    reason = extract_pvh_elf(staging / "vmlinuz", staging / PVH_KERNEL_NAME)
    if reason is None:
        log(f"direct kernel boot loads {PVH_KERNEL_NAME} (the kernel's ELF, PVH entry)")
        return PVH_KERNEL_NAME
    log(f"direct kernel boot loads vmlinuz (slower under TCG): no PVH kernel, {reason}")
    return "vmlinuz"
