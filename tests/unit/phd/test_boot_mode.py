"""How a VM boots (VmFactory.boot_mode / guest_image): --phd-boot, a test's own choice, and
what each guest can do - without a server."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from phd.artifacts.store import GuestArtifact
from phd.core.errors import HarnessError
from phd.vm.factory import VmFactory


def _guest(tmp_path: Path, name: str, *, disk: bool, firmware: bool) -> GuestArtifact:
    return GuestArtifact(name=name, kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img",
                         cmdline="console=ttyS0", login_prompt="login: ", shell_prompt="# ",
                         disk=tmp_path / "disk.raw" if disk else None,
                         firmware_disk=tmp_path / ("disk.raw" if disk else "boot.raw") if firmware else None)


def _factory(tmp_path: Path, boot: str, guests: dict[str, GuestArtifact]) -> VmFactory:
    fw: Any = SimpleNamespace(config=SimpleNamespace(boot=boot, default_guest="tiny"),
                              artifacts=SimpleNamespace(guest=guests.__getitem__))
    return VmFactory(fw, "node", tmp_path)


@pytest.mark.parametrize(("configured", "asked", "disk_guest", "initramfs_guest"), [
    ("auto", None, "firmware", "kernel"),        # Propolis-like for disk images, fast for initramfs
    ("firmware", None, "firmware", "firmware"),
    ("kernel", None, "kernel", "kernel"),
    ("kernel", "firmware", "firmware", "firmware"),  # the test's own choice wins
    ("firmware", "auto", "firmware", "kernel"),
])
def test_boot_mode(tmp_path: Path, configured: str, asked: str | None, disk_guest: str,
                   initramfs_guest: str) -> None:
    guests = {"debian": _guest(tmp_path, "debian", disk=True, firmware=True),
              "tiny": _guest(tmp_path, "tiny", disk=False, firmware=True)}
    factory = _factory(tmp_path, configured, guests)
    assert factory.boot_mode(guests["debian"], asked) == disk_guest
    assert factory.boot_mode(guests["tiny"], asked) == initramfs_guest


def test_the_boot_image_follows_the_mode(tmp_path: Path) -> None:
    guests = {"debian": _guest(tmp_path, "debian", disk=True, firmware=True),
              "tiny": _guest(tmp_path, "tiny", disk=False, firmware=True)}
    factory = _factory(tmp_path, "auto", guests)
    assert factory.guest_image("tiny") is None  # booted directly: no disk needed
    assert factory.guest_image("tiny", boot="firmware") == tmp_path / "boot.raw"
    disk = tmp_path / "disk.raw"
    assert factory.guest_image("debian") == factory.guest_image("debian", boot="kernel") == disk


def test_firmware_boot_of_a_guest_without_a_firmware_image_names_the_fix(tmp_path: Path) -> None:
    old = _guest(tmp_path, "tiny", disk=False, firmware=False)
    factory = _factory(tmp_path, "firmware", {"tiny": old})
    with pytest.raises(HarnessError, match=r"no firmware-bootable disk image.*artifacts build tiny --force"):
        factory.boot_mode(old)
    assert factory.boot_mode(old, "auto") == "kernel"


@pytest.mark.parametrize("bad", ["uefi", "", "FIRMWARE", "firmware\0", "x" * 10_000])
def test_an_unknown_boot_mode_is_refused(tmp_path: Path, bad: str) -> None:
    guest = _guest(tmp_path, "tiny", disk=False, firmware=True)
    factory = _factory(tmp_path, "auto", {"tiny": guest})
    if bad == "":
        assert factory.boot_mode(guest, bad) == "kernel"  # empty means "not given": --phd-boot
        return
    with pytest.raises(HarnessError, match="is not one of auto, firmware, kernel"):
        factory.boot_mode(guest, bad)
