"""Assemble the debian guest: mmdebstrap a root tree, configure it, pack it into a disk image.

The disk boots through UEFI firmware as well as by direct kernel boot: a GPT disk with an EFI
system partition (the kernel, initrd and command line as one unified kernel image, see
``guests/common/efi.py``) and the ext4 root file system as partition 2 (``/dev/vda2``).

Pure mechanics with no caching: ``build.py`` decides whether to call this and moves
the result into place. Needs root: mmdebstrap's root mode and ``mke2fs -d`` record the
tree's file owners as they are on disk, so the tree must be written by real root
(no fakeroot, no loop mounts).
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from guests.common import debian, efi, pvh

__all__ = [
    "DISK_SIZE",
    "MASKED_UNITS",
    "ROOTFS_DIR",
    "SUITE",
    "Assembled",
    "apt_sources",
    "assemble",
    "check_drivers",
    "customize",
    "empty_root_password",
    "mke2fs_argv",
    "mmdebstrap_argv",
    "parse_kernel_config",
    "write_disk",
]

RECIPE_DIR = Path(__file__).resolve().parent
ROOTFS_DIR = RECIPE_DIR / "rootfs"
INITRAMFS_DIR = RECIPE_DIR / "initramfs"
SUITE = "bookworm"
# Sparse: the image holds about 300 MB; the rest is room for what tests write.
DISK_SIZE = "2G"
DISK_BYTES = 2 << 30
ROOT_DEVICE = "/dev/vda2"

# Units that only cost boot time here: gettys on virtual terminals nobody sees (the VM
# has no display; Debian's getty-static starts tty2-6 when logind is absent) and the
# e2scrub snapshot reaper (no LVM).
MASKED_UNITS = ("getty-static.service", "getty@tty1.service", "e2scrub_reap.service")
# systemd-networkd brings up the NIC by DHCP (rootfs/etc/systemd/network); enabling it
# is what `systemctl enable` would do: the [Install] WantedBy links.
ENABLED_UNITS = (
    ("multi-user.target.wants", "systemd-networkd.service"),
    ("sockets.target.wants", "systemd-networkd.socket"),
)
# Drivers the guest needs, and where each may live: the root disk is virtio, so its
# driver must be built in or in the initrd; NVMe data disks may also be loaded by udev
# from the disk.
REQUIRED_DRIVERS = {
    "virtio_pci": ("CONFIG_VIRTIO_PCI", "virtio_pci"),
    "virtio_blk": ("CONFIG_VIRTIO_BLK", "virtio_blk"),
    "ext4": ("CONFIG_EXT4_FS", "ext4"),
}
OPTIONAL_DRIVERS = {
    "virtio_net": ("CONFIG_VIRTIO_NET", "virtio_net"),
    "nvme": ("CONFIG_BLK_DEV_NVME", "nvme"),
}
# Documentation, man pages and translations are a third of a minimal system and no test
# reads them; copyright files stay (licences travel with the image).
_DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"debian: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Assembled:
    """What one assembly produced, for guest.json."""

    kernel_version: str
    kernel_file: str  # what direct kernel boot loads: vmlinux (PVH ELF) or vmlinuz
    packages: dict[str, str]  # every installed package -> version
    drivers: dict[str, str]  # driver -> "builtin" | "initrd" | "module"


def apt_sources(etc_apt: Path = Path("/etc/apt")) -> list[Path]:
    """The host's apt source files, so the image comes from the mirror whose package lists
    pinned the versions (mmdebstrap pastes each file into the image's sources)."""
    found: list[Path] = []
    legacy = etc_apt / "sources.list"
    if legacy.is_file() and any(
        line.strip().startswith("deb ") for line in legacy.read_text(errors="replace").splitlines()
    ):
        found.append(legacy)
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        found += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources") and p.is_file())
    return found


def mmdebstrap_argv(
    packages: Sequence[debian.Package],
    target: Path,
    sources: Sequence[Path],
    initramfs: Path = INITRAMFS_DIR,
) -> list[str]:
    """mmdebstrap of a minimal system with exactly these package versions, into ``target``.

    The initramfs policy is put in place after the Essential packages and before the
    kernel, so the kernel's postinst builds the small initrd once.
    """
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--format=directory",
        "--include=" + ",".join(str(p) for p in packages),
        '--essential-hook=mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"',
        f"--essential-hook=upload {initramfs / 'phd.conf'} /etc/initramfs-tools/conf.d/phd.conf",
        f"--essential-hook=upload {initramfs / 'modules'} /usr/share/initramfs-tools/modules.d/phd",
    ]
    argv += [f"--dpkgopt={opt}" for opt in _DPKG_OPTIONS]
    argv += [SUITE, str(target)]
    # Without a source mmdebstrap uses deb.debian.org (plus updates and security).
    argv += [str(s) for s in sources]
    return argv


def mke2fs_argv(root: Path, image: Path, size: int, offset: int = 0) -> list[str]:
    """An ext4 file system of ``size`` bytes at byte ``offset`` of ``image`` (a partition),
    populated from ``root`` (``-d``): no mount, no loop device."""
    return ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "root", "-E", f"offset={offset}", "-d", str(root),
            str(image), f"{size // 1024}k"]


def write_disk(root: Path, image: Path, uki: Path, size: int = DISK_BYTES) -> efi.Partition:
    """``image``: GPT with the ESP (booting ``uki``) then the root file system filling the
    rest of ``size``; returns the root partition."""
    esp = efi.Partition("esp", efi.ESP_TYPE, efi.esp_size_for(uki.stat().st_size))
    rootfs = efi.Partition("root", efi.LINUX_TYPE, size - esp.size - 2 * efi.ALIGN)
    esp_at, root_at = efi.write_gpt(image, "debian", [esp, rootfs])
    efi.write_esp(image, esp_at, esp.size, {efi.BOOT_PATH: uki})
    debian.run_tool(mke2fs_argv(root, image, rootfs.size, root_at),
                    hint="mke2fs comes from e2fsprogs: run ci/bootstrap")
    return rootfs


def empty_root_password(shadow: str) -> str:
    """``/etc/shadow`` with root's password field emptied (login without a password)."""
    lines = shadow.splitlines(keepends=True)
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root" and len(fields) >= 2:
            fields[1] = ""
            lines[i] = ":".join(fields)
            return "".join(lines)
    raise debian.DebianError("the image's /etc/shadow has no root entry")


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy the recipe's overlay files as root-owned 0644 files (the checkout's owner and
    umask must not leak into the image)."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(mode=0o755, exist_ok=True)
            continue
        if target.is_symlink() or target.exists():
            target.unlink()
        shutil.copyfile(path, target)
        target.chmod(0o644)
        if os.geteuid() == 0:  # always in a build (it needs root); not in unit tests
            os.chown(target, 0, 0)


def _link(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def customize(root: Path, rootfs: Path = ROOTFS_DIR) -> None:
    """Configure the unpacked system: hostname, fstab, DHCP, root login, lean boot."""
    _copy_tree(rootfs, root)
    shadow = root / "etc" / "shadow"
    shadow.write_text(empty_root_password(shadow.read_text()))
    units = root / "etc" / "systemd" / "system"
    for unit in MASKED_UNITS:
        for wanted_by in units.glob(f"*.wants/{unit}"):
            wanted_by.unlink()
        _link(units / unit, "/dev/null")
    for target_wants, unit in ENABLED_UNITS:
        _link(units / target_wants / unit, f"/lib/systemd/system/{unit}")
    # Empty: systemd then makes a fresh machine id on every boot without treating it
    # as a first boot (mmdebstrap leaves it empty too; this keeps it so).
    (root / "etc" / "machine-id").write_text("")


def parse_kernel_config(text: str) -> dict[str, str]:
    """``CONFIG_X=y|m|...`` lines of a kernel config; unset options are absent."""
    config: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.startswith("CONFIG_"):
            config[key] = value
    return config


def check_drivers(config: dict[str, str], initrd_modules: Iterable[str]) -> dict[str, str]:
    """Where each driver lives (``builtin``, ``initrd`` or ``module``); raises when the
    root disk could not be mounted or an optional driver is missing altogether."""
    in_initrd = set(initrd_modules)
    found: dict[str, str] = {}
    for name, (option, module) in {**REQUIRED_DRIVERS, **OPTIONAL_DRIVERS}.items():
        value = config.get(option)
        if value == "y":
            found[name] = "builtin"
        elif value == "m" and module in in_initrd:
            found[name] = "initrd"
        elif value == "m" and name not in REQUIRED_DRIVERS:
            found[name] = "module"
        else:
            where = "neither built in nor in the initrd" if value == "m" else f"{option}={value}"
            raise debian.DebianError(
                f"the kernel cannot {'boot from vda' if name in REQUIRED_DRIVERS else 'drive ' + name}: "
                f"{name} is {where}; check guests/debian/initramfs/modules"
            )
    return found


def _initrd_modules(root: Path, initrd: str) -> set[str]:
    """Module names inside the initrd, listed by the image's own initramfs-tools."""
    listing = debian.run_tool(
        ["chroot", str(root), "lsinitramfs", initrd], hint="the image's initramfs-tools is broken"
    )
    return {Path(line).name.removesuffix(".ko") for line in listing.splitlines() if line.endswith(".ko")}


def _installed(root: Path) -> dict[str, str]:
    listing = debian.run_tool(
        ["dpkg-query", f"--admindir={root / 'var' / 'lib' / 'dpkg'}", "-W", "-f", "${Package}\t${Version}\n"],
        hint="dpkg-query comes with dpkg",
    )
    return dict(line.split("\t", 1) for line in listing.splitlines() if "\t" in line)


def run_logged(argv: list[str], *, hint: str, log: Log, prefix: str) -> None:
    """Run a long tool with its stderr forwarded as progress; on failure raise with its tail."""
    tail: collections.deque[str] = collections.deque(maxlen=10)
    try:
        proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    except FileNotFoundError as exc:
        raise debian.DebianError(f"{argv[0]!r} is not installed: {hint}") from exc
    assert proc.stderr is not None
    with proc:
        for raw in proc.stderr:
            line = raw.rstrip()
            tail.append(line)
            log(f"{prefix}: {line}")
    if proc.returncode != 0:
        raise debian.DebianError(f"{argv[0]} exited with {proc.returncode}: {tail[-1] if tail else ''}; "
                                 f"hint: {hint}")


def _kernel_version(root: Path) -> str:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise debian.DebianError(f"expected one /boot/vmlinuz-* in the image, found {len(kernels)}")
    return kernels[0].name.removeprefix("vmlinuz-")


def assemble(
    packages: Sequence[debian.Package],
    work: Path,
    staging: Path,
    *,
    cmdline: str,
    log: Log = _stderr,
) -> Assembled:
    """Write ``vmlinuz``, ``initrd.img``, ``cmdline`` and ``disk.raw`` into ``staging``.
    ``packages`` must include systemd-boot-efi: its EFI stub makes the unified kernel image."""
    root = work / "root"
    run_logged(
        mmdebstrap_argv(packages, root, apt_sources()),
        hint="run 'apt-get update' (the pinned versions come from the host's package lists) "
        "and check that the Debian mirror is reachable",
        log=log,
        prefix="mmdebstrap",
    )
    version = _kernel_version(root)
    config = parse_kernel_config((root / "boot" / f"config-{version}").read_text())
    drivers = check_drivers(config, _initrd_modules(root, f"/boot/initrd.img-{version}"))
    log("drivers: " + ", ".join(f"{name} {where}" for name, where in drivers.items()))
    shutil.copyfile(root / "boot" / f"vmlinuz-{version}", staging / "vmlinuz")
    kernel_file = pvh.direct_boot_kernel(staging, log)
    shutil.copyfile(root / "boot" / f"initrd.img-{version}", staging / "initrd.img")
    installed = _installed(root)
    customize(root)
    stub = root / efi.STUB_MEMBER
    if not stub.is_file():
        raise debian.DebianError(f"the image has no {efi.STUB_MEMBER}: is {efi.STUB_PACKAGE} in PACKAGES?")
    uki = efi.make_uki(stub, staging / "vmlinuz", staging / "initrd.img", cmdline, "debian", work)
    log(f"writing the {DISK_SIZE} disk image (GPT: EFI system partition, ext4 root)")
    write_disk(root, staging / "disk.raw", uki)
    (staging / "cmdline").write_text(cmdline + "\n")
    return Assembled(kernel_version=version, kernel_file=kernel_file, packages=installed, drivers=drivers)
