"""Run a check, put the VM through lifecycle events, run the check again after each.

PHD's `lifecycle_test`: the same assertion must hold after a reboot and after the VM is
stopped and a successor started on its disks. A test writes

    vm = run_lifecycle(vm_factory, vm, [Action.REBOOT, Action.STOP_AND_START], check)

and gets back the VM that is running at the end (a successor after STOP_AND_START, a
migration target after MIGRATE): keep using the returned VM, not the old one, which is gone.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from phd.core.errors import PhdError
from phd.vm.client import InstanceState

if TYPE_CHECKING:
    from phd.vm.factory import VmFactory
    from phd.vm.testvm import TestVm

__all__ = ["Action", "run_lifecycle"]


class Action(enum.Enum):
    REBOOT = "reboot"  # a host-requested reboot of the same VM (guest memory is lost)
    # stop -> Destroyed, then a successor on the same disks at the next Crucible generation
    STOP_AND_START = "stop_and_start"
    # a live migration to a new VM on the server under test (guest memory is kept)
    MIGRATE = "migrate"
    # a live migration to a new VM on the --phd-base-server-cmd server
    MIGRATE_TO_BASE = "migrate_to_base"


def run_lifecycle(factory: VmFactory, vm: TestVm, actions: Sequence[Action],
                  check: Callable[[TestVm], None], *, timeout_s: float = 120.0) -> TestVm:
    """`vm` must be running and booted (after `wait_to_boot`). Runs `check(vm)`, then each
    action followed by `check` on the VM that is running after it; returns that VM.

    A failed check is re-raised with the action it followed, so the report says whether the
    property broke at the start, after a reboot or after a successor took over.
    """
    _checked(check, vm, "before any lifecycle action")
    for i, action in enumerate(actions, 1):
        with vm.step(f"lifecycle_{action.value}", index=i):
            if action is Action.REBOOT:
                vm.reboot()
                # The console's next login prompt is the new boot's: the old one has been
                # read already, so this cannot pass on stale output.
                vm.wait_to_boot(timeout_s)
                vm.wait_for_state(InstanceState.RUNNING, timeout_s)
            elif action in (Action.MIGRATE, Action.MIGRATE_TO_BASE):
                target = factory.new_migration_target(vm, base_server=action is Action.MIGRATE_TO_BASE)
                target.migrate_from(vm)
                vm.wait_for_state(InstanceState.DESTROYED, timeout_s)
                vm = target
            else:
                vm.stop()
                vm.wait_for_state(InstanceState.DESTROYED, timeout_s)
                vm = factory.successor(vm, next_generation=True)
                vm.launch()
                vm.wait_for_state(InstanceState.RUNNING, timeout_s)
                vm.wait_to_boot(timeout_s)
        _checked(check, vm, f"after action {i} ({action.value})")
    return vm


def _checked(check: Callable[[TestVm], None], vm: TestVm, when: str) -> None:
    try:
        check(vm)
    except AssertionError as exc:
        raise AssertionError(f"lifecycle check failed {when} on VM {vm.config.name}: {exc}") from exc
    except PhdError as exc:
        # A note, not a new exception: the error keeps its class (SutTimeout stays a
        # timeout and a SUT error, a HarnessError stays the harness's) and its traceback.
        exc.add_note(f"lifecycle check failed {when} on VM {vm.config.name}")
        raise
