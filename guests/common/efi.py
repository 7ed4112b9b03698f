"""Firmware-bootable disk images: GPT, an EFI system partition, one unified kernel image.

UEFI firmware (OVMF here, Propolis's bootrom on the real thing) boots a disk with no boot
entries of its own by running ``\\EFI\\BOOT\\BOOTX64.EFI`` from the disk's EFI system
partition (the "removable media" path). That file is a unified kernel image (UKI): systemd's
EFI stub with the kernel, the initrd and the command line added as PE sections, so one
firmware load starts Linux with no boot loader menu and no timeout - the fast path under TCG.

Host tools, none run as a daemon and none needs root or a loop device:
- ``objcopy`` (binutils) adds the sections to the stub;
- ``sfdisk`` (fdisk) writes the partition table into the image file;
- ``mkfs.fat --offset`` (dosfstools) formats the ESP inside the image;
- ``mmd``/``mcopy`` (mtools) copy into it by byte offset (``image@@offset``).
The stub comes from Debian's ``systemd-boot-efi`` package, downloaded and unpacked, never
installed. Partition and disk GUIDs are derived from names, so a rebuild of the same inputs
lays the disk out identically.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from guests.common import debian

__all__ = [
    "ALIGN",
    "BOOT_PATH",
    "ESP_TYPE",
    "LINUX_TYPE",
    "STUB_MEMBER",
    "STUB_PACKAGE",
    "Partition",
    "disk_layout",
    "esp_size_for",
    "fetch_stub",
    "guid",
    "make_uki",
    "sfdisk_script",
    "stub_package",
    "uki_argv",
    "write_esp",
    "write_esp_disk",
    "write_gpt",
]

STUB_PACKAGE = "systemd-boot-efi"
STUB_MEMBER = Path("usr/lib/systemd/boot/efi/linuxx64.efi.stub")
# The path firmware tries on a disk it has no boot entry for (UEFI spec 3.5.1.1).
BOOT_PATH = "EFI/BOOT/BOOTX64.EFI"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
SECTOR = 512
MIB = 1 << 20
# Partitions start on MiB boundaries; the last MiB is left for the backup GPT (33 sectors).
ALIGN = MIB
# Where the stub finds what objcopy adds: virtual addresses above the stub's own image
# (its sections end below 0x20000) and apart from each other. The kernel gets the space
# from 32 MiB; the initrd follows it on the next MiB boundary, so no kernel size overlaps.
_OSREL_VMA = 0x20000
_CMDLINE_VMA = 0x30000
_LINUX_VMA = 0x2000000
# Namespace for the GUIDs derived from names (reproducible layouts).
_GUID_NAMESPACE = uuid.UUID("2f7f4c1e-8b3a-4d2e-9a51-7d0c1f6e3b90")

Log = Callable[[str], None]


@dataclass(frozen=True)
class Partition:
    """One GPT partition: its name (GPT label), type GUID and size in bytes (MiB multiple)."""

    name: str
    type_guid: str
    size: int

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % ALIGN:
            raise ValueError(f"partition {self.name}: size {self.size} is not a positive multiple of 1 MiB")


def guid(*names: str) -> str:
    """A GUID that depends only on ``names`` (uuid5), upper case as sfdisk prints it."""
    return str(uuid.uuid5(_GUID_NAMESPACE, "/".join(names))).upper()


def disk_layout(partitions: Sequence[Partition]) -> tuple[list[int], int]:
    """Each partition's byte offset, and the disk size: 1 MiB before the first partition
    (protective MBR, primary GPT), partitions back to back, 1 MiB after (backup GPT)."""
    offsets = []
    at = ALIGN
    for part in partitions:
        offsets.append(at)
        at += part.size
    return offsets, at + ALIGN


def sfdisk_script(disk_name: str, partitions: Sequence[Partition]) -> str:
    """sfdisk's input for a GPT with these partitions at the offsets of `disk_layout`."""
    offsets, _ = disk_layout(partitions)
    lines = ["label: gpt", f"label-id: {guid(disk_name)}", "unit: sectors", ""]
    for part, offset in zip(partitions, offsets, strict=True):
        lines.append(f'start={offset // SECTOR}, size={part.size // SECTOR}, type={part.type_guid}, '
                     f'uuid={guid(disk_name, part.name)}, name="{part.name}"')
    return "\n".join(lines) + "\n"


def write_gpt(image: Path, disk_name: str, partitions: Sequence[Partition]) -> list[int]:
    """Make ``image`` a sparse disk with this partition table; returns the partitions' offsets."""
    offsets, size = disk_layout(partitions)
    with image.open("wb") as f:
        f.truncate(size)
    debian.run_tool(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(image)],
                    stdin_text=sfdisk_script(disk_name, partitions),
                    hint="sfdisk comes from the 'fdisk' package: run ci/bootstrap")
    return offsets


def write_esp(image: Path, offset: int, size: int, files: dict[str, Path], *, label: str = "ESP") -> None:
    """Format a FAT file system at ``offset`` of ``image`` and copy ``files`` (path inside ->
    host file) into it, making the folders on the way."""
    hint = "mkfs.fat comes from 'dosfstools', mmd and mcopy from 'mtools': run ci/bootstrap"
    # mkfs.fat takes the offset in sectors and the size in KiB blocks. FAT16 named, not
    # guessed: mkfs.fat sizes its guess by the whole image file, not the partition.
    debian.run_tool(["mkfs.fat", "-F", "16", "-n", label, "-i", guid(label)[:8],
                     "--offset", str(offset // SECTOR), str(image), str(size // 1024)], hint=hint)
    target = f"{image}@@{offset}"
    made: set[str] = set()
    for inside in sorted(files):
        parts = inside.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            folder = "::/" + "/".join(parts[:depth])
            if folder not in made:
                debian.run_tool(["mmd", "-i", target, folder], hint=hint)
                made.add(folder)
        debian.run_tool(["mcopy", "-i", target, str(files[inside]), f"::/{inside}"], hint=hint)


def fetch_stub(package: debian.Package, work: Path, log: Log) -> Path:
    """Debian's systemd EFI stub (``linuxx64.efi.stub``), downloaded and unpacked into ``work``."""
    log(f"downloading {package}")
    deb = debian.download(package, work)
    root = work / "stub-root"
    debian.unpack(deb, root)
    stub = root / STUB_MEMBER
    if not stub.is_file():
        raise debian.DebianError(f"{deb.name} has no {STUB_MEMBER}: is it {STUB_PACKAGE}?")
    return stub


def uki_argv(stub: Path, kernel: Path, initrd: Path, cmdline: Path, osrel: Path, out: Path) -> list[str]:
    """objcopy that makes the UKI ``out`` from the stub and its four sections."""
    initrd_vma = -(-(_LINUX_VMA + kernel.stat().st_size) // MIB) * MIB
    sections = ((".osrel", osrel, _OSREL_VMA), (".cmdline", cmdline, _CMDLINE_VMA),
                (".linux", kernel, _LINUX_VMA), (".initrd", initrd, initrd_vma))
    argv = ["objcopy"]
    for name, path, vma in sections:
        argv += ["--add-section", f"{name}={path}", "--change-section-vma", f"{name}={vma:#x}"]
    return [*argv, str(stub), str(out)]


def make_uki(stub: Path, kernel: Path, initrd: Path, cmdline: str, os_name: str, work: Path) -> Path:
    """The unified kernel image for this kernel, initrd and command line, in ``work``."""
    cmdline_file = work / "uki.cmdline"
    # The stub hands the section to the kernel as is: no trailing newline.
    cmdline_file.write_text(cmdline.strip())
    osrel = work / "uki.os-release"
    osrel.write_text(f"NAME={os_name}\nID={os_name}\nPRETTY_NAME=\"phd {os_name} guest\"\n")
    out = work / "uki.efi"
    debian.run_tool(uki_argv(stub, kernel, initrd, cmdline_file, osrel, out),
                    hint="objcopy comes from 'binutils': run ci/bootstrap")
    return out


def esp_size_for(payload: int) -> int:
    """An ESP that holds ``payload`` bytes with room for FAT's own tables: whole MiB, >= 16 MiB
    (FAT16's smallest size with mkfs.fat's default 2 KiB clusters is 8 MiB; twice that is margin)."""
    return max(16 * MIB, -(-(payload * 9 // 8 + 2 * MIB) // MIB) * MIB)


def stub_package() -> debian.Package:
    """The systemd-boot-efi version apt would download now (an input of every recipe's hash)."""
    return debian.Package(STUB_PACKAGE, debian.candidate_version(STUB_PACKAGE))


def write_esp_disk(image: Path, disk_name: str, uki: Path) -> None:
    """``image``: a GPT disk whose only partition is an ESP booting ``uki`` - what an
    initramfs guest (tiny, alpine) needs to boot through firmware."""
    esp = Partition("esp", ESP_TYPE, esp_size_for(uki.stat().st_size))
    (offset,) = write_gpt(image, disk_name, [esp])
    write_esp(image, offset, esp.size, {BOOT_PATH: uki})
