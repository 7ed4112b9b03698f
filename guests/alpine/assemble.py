"""Assemble the alpine guest: the official minirootfs + Debian's kernel and modules.

The minirootfs tarball is only a userland (musl, busybox, apk; no kernel, no OpenRC). It
boots as an initramfs with ``rdinit=/sbin/init`` (busybox init) once the recipe has:

- replaced ``/etc/inittab`` (mount devtmpfs/proc/sysfs, load the modules, set the
  hostname, a getty on ttyS0) and ``/etc/hostname`` (``localhost``),
- emptied root's password in ``/etc/shadow`` and put ``ttyS0`` in ``/etc/securetty``,
- added Debian's virtio and NVMe modules with their load order (``/etc/phd/modules``).

Pure mechanics with no caching: ``build.py`` decides whether to call this and moves the
result into place. The kernel side is tiny's too (same package, same module selection),
from ``guests/common/kernel.py``.
"""

from __future__ import annotations

import shutil
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from guests.common import debian, efi, pvh
from guests.common.cpio import Archive, ArchiveError

# The kernel step tiny has too (download and unpack Debian's kernel, the modules to load in
# order): the same kernel and drivers as tiny, one copy.
from guests.common.kernel import kernel_parts

__all__ = [
    "MODULE_DIR",
    "ROOTFS_DIR",
    "Assembled",
    "AssemblyError",
    "assemble",
    "rootfs_archive",
]

ROOTFS_DIR = Path(__file__).resolve().parent / "rootfs"
# Outside /lib/modules: that tree belongs to Alpine's (absent) kernel and its tools.
MODULE_DIR = "/lib/phd-modules"
# The files whose presence tells a minirootfs from any other tarball.
_REQUIRED = ("etc/alpine-release", "bin/busybox", "sbin/init", "etc/passwd", "etc/shadow")
_MODES = {"etc/phd/load-modules": 0o755}

Log = Callable[[str], None]


class AssemblyError(Exception):
    """The inputs cannot make an alpine guest; the message says which and why."""


def _stderr(message: str) -> None:
    print(f"alpine: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Assembled:
    """What one assembly produced, for guest.json."""

    kernel_version: str
    kernel_file: str  # what direct kernel boot loads: vmlinux (PVH ELF) or vmlinuz
    modules: tuple[str, ...]
    alpine_release: str
    entries: int


@dataclass
class _Node:
    """One rootfs entry between the tarball and the archive, so the recipe can replace files."""

    kind: str  # "dir" | "file" | "symlink" | "chardev"
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _read_tarball(path: Path) -> dict[str, _Node]:
    """The minirootfs as guest path (no leading '/') -> node; hard links become copies."""
    nodes: dict[str, _Node] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
            by_name = {PurePosixPath(m.name).as_posix().removeprefix("./"): m for m in members}
            for member in members:
                name = PurePosixPath(member.name).as_posix().removeprefix("./").rstrip("/")
                if name in ("", "."):
                    continue
                if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                    raise AssemblyError(f"{path}: member {member.name!r} escapes the root")
                mode = member.mode & 0o7777
                if member.isdir():
                    nodes[name] = _Node("dir", mode)
                elif member.issym():
                    nodes[name] = _Node("symlink", 0o777, member.linkname.encode())
                elif member.islnk():
                    target = by_name.get(member.linkname.removeprefix("./"))
                    if target is None or not target.isfile():
                        raise AssemblyError(f"{path}: hard link {name} -> {member.linkname} has no target")
                    nodes[name] = _Node("file", mode, _file_bytes(tar, target))
                elif member.isfile():
                    nodes[name] = _Node("file", mode, _file_bytes(tar, member))
                elif member.ischr():
                    nodes[name] = _Node("chardev", mode, rdev=(member.devmajor, member.devminor))
                # Block devices and FIFOs: devtmpfs provides devices; nothing else needs them.
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise AssemblyError(f"{path} is not a readable tarball: {exc}") from exc
    missing = [name for name in _REQUIRED if name not in nodes]
    if missing:
        raise AssemblyError(f"{path} is not an Alpine minirootfs (it lacks {', '.join(missing)}): "
                            "pass alpine-minirootfs-<version>-x86_64.tar.gz")
    return nodes


def _file_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:
        raise AssemblyError(f"cannot read {member.name} from the tarball")
    with handle:
        return handle.read()


def _passwordless_root(shadow: bytes) -> bytes:
    """Empty root's password field (the minirootfs locks it with ``*``); keep other users."""
    lines = shadow.decode().splitlines()
    out, seen = [], False
    for line in lines:
        fields = line.split(":")
        if fields[0] == "root" and len(fields) > 1:
            fields[1] = ""
            line, seen = ":".join(fields), True
        out.append(line)
    if not seen:
        out.insert(0, "root::19000:0:99999:7:::")
    return ("\n".join(out) + "\n").encode()


def _with_line(text: bytes, wanted: str) -> bytes:
    lines = text.decode().splitlines()
    if wanted not in lines:
        lines.append(wanted)
    return ("\n".join(lines) + "\n").encode()


def rootfs_archive(minirootfs: Path, modules: tuple[tuple[str, bytes], ...],
                   rootfs: Path = ROOTFS_DIR) -> tuple[Archive, str]:
    """The initramfs tree: minirootfs, the recipe's overlay, the modules; and the release."""
    nodes = _read_tarball(minirootfs)
    release = nodes["etc/alpine-release"].data.decode().strip()
    for path in sorted(rootfs.rglob("*")):
        rel = path.relative_to(rootfs).as_posix()
        if path.is_dir():
            nodes.setdefault(rel, _Node("dir", 0o755))
        else:
            nodes[rel] = _Node("file", _MODES.get(rel, 0o644), path.read_bytes())
    shadow = nodes["etc/shadow"]
    is_file = shadow.kind == "file"
    nodes["etc/shadow"] = _Node("file", shadow.mode if is_file else 0o600,
                                _passwordless_root(shadow.data if is_file else b""))
    securetty = nodes.get("etc/securetty")
    nodes["etc/securetty"] = _Node("file", 0o644, _with_line(
        securetty.data if securetty is not None and securetty.kind == "file" else b"", "ttyS0"))
    nodes["etc/phd/modules"] = _Node("file", 0o644, "".join(f"{name}\n" for name, _ in modules).encode())
    for name, data in modules:
        nodes[f"{MODULE_DIR[1:]}/{name}.ko"] = _Node("file", 0o644, data)
    for directory, mode in (("dev", 0o755), ("proc", 0o555), ("sys", 0o555), ("run", 0o755),
                            ("tmp", 0o1777), ("root", 0o700)):
        nodes.setdefault(directory, _Node("dir", mode))
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    nodes.setdefault("dev/console", _Node("chardev", 0o600, rdev=(5, 1)))

    archive = Archive()
    try:
        # Sorted: a directory's own entry (and mode) comes before its children.
        for name in sorted(nodes):
            node = nodes[name]
            if node.kind == "dir":
                archive.add_dir("/" + name, node.mode)
            elif node.kind == "file":
                archive.add_file("/" + name, node.data, node.mode)
            elif node.kind == "symlink":
                archive.add_symlink("/" + name, node.data.decode())
            else:
                archive.add_chardev("/" + name, *node.rdev, mode=node.mode)
    except ArchiveError as exc:
        raise AssemblyError(f"{minirootfs}: {exc}") from exc
    return archive, release


def assemble(
    kernel: debian.Package,
    minirootfs: Path,
    work: Path,
    staging: Path,
    *,
    cmdline: str,
    stub: debian.Package,
    log: Log = _stderr,
) -> Assembled:
    """Write ``vmlinuz``, ``initrd.img``, ``cmdline`` and ``boot.raw`` (the same three as a
    firmware-bootable disk) into ``staging``."""
    parts = kernel_parts(kernel, work, log)
    shutil.copyfile(parts.vmlinuz, staging / "vmlinuz")
    kernel_file = pvh.direct_boot_kernel(staging, log)
    log(f"reading {minirootfs.name}")
    archive, release = rootfs_archive(minirootfs, parts.modules)
    log(f"writing initramfs (Alpine {release}, {len(archive)} entries)")
    (staging / "initrd.img").write_bytes(archive.to_gzip())
    (staging / "cmdline").write_text(cmdline + "\n")
    uki = efi.make_uki(efi.fetch_stub(stub, work, log), staging / "vmlinuz", staging / "initrd.img",
                       cmdline, "alpine", work)
    efi.write_esp_disk(staging / "boot.raw", "alpine", uki)
    return Assembled(kernel_version=parts.version, kernel_file=kernel_file,
                     modules=tuple(name for name, _ in parts.modules),
                     alpine_release=release, entries=len(archive))
