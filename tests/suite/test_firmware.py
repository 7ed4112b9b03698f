"""Firmware boot: the server's BOOTROM (UEFI, OVMF) boots the guest from a disk, as Propolis
boots every guest - from a file disk, and from a Crucible disk whose start is blocked on an
unreachable downstairs until a VCR replacement fixes it (the seed scenario, with the Crucible
disk as the BOOT disk: nothing can run before the disk is there)."""

from __future__ import annotations

import pytest

from phd import DiskFactory, GuestPanic, InstanceState, TestVm, VmFactory, WaitTimeout
from tests.suite.helpers import unblock_by_replacement, wait_blocked_on_black_hole

pytestmark = [pytest.mark.vm]

# What OVMF prints on the serial console as it hands over to the disk's boot loader.
FIRMWARE_STARTS = "BdsDxe: starting Boot"


def _booted_through(vm: TestVm) -> str:
    """How the running guest's kernel came up, as the guest itself reports it: UEFI firmware
    leaves /sys/firmware/efi behind, a BIOS or a direct kernel boot does not."""
    return vm.run_shell_command("if [ -d /sys/firmware/efi ]; then echo uefi; else echo other; fi").output


# Per PR on tiny (both modes); debian's cases nightly: per PR debian boots through firmware
# in every other test (auto), so only the explicit check of the path is left to the nightly.
@pytest.mark.pr_guests("tiny")
@pytest.mark.parametrize("boot", ["firmware", "kernel"])
def test_the_guest_boots_the_way_it_was_asked_to(vm_factory: VmFactory, phd_guest: str, boot: str) -> None:
    """Firmware boot goes through UEFI and shows the firmware on the serial console; direct
    kernel boot (the reference server's own option) does neither."""
    vm = vm_factory.new_vm(f"boot-{boot}", guest=phd_guest, boot=boot)
    assert vm.config.boot == boot
    vm.launch()
    vm.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
    vm.wait_to_boot()
    console = vm.console.text
    if boot == "firmware":
        assert FIRMWARE_STARTS in console, f"no firmware output on the serial console:\n{console[:2000]}"
        assert console.index(FIRMWARE_STARTS) < console.index(vm.guest.login_prompt)
        assert _booted_through(vm) == "uefi"
    else:
        assert FIRMWARE_STARTS not in console
        assert _booted_through(vm) == "other"
    assert vm.run_shell_command("echo booted-$((6*7))").output == "booted-42"


# Per PR on tiny: its firmware boot disk goes through Crucible the same way; debian's 2 GiB
# root read through the upstairs under TCG (80 s) is nightly.
@pytest.mark.crucible
@pytest.mark.pr_guests("tiny")
def test_vcr_replace_during_start_unblocks_a_firmware_boot_from_crucible(
        vm_factory: VmFactory, disk_factory: DiskFactory, phd_guest: str) -> None:
    """The seed scenario with the Crucible disk as the boot disk: the start waits on the
    black-holed downstairs (the firmware has not run), the VCR replacement unblocks it, and
    the firmware boots the guest from Crucible."""
    image = vm_factory.guest_image(phd_guest, boot="firmware")
    assert image is not None
    boot = disk_factory.create_crucible_disk("boot", read_only_parent=image)
    boot.enable_vcr_black_hole()
    vm = vm_factory.new_vm("fw-crucible", guest=phd_guest, boot_disk=boot, boot="firmware")
    vm.launch()

    wait_blocked_on_black_hole(vm, boot)
    assert vm.state() is InstanceState.STARTING
    assert FIRMWARE_STARTS not in vm.console.text, "the firmware ran before its boot disk was active"

    unblock_by_replacement(vm, boot, which=" (the boot disk's)")
    try:
        vm.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
    except WaitTimeout as exc:
        pytest.fail(f"the VM did not reach Running after its boot disk's VCR was fixed: {exc}; "
                    f"disk status: {vm.disk_status(boot)}")
    vm.wait_to_boot()

    assert FIRMWARE_STARTS in vm.console.text
    assert _booted_through(vm) == "uefi"
    # The guest reads its boot disk through Crucible: the GPT header the firmware booted from.
    dev = vm.device_path(boot)
    header = vm.run_shell_command(f"dd if={dev} bs=512 skip=1 count=1 2>/dev/null | head -c 8").output
    assert header == "EFI PART", f"{dev} does not start with the image's GPT: {header!r}"
    status = vm.disk_status(boot)
    assert status.active and all(ds.active for ds in status.downstairs), status


def test_a_boot_disk_with_nothing_to_boot_fails_fast_with_the_firmware_named(
        vm_factory: VmFactory, disk_factory: DiskFactory) -> None:
    """A guest the firmware cannot boot (here: a blank boot disk) ends the boot wait as soon
    as the firmware gives up - OVMF starts its UEFI shell - with that said, instead of waiting
    out the boot timeout for a login prompt that cannot come."""
    blank = disk_factory.create_file_disk("blank", size_gib=1)
    vm = vm_factory.new_vm("fw-blank", boot_disk=blank, boot="firmware")
    vm.launch()
    vm.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
    with pytest.raises(GuestPanic, match="UEFI firmware found nothing to boot"):
        vm.wait_to_boot(timeout_s=120.0)
