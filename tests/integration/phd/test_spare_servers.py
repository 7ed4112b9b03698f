"""Spare servers (phd.vm.spares) with the real reference server and real tiny guests: the next
VM like the last one takes a server that was spawned while the last one ran; a VM of another
shape, a dead spare and `--phd-spare-servers off` get a server of their own; closing a pool
stops its spare and frees what it held."""

from __future__ import annotations

from pathlib import Path

import pytest

from phd import InstanceState, VmFactory
from phd.framework import Framework
from phd.vm.spares import SpareServers

pytestmark = [pytest.mark.integration, pytest.mark.vm]


@pytest.fixture
def spares(phd_framework: Framework) -> SpareServers:
    # Whatever spare an earlier test of this worker left: start from none.
    phd_framework.spares.close()
    return phd_framework.spares


def _spare_pid(spares: SpareServers) -> int | None:
    spare = spares.spare
    return None if spare is None else spare.server.pid


def test_the_next_vm_takes_the_spare_and_it_is_wholly_its_own(
        phd_framework: Framework, vm_factory: VmFactory, spares: SpareServers, phd_test_dir: Path,
        tmp_path: Path) -> None:
    if not spares.enabled:
        pytest.skip("--phd-spare-servers off")
    first = vm_factory.new_vm("first", guest="tiny")
    assert _spare_pid(spares) is None, "a spare was spawned before any server answered"
    first.launch()
    assert _spare_pid(spares) is None, "a spare was spawned while the first guest booted"
    first.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
    first.wait_to_boot()
    spare_pid = _spare_pid(spares)
    assert spare_pid is not None, "no spare was spawned once the first guest reached its shell"
    assert spare_pid != first.server.pid
    taken_before = spares.taken

    second = vm_factory.new_vm("second", guest="tiny")
    assert second.server.pid == spare_pid, "the second VM of the same shape did not take the spare"
    assert spares.taken == taken_before + 1
    # Its log is in the test's directory under the VM's name, and the server writes on to it.
    assert second.server.log_path == phd_test_dir / "second.server.log"
    assert second.server.log_path.is_file()
    second.launch()
    second.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
    second.wait_to_boot()
    assert second.run_shell_command("echo spare-$((6*7))").output == "spare-42"
    assert second.server.log_path.stat().st_size > 0
    # The first VM runs on, on its own server, untouched.
    first.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
    assert first.server.alive() and first.server.port != second.server.port
    # And there is a spare for a third.
    assert _spare_pid(spares) not in (None, first.server.pid, second.server.pid)

    # Closing the session stops its spare and frees what it held (a spare pool of this test's
    # own, of the same shape, so the session's stays for the tests after this one).
    session_spare = spares.spare
    assert session_spare is not None
    own = SpareServers(phd_framework.ports, phd_framework.session_id, tmp_path, enabled=True)
    own.prepare(session_spare.shape)
    spare = own.spare
    assert spare is not None and spare.server.alive()
    log = spare.server.log_path
    assert log is not None and log.parent == tmp_path
    own.close()
    assert not spare.server.alive()
    assert not spare.server.data_dir.exists()
    assert not log.exists(), "an unused spare's log is noise: it goes with it"
    assert spare.port not in phd_framework.ports._given  # freed for the next VM
    own.close()  # idempotent


def test_another_shape_a_dead_spare_and_off_get_their_own_server(
        phd_framework: Framework, vm_factory: VmFactory, spares: SpareServers) -> None:
    if not spares.enabled:
        pytest.skip("--phd-spare-servers off")
    kernel = vm_factory.new_vm("kernel", guest="tiny", boot="kernel")
    kernel.launch()
    kernel.close()  # a VM that closes without reaching its shell leaves a spare too
    kernel_spare = _spare_pid(spares)
    assert kernel_spare is not None
    # Another shape (firmware boot: no kernel on the command line) starts its own server...
    firmware = vm_factory.new_vm("firmware", guest="tiny", boot="firmware")
    assert firmware.server.pid is None, "a VM of another shape was handed the spare"
    firmware.launch()
    firmware.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
    firmware.wait_to_boot()
    # ...and the spare is now one of that shape: the old one was stopped.
    assert _spare_pid(spares) not in (None, kernel_spare)
    assert not _alive(kernel_spare)

    # A spare that died is not handed out: the next VM starts its own, and it works.
    spare = spares.spare
    assert spare is not None
    spare.server.process.kill()
    again = vm_factory.new_vm("again", guest="tiny", boot="firmware")
    assert again.server.pid is None
    again.launch()
    again.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)

    # Off: no spare is ever spawned.
    off = SpareServers(phd_framework.ports, phd_framework.session_id, None, enabled=False)
    off.prepare(spare.shape)
    assert off.take(spare.shape) is None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
