"""Live migration, as PHD tests it (phd-tests/tests/src/migrate.rs and crucible/migrate.rs):
the guest's memory, a running process, its serial history and its disks move to a new
server; a failed migration (the failure injector, on either side) leaves the source running
with the guest intact; the source ends Destroyed after the guest moved out."""

from __future__ import annotations

import json

import pytest

from phd import (
    Action,
    CrucibleDisk,
    DiskFactory,
    HarnessError,
    InstanceState,
    MigrationFailures,
    MigrationState,
    ServerError,
    SutError,
    SutTimeout,
    TestVm,
    VmFactory,
    ignore_status,
    run_lifecycle,
    wait_until,
)
from phd.config import PhdConfig
from tests.suite.helpers import read_md5, write_pattern

# Per PR on tiny (a migration is seconds there); every other guest of the matrix nightly.
pytestmark = [pytest.mark.vm, pytest.mark.pr_guests("tiny")]

# A tmpfs of its own: its contents exist only in guest memory, on every guest.
TMPFS = "/run/phd-mig"


def boot(vm: TestVm) -> TestVm:
    vm.launch()
    vm.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
    vm.wait_to_boot()
    return vm


def make_dirt(vm: TestVm) -> int:
    """A file in a tmpfs and a running process that counts in it; returns the count so far."""
    vm.run_shell_command(f"mkdir -p {TMPFS} && mount -t tmpfs phd {TMPFS}")
    vm.run_shell_command(f"echo made-in-memory > {TMPFS}/marker")
    vm.run_shell_command(f"(i=0; while true; do i=$((i+1)); echo $i > {TMPFS}/count; sleep 0.2; done) "
                         ">/dev/null 2>&1 &")
    return wait_until(lambda: _count(vm), lambda n: n > 0, what="the guest's counter to start",
                      timeout_s=30.0, interval_s=0.2)


def _count(vm: TestVm) -> int:
    text = vm.run_shell_command(f"cat {TMPFS}/count 2>/dev/null || echo 0").output
    return int(text or 0)


def check_dirt(vm: TestVm, counted: int) -> None:
    """The tmpfs file is there, and the counting process runs on from where it was."""
    assert vm.run_shell_command(f"cat {TMPFS}/marker").output == "made-in-memory"
    now = _count(vm)
    assert now >= counted, f"the counter went back from {counted} to {now}: guest memory was not kept"
    wait_until(lambda: _count(vm), lambda n: n > now, what="the guest's counter to go on after the migration",
               timeout_s=30.0, interval_s=0.2)


def _disk_status_or_error(vm: TestVm, disk: CrucibleDisk) -> str:
    try:
        return str(vm.disk_status(disk))
    except Exception as exc:  # noqa: BLE001 - only used in a failure message
        return f"unknown ({exc})"


def test_smoke(vm_factory: VmFactory, phd_guest: str) -> None:
    source = boot(vm_factory.new_vm("mig-src", guest=phd_guest, memory_mib=256))
    counted = make_dirt(source)
    target = vm_factory.new_migration_target(source, "mig-dst")
    target.migrate_from(source, timeout_s=300.0)
    assert target.state() is InstanceState.RUNNING
    assert target.migration_status()["migration_in"]["state"] == MigrationState.FINISH
    check_dirt(target, counted)


def test_serial_history(vm_factory: VmFactory, phd_guest: str) -> None:
    source = boot(vm_factory.new_vm("hist-src", guest=phd_guest, memory_mib=256))
    assert source.run_shell_command("echo hello from the source VM!").output == "hello from the source VM!"
    before, before_end = source.serial_history(0)
    assert before, "the source has no serial history"
    target = vm_factory.new_migration_target(source, "hist-dst")
    target.migrate_from(source, timeout_s=300.0)
    after, after_end = target.serial_history(0)
    assert after[:len(before)] == before, "the target's serial history does not begin with the source's"
    assert after_end >= before_end
    # The shell goes on on the target's console, and its history grows from there.
    assert target.run_shell_command("echo hello from the target VM!").output == "hello from the target VM!"
    assert b"hello from the target VM!" in target.serial_history(after_end)[0]


@pytest.mark.parametrize("side", ["import", "export"])
def test_failure_keeps_the_source_running(vm_factory: VmFactory, phd_guest: str, side: str) -> None:
    """Propolis's import_failure / export_failure: the first migration fails at the device
    phase, the source goes on running with the guest's memory intact, and a second target
    takes the guest over."""
    failures = MigrationFailures(exports=1) if side == "export" else MigrationFailures()
    source = boot(vm_factory.new_vm("fail-src", guest=phd_guest, memory_mib=256, migration_failures=failures))
    counted = make_dirt(source)
    refusing = MigrationFailures(imports=1) if side == "import" else None
    target1 = vm_factory.new_migration_target(source, "fail-dst1", migration_failures=refusing)
    with pytest.raises(SutError, match="Error"):
        target1.migrate_from(source, timeout_s=300.0)
    assert target1.migration_status()["migration_in"]["state"] == MigrationState.ERROR
    target1.wait_for_state(InstanceState.FAILED, timeout_s=60.0)
    assert source.migration_status()["migration_out"]["state"] == MigrationState.ERROR
    settled = wait_until(source.state, lambda s: s is not InstanceState.MIGRATING,
                         what="the source to leave Migrating", timeout_s=60.0)
    assert settled is InstanceState.RUNNING, (
        f"a failed migration left the source {settled}: it must resume its guest and run on")
    check_dirt(source, counted)

    target2 = vm_factory.new_migration_target(source, "fail-dst2", migration_failures=MigrationFailures())
    target2.migrate_from(source, timeout_s=300.0)
    check_dirt(target2, counted)


def test_multiple_migrations(vm_factory: VmFactory, phd_guest: str) -> None:
    """Three hops; each server hosts one instance, so every hop is a new VM."""
    vm = boot(vm_factory.new_vm("hop0", guest=phd_guest, memory_mib=256))
    counted = make_dirt(vm)
    for hop in (1, 2, 3):
        target = vm_factory.new_migration_target(vm, f"hop{hop}")
        target.migrate_from(vm, timeout_s=300.0)
        assert target.run_shell_command(f"echo I have migrated {hop} times").output == \
            f"I have migrated {hop} times"
        vm = target
    check_dirt(vm, counted)


def test_from_base_and_back(vm_factory: VmFactory, phd_guest: str) -> None:
    """From the --phd-base-server-cmd server to the server under test, back, and forth
    again (both are the server under test unless a base is given)."""
    source = boot(vm_factory.new_vm("base-src", guest=phd_guest, memory_mib=256, base_server=True))
    counted = make_dirt(source)

    def check(vm: TestVm) -> None:
        assert vm.run_shell_command(f"cat {TMPFS}/marker").output == "made-in-memory"

    vm = run_lifecycle(vm_factory, source, [Action.MIGRATE, Action.MIGRATE_TO_BASE, Action.MIGRATE], check)
    check_dirt(vm, counted)


# What a source can settle in after its guest moved out: Destroyed is right; Running (its
# guest resumed) and Failed are not, and neither changes on its own.
_SETTLED_AFTER_MIGRATING_OUT = (InstanceState.DESTROYED, InstanceState.RUNNING, InstanceState.FAILED)


def test_source_is_destroyed_after_migrating_out(vm_factory: VmFactory, phd_guest: str) -> None:
    source = boot(vm_factory.new_vm("gone-src", guest=phd_guest, memory_mib=256))
    target = vm_factory.new_migration_target(source, "gone-dst")
    target.migrate_from(source, timeout_s=300.0)
    # The migration finished: a correct source goes on from Migrating to Destroyed and is
    # never Running again, so seeing Running fails at once rather than after the deadline.
    try:
        state = wait_until(source.state, lambda s: s in _SETTLED_AFTER_MIGRATING_OUT,
                           what=f"source {source.config.name} to be Destroyed after migrating out",
                           timeout_s=60.0, interval_s=0.1, timeout_error=SutTimeout)
    except SutTimeout as exc:
        pytest.fail(f"the source still runs its guest after migrating out (two copies of the guest): {exc}")
    if state is InstanceState.RUNNING:
        pytest.fail("the source still runs its guest after migrating out (two copies of the guest): "
                    f"it is Running again after the target finished the migration; "
                    f"its migration status: {source.migration_status()}")
    assert state is InstanceState.DESTROYED, f"the source ended {state} after migrating out"
    assert source.migration_status()["migration_out"]["state"] == MigrationState.FINISH
    # A Destroyed instance takes no state change: every one is 424.
    for requested in ("Run", "Stop", "Reboot"):
        with pytest.raises(ServerError) as caught:
            source.client.put_state(requested)
        assert caught.value.status == 424, caught.value
    # A target is a new VM: one that has an instance cannot be made a target again.
    with pytest.raises(HarnessError, match="new VM"):
        target.migrate_from(source)


@pytest.mark.crucible
def test_crucible_smoke(vm_factory: VmFactory, disk_factory: DiskFactory, phd_guest: str) -> None:
    """A Crucible data disk moves at the next generation: the data the source wrote is read
    on the target, whose upstairs is the active one at generation 2."""
    disk = disk_factory.create_crucible_disk("data", size_gib=1)
    source = vm_factory.new_vm("cru-src", guest=phd_guest, memory_mib=256)
    source.attach(disk, device="data0")
    boot(source)
    written = write_pattern(source, disk, offset_mib=8, size_mib=4)
    target = vm_factory.new_migration_target(source, "cru-dst")
    fence = (f"the target must activate disk {disk.name} at generation 2, which fences the source's "
             "upstairs")
    try:
        target.migrate_from(source, timeout_s=300.0)
    except SutError as exc:
        pytest.fail(f"the Crucible hand-over failed ({fence}); target's disk: "
                    f"{_disk_status_or_error(target, disk)}; {exc}")
    status = target.disk_status(disk)
    assert status.active and status.generation == 2, f"{fence}; target's disk: {status}"
    assert read_md5(target, disk, offset_mib=8, size_mib=4) == written
    # The target writes on; what it wrote reads back.
    again = write_pattern(target, disk, offset_mib=16, size_mib=4)
    assert read_md5(target, disk, offset_mib=16, size_mib=4) == again


def test_file_disk_moves(vm_factory: VmFactory, disk_factory: DiskFactory, phd_guest: str) -> None:
    """A qcow2 file disk is handed over: the source's QEMU flushes and lets go of the image
    when it completes, the target's opens the same file and reads what the source wrote."""
    blank = disk_factory.create_file_disk("blank", size_gib=1)
    disk = disk_factory.create_file_disk("data", base=blank.path)
    source = vm_factory.new_vm("file-src", guest=phd_guest, memory_mib=256)
    source.attach(disk, device="data0")
    boot(source)
    written = write_pattern(source, disk, offset_mib=8, size_mib=4)
    target = vm_factory.new_migration_target(source, "file-dst")
    target.migrate_from(source, timeout_s=300.0)
    assert read_md5(target, disk, offset_mib=8, size_mib=4) == written
    again = write_pattern(target, disk, offset_mib=16, size_mib=4)
    assert read_md5(target, disk, offset_mib=16, size_mib=4) == again


def _handover(log_text: str, old: int, new: int) -> str:
    """How our downstairs let go of the upstairs at generation `old` before the one at `new`
    went active: "taken_over" (it told the old one YouAreNoLongerActive), "closed" (the old
    one had gone already: an upstairs told so by one downstairs disables itself and drops
    its other connections), or "" (the new one went active while the old one still held it)."""
    old_peers: set[str] = set()
    gone = ""
    for line in log_text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        event, peer = record.get("event"), str(record.get("peer"))
        if event == "active" and record.get("generation") == old:
            old_peers.add(peer)
        elif event == "taken_over" and (record.get("old_generation"),
                                         record.get("new_generation")) == (old, new):
            gone = gone or "taken_over"
        elif event == "connection_closed" and peer in old_peers:
            gone = gone or "closed"
        elif event == "active" and record.get("generation") == new:
            return gone
    return ""


@pytest.mark.crucible
@pytest.mark.real_nightly
def test_crucible_under_guest_writes(vm_factory: VmFactory, disk_factory: DiskFactory, phd_guest: str,
                                     phd_config: PhdConfig) -> None:
    """A writer in the guest runs through the migration: sector i gets the number i, and the
    guest records i (in its memory, which migrates) only once the write was flushed. Every
    acknowledged write is on the disk afterwards, and the downstairs fenced the source's
    upstairs out when the target's took over, so no write of the source can land later."""
    disk = disk_factory.create_crucible_disk("data", size_gib=1)
    source = vm_factory.new_vm("load-src", guest=phd_guest, memory_mib=256)
    source.attach(disk, device="data0")
    boot(source)
    dev = source.device_path(disk)
    source.run_shell_command(f"mkdir -p {TMPFS} && mount -t tmpfs phd {TMPFS} && echo 0 > {TMPFS}/acked "
                             f"&& touch {TMPFS}/go")
    source.run_shell_command(
        f"(i=0; while [ -e {TMPFS}/go ]; do i=$((i+1)); "
        f"printf '%08d' $i | dd of={dev} bs=512 seek=$i conv=notrunc,fsync 2>/dev/null "
        f"&& echo $i > {TMPFS}/acked; done) >/dev/null 2>&1 & echo $! > {TMPFS}/writer")
    before = wait_until(lambda: int(source.run_shell_command(f"cat {TMPFS}/acked").output),
                        lambda n: n >= 10, what="the guest's writer to get going", timeout_s=60.0)

    target = vm_factory.new_migration_target(source, "load-dst")
    target.migrate_from(source, timeout_s=300.0)
    # The writer runs on in the target: let it write some more there, then stop it.
    wait_until(lambda: int(target.run_shell_command(f"cat {TMPFS}/acked").output),
               lambda n: n > before + 5, what="the writer to go on after the migration", timeout_s=60.0)
    target.run_shell_command(f"rm {TMPFS}/go")
    wait_until(lambda: target.run_shell_command(f"kill -0 $(cat {TMPFS}/writer) 2>/dev/null",
                                                check=ignore_status).status,
               lambda status: status != 0, what="the guest's writer to end", timeout_s=60.0)
    acked = int(target.run_shell_command(f"cat {TMPFS}/acked").output)
    data = target.run_shell_command(
        f"echo 3 > /proc/sys/vm/drop_caches && dd if={dev} bs=512 skip=1 count={acked} iflag=direct "
        "2>/dev/null | tr -d '\\000'", timeout_s=120.0).output
    numbers = [data[k:k + 8] for k in range(0, len(data), 8)]
    missing = [i for i, got in enumerate(numbers[:acked], 1) if got != f"{i:08d}"]
    assert len(numbers) >= acked and not missing, (
        f"{len(missing)} of {acked} acknowledged writes are not on the disk after the migration "
        f"(first: sector {missing[:5]})")
    status = target.disk_status(disk)
    assert status.active and status.generation == 2, status
    if phd_config.downstairs_program.kind == "ours":
        # The real crucible-downstairs logs in its own words; ours names each step.
        how = [_handover(ds.logs(), 1, 2) for ds in disk.downstairs]
        assert "taken_over" in how and "" not in how, (
            f"the downstairs did not fence the source's upstairs out before the target's went "
            f"active (per downstairs: {how})")


def test_stop_during_migration(vm_factory: VmFactory, phd_guest: str) -> None:
    """A stop of the target while the migration runs abandons it: the target ends Destroyed
    with its migration_in in Error, and the source runs on with the guest intact."""
    source = boot(vm_factory.new_vm("stop-src", guest=phd_guest, memory_mib=256))
    counted = make_dirt(source)
    target = vm_factory.new_migration_target(source, "stop-dst")
    target.start_migration_from(source)
    target.stop()
    target.wait_for_state(InstanceState.DESTROYED, timeout_s=60.0)
    assert target.migration_status()["migration_in"]["state"] == MigrationState.ERROR, (
        f"the stop did not abandon the migration in: {target.migration_status()}")
    source.wait_for_migration("out", MigrationState.ERROR, timeout_s=60.0)
    settled = wait_until(source.state, lambda s: s is not InstanceState.MIGRATING,
                         what="the source to leave Migrating", timeout_s=60.0)
    assert settled is InstanceState.RUNNING, (
        f"a failed migration left the source {settled}: it must resume its guest and run on")
    check_dirt(source, counted)
