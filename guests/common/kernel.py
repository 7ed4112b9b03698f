"""Debian's kernel for an initramfs guest: the vmlinuz and the modules to ``insmod``, in order.

The tiny and alpine recipes boot the same kernel package with the same drivers (virtio and
NVMe); this downloads and unpacks it and orders the modules from its ``modules.dep``
(``kmods.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from guests.common import debian, kmods

__all__ = ["FAST_BOOT_ARGS", "WANTED_MODULES", "KernelParts", "kernel_parts"]

# virtio_pci is the transport the others sit on and no driver depends on it,
# so it must be named explicitly. virtio_net is cheap (three small modules).
WANTED_MODULES = ("virtio_pci", "virtio_blk", "nvme", "virtio_net")

# Kernel arguments that take work off a boot under TCG (2.08 -> 1.82-1.94 CPU-s to the tiny
# guest's login prompt, median of 3, measured by hand): no crypto self-tests at boot, no PS/2
# mouse or PnP probing, a TSC trusted without the clocksource watchdog and the timer check
# (on a loaded host TCG's timers jitter and the watchdog may demote the TSC to a slower clock).
FAST_BOOT_ARGS = "cryptomgr.notests i8042.noaux i8042.nopnp tsc=reliable no_timer_check"

Log = Callable[[str], None]


def _kernel_version(root: Path) -> str:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise debian.DebianError(f"expected one boot/vmlinuz-* in the kernel package, found {len(kernels)}")
    return kernels[0].name.removeprefix("vmlinuz-")


def _modules_dep(moddir: Path, version: str, root: Path) -> str:
    """``modules.dep`` of the unpacked kernel, generated with depmod when the package lacks it.

    Debian generates modules.dep at install time (postinst), so a package that was
    only unpacked has none.
    """
    dep = moddir / "modules.dep"
    if not dep.exists():
        debian.run_tool(
            ["depmod", "-b", str(root), version],
            hint="depmod comes from the 'kmod' package: run ci/bootstrap",
        )
    return dep.read_text()


@dataclass(frozen=True)
class KernelParts:
    vmlinuz: Path
    version: str
    modules: tuple[tuple[str, bytes], ...]  # (name, plain ELF bytes) in load order


def kernel_parts(kernel: debian.Package, work: Path, log: Log) -> KernelParts:
    """Download and unpack Debian's kernel; the vmlinuz and the modules to load, in order."""
    log(f"downloading {kernel}")
    deb = debian.download(kernel, work)
    root = work / "kernel-root"
    log(f"unpacking {deb.name}")
    debian.unpack(deb, root)
    version = _kernel_version(root)
    moddir = root / "lib" / "modules" / version
    deps = kmods.parse_modules_dep(_modules_dep(moddir, version, root))
    builtin_file = moddir / "modules.builtin"
    builtin = kmods.parse_builtin(builtin_file.read_text()) if builtin_file.exists() else set()
    order = kmods.load_order(deps, WANTED_MODULES, builtin)
    log(f"modules in load order: {' '.join(m.name for m in order)}")
    modules = tuple((m.name, kmods.read_module(moddir / m.relpath)) for m in order)
    return KernelParts(root / "boot" / f"vmlinuz-{version}", version, modules)
