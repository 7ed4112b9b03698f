"""Helpers shared by the PHD suite modules (evidence-gathering waits)."""

from __future__ import annotations

from typing import Any

from phd import CrucibleDisk, SutError, TestVm, wait_until


def blocked_on(status: dict[str, Any], target: str) -> bool:
    """Activation is pending, and the given target has failed at least one connect."""
    if status.get("vm_state") in ("Failed", "Destroyed"):
        raise SutError(f"the VM is {status['vm_state']} while its start should be blocked: {status}")
    if status.get("activation") != "activating":
        return False
    for ds in status.get("downstairs", []):
        if ds.get("target") == target:
            return int(ds.get("failed_attempts", 0)) >= 1
    return False


def wait_blocked_on_black_hole(vm: TestVm, disk: CrucibleDisk, timeout_s: float = 30.0) -> dict[str, Any]:
    """Evidence, not hope: the disk status shows activation waiting on the black-holed target."""
    return wait_until(lambda: vm.disk_status(disk), lambda s: blocked_on(s, disk.black_hole_address),
                      what=f"disk {disk.name} activation to be blocked on {disk.black_hole_address}",
                      timeout_s=timeout_s, interval_s=0.2)
