"""Crucible disks seen from a VM (seed: Propolis PR 873, `vcr_replace_during_start`)."""

from __future__ import annotations

import pytest

from phd import DiskFactory, InstanceState, ServerError, VmFactory, WaitTimeout
from tests.suite.helpers import wait_blocked_on_black_hole

pytestmark = [pytest.mark.vm, pytest.mark.crucible]


def test_vcr_replace_during_start(vm_factory: VmFactory, disk_factory: DiskFactory) -> None:
    """A start blocked on an unreachable downstairs is unblocked by a VCR replacement."""
    disk = disk_factory.create_crucible_disk("data", size_gib=1)
    disk.enable_vcr_black_hole()
    vm = vm_factory.new_vm("vcr-replace")
    vm.add_crucible_disk(disk, device="data0", interface="virtio")
    vm.launch()

    # Show WHY the VM is not running before asserting that it is not.
    wait_blocked_on_black_hole(vm, disk)
    with pytest.raises(WaitTimeout):
        vm.wait_for_state(InstanceState.RUNNING, timeout_s=5.0)
    assert vm.state() is InstanceState.STARTING

    disk.disable_vcr_black_hole()
    disk.set_generation(2)
    try:
        result = vm.replace_crucible_vcr(disk, timeout_s=15.0)
    except WaitTimeout as exc:
        pytest.fail(f"VCR replacement during a blocked start was never applied "
                    f"(the state driver does not serve its queue while backends start): {exc}")
    except ServerError as exc:
        pytest.fail(f"VCR replacement during a blocked start was refused "
                    f"(replacements must be accepted while Starting): {exc}")
    assert result == "Started", f"replacing the black-holed target answered {result!r}"

    try:
        vm.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
    except WaitTimeout as exc:
        pytest.fail(f"the VM did not reach Running after its VCR was fixed: {exc}; "
                    f"disk status: {vm.disk_status(disk)}")
    vm.wait_to_boot()

    # The guest really sees the Crucible disk and I/O round-trips through all the layers.
    size = vm.run_shell_command("cat /sys/block/vda/size").output.strip()
    assert size == str(disk.size_bytes // 512), f"guest sees vda with {size} sectors"
    vm.run_shell_command(
        "dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null"
        " && dd if=/tmp/pattern of=/dev/vda bs=64k count=16 conv=fsync 2>/dev/null"
        " && echo 3 > /proc/sys/vm/drop_caches"
        " && dd if=/dev/vda of=/tmp/back bs=64k count=16 iflag=direct 2>/dev/null"
        " && cmp /tmp/pattern /tmp/back")

    # A generation-only change while running is accepted and changes nothing.
    disk.set_generation(3)
    assert vm.replace_crucible_vcr(disk) == "VcrMatches"
    assert vm.state() is InstanceState.RUNNING


def test_vcr_replace_during_start_with_a_silent_black_hole(vm_factory: VmFactory,
                                                           disk_factory: DiskFactory) -> None:
    """The same unblocking when the bad target ACCEPTS connections and then never answers
    (a hung downstairs), not only when it refuses them."""
    disk = disk_factory.create_crucible_disk("data", size_gib=1)
    disk.enable_vcr_black_hole("silent")
    vm = vm_factory.new_vm("vcr-silent")
    vm.add_crucible_disk(disk, device="data0", interface="virtio")
    vm.launch()
    status = wait_blocked_on_black_hole(vm, disk)
    assert vm.state() is InstanceState.STARTING, f"a hung downstairs must block the start: {status}"

    disk.disable_vcr_black_hole()
    disk.set_generation(2)
    assert vm.replace_crucible_vcr(disk, timeout_s=15.0) == "Started"
    try:
        vm.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
    except WaitTimeout as exc:
        pytest.fail(f"the VM did not reach Running after its VCR replaced a hung target: {exc}; "
                    f"disk status: {vm.disk_status(disk)}")
