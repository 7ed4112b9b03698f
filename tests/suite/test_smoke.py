"""Smoke: the default guest boots to a shell through the server, and commands report
their output and exit status exactly."""

from __future__ import annotations

import pytest

from phd import DiskFactory, GuestCommandError, InstanceState, VmFactory

pytestmark = [pytest.mark.vm]


def test_boot_to_shell_and_run_commands(vm_factory: VmFactory) -> None:
    vm = vm_factory.new_vm("smoke")
    vm.launch()
    vm.wait_for_state(InstanceState.RUNNING, timeout_s=30.0)
    vm.wait_to_boot()

    assert vm.run_shell_command("echo hello; echo world").output == "hello\nworld"
    assert vm.run_shell_command("exit_with() { return $1; }; exit_with 7", check="err").status == 7
    with pytest.raises(GuestCommandError, match="exited 1"):
        vm.run_shell_command("false")
    # The guest is really this VM: its memory matches the board the framework asked for.
    mem_kib = int(vm.run_shell_command("awk '/MemTotal/ {print $2}' /proc/meminfo").output)
    assert 400_000 < mem_kib <= 512 * 1024, f"guest reports {mem_kib} KiB of memory"


@pytest.mark.crucible
def test_crucible_disk_healthy_start(vm_factory: VmFactory, disk_factory: DiskFactory) -> None:
    """Without a black hole the VM starts straight away on a Crucible data disk."""
    disk = disk_factory.create_crucible_disk("data", size_gib=1)
    vm = vm_factory.new_vm("crucible-ok")
    vm.add_crucible_disk(disk, device="data0")
    vm.launch()
    vm.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
    vm.wait_to_boot()
    status = vm.disk_status(disk)
    assert status["activation"] == "active", status
    assert vm.run_shell_command("cat /sys/block/vda/size").output == str(disk.size_bytes // 512)
