"""Server state machine (seed: Propolis PR 873, `stop_while_blocked_on_start`)."""

from __future__ import annotations

import pytest

from phd import DiskFactory, InstanceState, VmFactory, WaitTimeout
from tests.suite.helpers import wait_blocked_on_black_hole

pytestmark = [pytest.mark.vm, pytest.mark.crucible]


def test_stop_while_blocked_on_start(vm_factory: VmFactory, disk_factory: DiskFactory) -> None:
    """A stop during a start blocked on storage activation aborts the start promptly."""
    disk = disk_factory.create_crucible_disk("data", size_gib=1)
    disk.enable_vcr_black_hole()
    vm = vm_factory.new_vm("stop-blocked")
    vm.add_crucible_disk(disk, device="data0")
    vm.launch()

    vm.wait_for_state(InstanceState.STARTING, timeout_s=15.0)
    wait_blocked_on_black_hole(vm, disk)

    vm.stop()
    try:
        vm.wait_for_state(InstanceState.DESTROYED, timeout_s=60.0)
    except WaitTimeout as exc:
        pytest.fail(f"a stop during a blocked start did not abort the start: {exc}")
