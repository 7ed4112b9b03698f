"""Assemble the tiny guest from Debian packages: kernel, modules, busybox, rootfs.

Pure mechanics with no caching: ``build.py`` decides whether to call this and
moves the result into place.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from guests.common import debian, efi, pvh
from guests.common.cpio import Archive
from guests.common.kernel import kernel_parts

__all__ = ["ROOTFS_DIR", "Assembled", "add_rootfs", "assemble"]

ROOTFS_DIR = Path(__file__).resolve().parent / "rootfs"

# Files that must not be world-readable/executable defaults.
_MODES = {"init": 0o755, "etc/shadow": 0o600, "etc/udhcpc/default.script": 0o755}

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"tiny: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Assembled:
    """What one assembly produced, for guest.json."""

    kernel_version: str
    kernel_file: str  # what direct kernel boot loads: vmlinux (PVH ELF) or vmlinuz
    modules: tuple[str, ...]
    busybox_applets: int


def add_rootfs(archive: Archive, rootfs: Path = ROOTFS_DIR) -> None:
    """Copy the recipe's rootfs files (``/init``, ``/etc/*``) into the archive."""
    for path in sorted(rootfs.rglob("*")):
        rel = path.relative_to(rootfs).as_posix()
        if path.is_dir():
            archive.add_dir("/" + rel)
        else:
            archive.add_file("/" + rel, path.read_bytes(), _MODES.get(rel, 0o644))
    for directory in ("/dev", "/proc", "/sys", "/tmp", "/run", "/root"):
        archive.add_dir(directory, 0o1777 if directory == "/tmp" else 0o755)
    # The kernel opens /dev/console for /init before devtmpfs is mounted.
    archive.add_chardev("/dev/console", 5, 1)


def _busybox_binary(package: debian.Package, work: Path, log: Log) -> Path:
    """The busybox-static binary: the host's copy if it is that version, else a download."""
    if debian.installed_version(package.name) == package.version:
        owned = debian.owned_path(package.name, "/bin/busybox")
        if owned is not None:
            log(f"using installed {package} (/bin/busybox)")
            return owned
    log(f"downloading {package}")
    deb = debian.download(package, work)
    root = work / "busybox-root"
    debian.unpack(deb, root)
    binary = root / "bin" / "busybox"
    if not binary.is_file():
        raise debian.DebianError(f"{deb} has no bin/busybox: is it busybox-static?")
    return binary


def _add_busybox(archive: Archive, binary: Path) -> int:
    """Install busybox and one symlink per applet (what ``busybox --install -s`` does)."""
    archive.add_file("/bin/busybox", binary.read_bytes(), 0o755)
    # busybox-static runs on the build host, so ask it for its own applet list.
    listing = debian.run_tool([str(binary), "--list-full"], hint="busybox binary is broken")
    count = 0
    for applet in listing.split():
        target = "/" + applet
        if target != "/bin/busybox" and target not in archive:
            archive.add_symlink(target, "/bin/busybox")
            count += 1
    return count


def assemble(
    kernel: debian.Package,
    busybox: debian.Package,
    work: Path,
    staging: Path,
    *,
    cmdline: str,
    stub: debian.Package,
    log: Log = _stderr,
) -> Assembled:
    """Write ``vmlinuz`` (and its PVH ``vmlinux``), ``initrd.img``, ``cmdline`` and ``boot.raw``
    into ``staging``."""
    parts = kernel_parts(kernel, work, log)
    shutil.copyfile(parts.vmlinuz, staging / "vmlinuz")
    kernel_file = pvh.direct_boot_kernel(staging, log)

    archive = Archive()
    add_rootfs(archive)
    for name, elf in parts.modules:
        archive.add_file(f"/lib/modules/{name}.ko", elf)
    archive.add_file("/etc/phd-modules", "".join(f"{name}\n" for name, _ in parts.modules).encode())
    applets = _add_busybox(archive, _busybox_binary(busybox, work, log))

    log(f"writing initramfs ({len(archive)} entries)")
    (staging / "initrd.img").write_bytes(archive.to_gzip())
    (staging / "cmdline").write_text(cmdline + "\n")
    log("writing boot.raw (GPT, EFI system partition, unified kernel image)")
    uki = efi.make_uki(efi.fetch_stub(stub, work, log), staging / "vmlinuz", staging / "initrd.img",
                       cmdline, "tiny", work)
    efi.write_esp_disk(staging / "boot.raw", "tiny", uki)
    return Assembled(kernel_version=parts.version, kernel_file=kernel_file,
                     modules=tuple(name for name, _ in parts.modules),
                     busybox_applets=applets)
