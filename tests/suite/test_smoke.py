"""Smoke: each guest of the matrix (--phd-guests) boots to a shell through the server,
commands report their output and exit status exactly, and a disk-image guest's writes
land in its own overlay, never in the shared image."""

from __future__ import annotations

import json
import subprocess

import pytest

from phd import DiskFactory, FileDisk, GuestCommandError, InstanceState, VmFactory, check_err

pytestmark = [pytest.mark.vm]


def test_boot_to_shell_and_run_commands(vm_factory: VmFactory, phd_guest: str) -> None:
    vm = vm_factory.new_vm("smoke", guest=phd_guest)
    vm.launch()
    vm.wait_for_state(InstanceState.RUNNING, timeout_s=30.0)
    vm.wait_to_boot()

    assert vm.run_shell_command("echo hello; echo world").output == "hello\nworld"
    assert vm.run_shell_command("exit_with() { return $1; }; exit_with 7", check=check_err).status == 7
    with pytest.raises(GuestCommandError, match="exited 1"):
        vm.run_shell_command("false")
    # The guest is really this VM: its memory matches the board the framework asked for.
    mem_kib = int(vm.run_shell_command("awk '/MemTotal/ {print $2}' /proc/meminfo").output)
    assert 400_000 < mem_kib <= 512 * 1024, f"guest reports {mem_kib} KiB of memory"


def test_boot_disk_is_a_private_overlay(vm_factory: VmFactory, phd_guest: str) -> None:
    """The guest's root file system is its own qcow2 overlay: what it writes grows the
    overlay in the test directory and leaves the artifact's image untouched."""
    vm = vm_factory.new_vm("overlay", guest=phd_guest)
    image, boot = vm.guest.disk, vm.boot_disk
    if image is None:
        pytest.skip(f"guest {phd_guest} boots from its initramfs and has no disk image")
    assert isinstance(boot, FileDisk) and boot.base == image, f"boot disk {boot} is not an overlay of {image}"
    overlay = boot.path
    before = image.stat()
    overlay_before = overlay.stat().st_size
    assert before.st_mode & 0o222 == 0, f"the artifact image {image} is writable"

    vm.launch()
    vm.wait_for_state(InstanceState.RUNNING, timeout_s=30.0)
    vm.wait_to_boot()
    # The root file system is on the boot disk (debian: partition 2, after the ESP).
    assert vm.run_shell_command("findmnt -n -o SOURCE /").output.startswith(vm.device_path(boot))
    vm.run_shell_command("dd if=/dev/urandom of=/root/phd-written bs=1M count=8 status=none && sync")

    after = image.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size), \
        f"the guest's writes reached the shared image {image}"
    grown = overlay.stat().st_size - overlay_before
    assert grown >= 8 << 20, f"overlay {overlay} grew by {grown} bytes after an 8 MiB write"
    # -U: QEMU holds the overlay open (and locked) while the VM runs.
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)],
                                     capture_output=True, text=True, check=True).stdout)
    assert (info["format"], info["backing-filename"]) == ("qcow2", str(image.resolve()))


@pytest.mark.crucible
def test_crucible_disk_healthy_start(vm_factory: VmFactory, disk_factory: DiskFactory) -> None:
    """Without a black hole the VM starts straight away on a Crucible data disk."""
    disk = disk_factory.create_crucible_disk("data", size_gib=1)
    vm = vm_factory.new_vm("crucible-ok")
    vm.attach(disk, device="data0")
    vm.launch()
    vm.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
    vm.wait_to_boot()
    status = vm.disk_status(disk)
    assert status.active and all(ds.active for ds in status.downstairs), status
    assert status.generation == 1 and not status.reconcile_in_progress, status
    dev = vm.device_path(disk).removeprefix("/dev/")
    assert vm.run_shell_command(f"cat /sys/block/{dev}/size").output == str(disk.size_bytes // 512)
