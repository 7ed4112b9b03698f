"""Teardown keeps its evidence: every step runs, every error is raised with its traceback,
and the disk factory stops the VMs on its disks before the disks go (fakes, no VM)."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest

from phd.core.errors import HarnessError, SutError
from phd.core.ports import PortAllocator
from phd.core.teardown import Teardown
from phd.storage.crucible import CrucibleDisk
from phd.vm.factory import DiskFactory, VmFactory
from tests.unit.phd.fake_downstairs import Fakes, fake_disk

pytest_plugins = ["pytester"]


def _fail_in_a_helper(message: str) -> None:
    raise SutError(message)


def test_one_error_is_raised_as_itself_with_a_note() -> None:
    ran: list[str] = []
    teardown = Teardown("tearing down VM a")
    with teardown.step():
        _fail_in_a_helper("console stuck")
    with teardown.step():
        ran.append("server.stop")
    with pytest.raises(SutError, match="console stuck") as info:
        teardown.finish()
    assert ran == ["server.stop"], "a failed step must not stop the next"
    assert "(while tearing down VM a)" in info.value.__notes__
    # The traceback still reaches the frame that failed.
    assert "_fail_in_a_helper" in "".join(traceback.format_tb(info.value.__traceback__))


def test_several_errors_are_raised_as_a_group_in_order_with_their_tracebacks() -> None:
    teardown = Teardown("tearing down disks")
    with teardown.step():
        _fail_in_a_helper("first")
    with teardown.step():
        raise HarnessError("second")
    with pytest.raises(ExceptionGroup) as info:
        teardown.finish()
    group = info.value
    assert group.message == "2 errors tearing down disks"
    assert [str(e) for e in group.exceptions] == ["first", "second"]
    assert [type(e) for e in group.exceptions] == [SutError, HarnessError]
    assert "_fail_in_a_helper" in "".join(traceback.format_tb(group.exceptions[0].__traceback__))
    teardown.finish()  # what was raised is not raised twice


def test_a_ctrl_c_in_one_step_still_runs_the_others_and_is_kept() -> None:
    ran: list[str] = []
    teardown = Teardown("tearing down VMs")
    with teardown.step():
        raise KeyboardInterrupt
    with teardown.step():
        ran.append("second")
    with teardown.step():
        raise HarnessError("third")
    with pytest.raises(BaseExceptionGroup) as info:
        teardown.finish()
    assert ran == ["second"]
    assert not isinstance(info.value, ExceptionGroup), "a KeyboardInterrupt is no Exception"
    assert [type(e) for e in info.value.exceptions] == [KeyboardInterrupt, HarnessError]


# --- the factories own the order -----------------------------------------------------------

class FakeVm:
    """Stands in for TestVm: what the factories call is close()."""

    def __init__(self, name: str, events: list[str], fail: bool = False) -> None:
        self.name = name
        self.events = events
        self.fail = fail
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.events.append(f"close {self.name}")
        if self.fail:
            raise SutError(f"{self.name}: server ignored SIGTERM")


def _disk(name: str, ports: tuple[int, int, int], events: list[str], *,
          fail: bool = False) -> CrucibleDisk:
    alloc = PortAllocator(base=31400, index=0, size=10)
    holes = [alloc.black_hole("refused")]
    fakes = Fakes({0: "teardown"} if fail else None, by_port=True, events=events)
    return fake_disk(name, ports, holes=holes, fakes=fakes)[0]


def _disk_factory(tmp_path: Path, *disks: CrucibleDisk) -> DiskFactory:
    factory = DiskFactory(None, "test_x", tmp_path)  # type: ignore[arg-type] # close() needs no framework
    factory._disks.extend(disks)
    return factory


def test_disk_factory_stops_the_vms_on_its_disks_before_the_disks(tmp_path: Path) -> None:
    events: list[str] = []
    data = _disk("data", (1, 2, 3), events)
    boot = _disk("boot", (4, 5, 6), events)
    vm, successor = FakeVm("vm", events), FakeVm("vm-s1", events)
    for d in (data, boot):
        d.attached_to(vm)
        d.attached_to(successor)
        d.attached_to(vm)  # attaching twice records it once
    assert data.users == (vm, successor)
    factory = _disk_factory(tmp_path, data, boot)
    factory.close()
    assert events == ["close vm", "close vm-s1",
                      "destroy ds4", "destroy ds5", "destroy ds6",
                      "destroy ds1", "destroy ds2", "destroy ds3"]
    factory.close()  # idempotent
    assert len(events) == 8


def test_disk_teardown_runs_every_step_and_raises_every_error(tmp_path: Path) -> None:
    events: list[str] = []
    data = _disk("data", (1, 2, 3), events, fail=True)
    vm = FakeVm("vm", events, fail=True)
    data.attached_to(vm)
    with pytest.raises(ExceptionGroup, match="2 errors tearing down disks") as info:
        _disk_factory(tmp_path, data).close()
    assert events == ["close vm", "destroy ds1", "destroy ds2", "destroy ds3"]
    assert [str(e) for e in info.value.exceptions] == ["vm: server ignored SIGTERM",
                                                       "ds1: simulated teardown failure"]
    # The disk's own teardown had one error: raised as itself, noted with the disk's name.
    assert "(while tearing down disk data)" in info.value.exceptions[1].__notes__


def test_vm_factory_closes_every_vm_newest_first_despite_errors(tmp_path: Path) -> None:
    events: list[str] = []
    factory = VmFactory(None, "test_x", tmp_path)  # type: ignore[arg-type]
    factory.vms.extend([FakeVm("a", events, fail=True), FakeVm("b", events)])  # type: ignore[list-item]
    with pytest.raises(SutError, match="a: server ignored SIGTERM"):
        factory.close()
    assert events == ["close b", "close a"]


def test_a_teardown_error_shows_in_the_test_report(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile("""
        from phd.core.errors import HarnessError, SutError

        class Vm:
            def close(self):
                raise SutError("vm teardown exploded")

        class Disk:
            users = (Vm(),)
            def destroy(self):
                raise HarnessError("disk teardown exploded")

        def test_uses_a_disk(disk_factory):
            disk_factory._disks.append(Disk())
    """)
    result = pytester.runpytest("--phd-downstairs", "process", "--phd-tmp-dir", str(tmp_path))
    result.assert_outcomes(passed=1, errors=1)
    text = result.stdout.str()
    assert "ERROR at teardown of test_uses_a_disk" in text
    assert "2 errors tearing down disks" in text
    # Both errors, each with the line that raised it.
    assert 'raise SutError("vm teardown exploded")' in text
    assert 'raise HarnessError("disk teardown exploded")' in text
