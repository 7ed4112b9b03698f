"""Crucible disks seen from a VM (seed: Propolis PR 873, `vcr_replace_during_start`)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from phd import (
    Action,
    CrucibleDisk,
    DiskFactory,
    InstanceState,
    ServerError,
    TestVm,
    VmFactory,
    WaitTimeout,
    check_err,
    run_lifecycle,
    wait_until,
)
from tests.suite.helpers import (
    corrupt_copy,
    read_md5,
    stored_bytes,
    unblock_by_replacement,
    wait_all_active,
    wait_blocked_on_black_hole,
    write_pattern,
)

pytestmark = [pytest.mark.vm, pytest.mark.crucible]


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_vcr_replace_during_start(vm_factory: VmFactory, disk_factory: DiskFactory,
                                  encrypted: bool) -> None:
    """A start blocked on an unreachable downstairs is unblocked by a VCR replacement (on a
    plain and on an encrypted disk: the replacement carries the disk's key unchanged)."""
    disk = disk_factory.create_crucible_disk("data", size_gib=1, encrypted=encrypted)
    disk.enable_vcr_black_hole()
    vm = vm_factory.new_vm("vcr-replace")
    vm.attach(disk, device="data0", interface="virtio")
    vm.launch()

    # Show WHY the VM is not running before asserting that it is not.
    wait_blocked_on_black_hole(vm, disk)
    with pytest.raises(WaitTimeout):
        vm.wait_for_state(InstanceState.RUNNING, timeout_s=5.0)
    assert vm.state() is InstanceState.STARTING

    unblock_by_replacement(vm, disk)

    try:
        vm.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
    except WaitTimeout as exc:
        pytest.fail(f"the VM did not reach Running after its VCR was fixed: {exc}; "
                    f"disk status: {vm.disk_status(disk)}")
    vm.wait_to_boot()

    # The guest really sees the Crucible disk and I/O round-trips through all the layers.
    dev = vm.device_path(disk)
    size = vm.run_shell_command(f"cat /sys/block/{dev.removeprefix('/dev/')}/size").output.strip()
    assert size == str(disk.size_bytes // 512), f"guest sees {dev} with {size} sectors"
    vm.run_shell_command(
        "dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null"
        f" && dd if=/tmp/pattern of={dev} bs=64k count=16 conv=fsync 2>/dev/null"
        " && echo 3 > /proc/sys/vm/drop_caches"
        f" && dd if={dev} of=/tmp/back bs=64k count=16 iflag=direct 2>/dev/null"
        " && cmp /tmp/pattern /tmp/back")

    # A generation-only change while running is accepted and changes nothing.
    disk.set_generation(3)
    assert vm.replace_crucible_vcr(disk) == "vcr_matches"
    assert vm.state() is InstanceState.RUNNING


def test_vcr_replace_during_start_with_a_silent_black_hole(vm_factory: VmFactory,
                                                           disk_factory: DiskFactory) -> None:
    """The same unblocking when the bad target ACCEPTS connections and then never answers
    (a hung downstairs), not only when it refuses them."""
    disk = disk_factory.create_crucible_disk("data", size_gib=1)
    disk.enable_vcr_black_hole("silent")
    vm = vm_factory.new_vm("vcr-silent")
    vm.attach(disk, device="data0", interface="virtio")
    vm.launch()
    status = wait_blocked_on_black_hole(vm, disk)
    assert vm.state() is InstanceState.STARTING, f"a hung downstairs must block the start: {status}"

    disk.disable_vcr_black_hole()
    disk.set_generation(2)
    assert vm.replace_crucible_vcr(disk, timeout_s=15.0) == "started"
    try:
        vm.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
    except WaitTimeout as exc:
        pytest.fail(f"the VM did not reach Running after its VCR replaced a hung target: {exc}; "
                    f"disk status: {vm.disk_status(disk)}")


def _running(vm: TestVm) -> None:
    vm.launch()
    vm.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
    vm.wait_to_boot()


# Per PR the firmware seed test boots debian from a Crucible disk already; this one, with a
# successor (two debian boots through Crucible, 100 s here), runs on debian nightly.
@pytest.mark.pr_guests("tiny")
def test_boot_from_a_crucible_disk_with_the_guest_image_as_read_only_parent(
        vm_factory: VmFactory, disk_factory: DiskFactory, phd_guest: str) -> None:
    """The guest's root file system is a Crucible disk whose unwritten blocks come from the
    guest image; what the guest writes lands in the regions, never in the image."""
    if vm_factory.guest_image(phd_guest, boot="kernel") is None:
        pytest.skip(f"guest {phd_guest} runs from its initramfs and has no root disk")
    image = vm_factory.guest_image(phd_guest)
    assert image is not None
    before = image.stat()
    boot = disk_factory.create_crucible_disk("boot", read_only_parent=image)
    assert boot.size_bytes >= before.st_size
    vm = vm_factory.new_vm("crucible-boot", guest=phd_guest, boot_disk=boot)
    _running(vm)
    assert vm.run_shell_command("findmnt -n -o SOURCE /").output.startswith(vm.device_path(boot))
    status = vm.disk_status(boot)
    assert status.active, status

    marker = vm.run_shell_command("cat /proc/sys/kernel/random/uuid").output
    vm.run_shell_command(f"echo {marker} > /root/phd-marker && sync")

    def same_marker(v: TestVm) -> None:
        assert v.run_shell_command("cat /root/phd-marker").output == marker

    # The file survives a successor booting from the same disk (data now in the regions).
    vm = run_lifecycle(vm_factory, vm, [Action.STOP_AND_START], same_marker)
    assert vm.disk_status(boot).generation == 2
    after = image.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size), \
        f"the guest's writes reached the shared image {image}"


@pytest.mark.real_nightly
def test_read_only_parent_shows_through_unwritten_blocks(
        vm_factory: VmFactory, disk_factory: DiskFactory, phd_test_dir: Path) -> None:
    """A data disk over a parent image: reads show the parent until the guest writes, the
    guest's writes win, and both survive a reboot and a successor at a higher generation."""
    mib = 1 << 20
    parent = phd_test_dir / "parent.raw"
    parent.write_bytes(hashlib.sha256(b"phd").digest() * (4 * mib // 32))  # 4 MiB, known
    disk = disk_factory.create_crucible_disk("data", size_gib=1, read_only_parent=parent)
    vm = vm_factory.new_vm("parent")
    vm.attach(disk)
    _running(vm)
    assert read_md5(vm, disk, offset_mib=0, size_mib=4) == hashlib.md5(parent.read_bytes()).hexdigest(), \
        "the guest does not read the read-only parent's blocks through the Crucible disk"
    written = write_pattern(vm, disk, offset_mib=1, size_mib=1)  # over the parent's 2nd MiB
    expected = {"first": hashlib.md5(parent.read_bytes()[:mib]).hexdigest(), "written": written,
                "beyond": hashlib.md5(bytes(mib)).hexdigest()}  # past the parent: zeros

    def data_intact(v: TestVm) -> None:
        seen = {"first": read_md5(v, disk, offset_mib=0, size_mib=1),
                "written": read_md5(v, disk, offset_mib=1, size_mib=1),
                "beyond": read_md5(v, disk, offset_mib=8, size_mib=1)}
        assert seen == expected, f"disk contents differ from what was written: {seen} != {expected}"

    vm = run_lifecycle(vm_factory, vm, [Action.REBOOT, Action.STOP_AND_START], data_intact)
    assert vm.disk_status(disk).generation == 2


def _replace_with_spare(vm: TestVm, disk_factory: DiskFactory, disk: CrucibleDisk, index: int) -> str:
    spare = disk_factory.add_downstairs(disk)
    disk.replace_downstairs(index, spare)
    disk.set_generation(disk.generation + 1)
    answer = vm.replace_crucible_vcr(disk)
    assert answer == "started", f"replacing downstairs {index} with a fresh one answered {answer!r}"
    return spare.address


@contextlib.contextmanager
def _only_the_repaired_copy_answers(vm: TestVm, disk: CrucibleDisk, repaired: int) -> Iterator[None]:
    """Stop the two downstairs that were not repaired: reads can then only be served by the
    repaired copy, so a matching checksum proves the repair copied the data. They are started
    again afterwards (a flush needs two of three, and the VM flushes when it stops)."""
    others = [ds for i, ds in enumerate(disk.downstairs) if i != repaired]
    for ds in others:
        ds.stop()
    wait_until(lambda: vm.disk_status(disk),
               lambda s: sum(ds.active for ds in s.downstairs) == 1,
               what="the upstairs to see only the repaired downstairs", timeout_s=60.0)
    try:
        yield
    except BaseException:
        # The check failed: the test is over, but the VM's flush when it stops needs two
        # copies still, or QEMU hangs on it and teardown waits out the server's deadlines.
        for ds in others:
            with contextlib.suppress(Exception):
                ds.start()
        raise
    for ds in others:
        ds.start()
    wait_all_active(vm, disk)


def test_replace_while_running_repairs_live_without_interrupting_guest_io(
        vm_factory: VmFactory, disk_factory: DiskFactory) -> None:
    disk = disk_factory.create_crucible_disk("data", size_gib=1, extent_mib=16)
    vm = vm_factory.new_vm("live-repair")
    vm.attach(disk)
    _running(vm)
    dev = vm.device_path(disk)
    kept = write_pattern(vm, disk, offset_mib=0, size_mib=64)

    # Guest I/O that must carry on through the repair: a loop rewriting 4 MiB at 512 MiB,
    # counting its rounds and logging any failure.
    vm.run_shell_command(
        "dd if=/dev/urandom of=/tmp/busy bs=1M count=4 2>/dev/null && touch /tmp/go && rm -f /tmp/ioerr"
        f" && (n=0; while [ -e /tmp/go ]; do dd if=/tmp/busy of={dev} bs=1M seek=512 conv=fsync"
        " 2>/dev/null || echo \"round $n failed\" >> /tmp/ioerr; n=$((n+1)); echo $n > /tmp/rounds;"
        " done) >/dev/null 2>&1 &")
    rounds = lambda: int(vm.run_shell_command("cat /tmp/rounds 2>/dev/null || echo 0").output)  # noqa: E731
    wait_until(rounds, lambda n: n >= 2, what="the guest's I/O loop to run", timeout_s=60.0)

    new_target = _replace_with_spare(vm, disk_factory, disk, 0)
    during = vm.disk_status(disk)
    at_start = rounds()
    status = wait_all_active(vm, disk)
    repaired = status.target(new_target)
    assert repaired is not None and repaired.detail["repairs_done"] >= 1, (
        f"the new downstairs became active without a repair: {status}")
    # The loop is still going (a write stuck in the repair would stop it for good).
    wait_until(rounds, lambda n: n > at_start, what="the guest's I/O loop to go on after the repair",
               timeout_s=60.0)
    vm.run_shell_command("rm /tmp/go; wait")
    errors = vm.run_shell_command("cat /tmp/ioerr 2>/dev/null || true").output
    assert errors == "", f"guest I/O failed during the live repair ({during}): {errors}"
    busy = vm.run_shell_command("md5sum < /tmp/busy").output.split()[0]

    with _only_the_repaired_copy_answers(vm, disk, repaired=0):
        assert read_md5(vm, disk, offset_mib=0, size_mib=64) == kept, "the repaired copy lost data"
        assert read_md5(vm, disk, offset_mib=512, size_mib=4) == busy, \
            "the repaired copy lacks what the guest wrote during the repair"


@pytest.mark.real_nightly
def test_downstairs_killed_while_running_then_replaced(vm_factory: VmFactory,
                                                       disk_factory: DiskFactory) -> None:
    """A downstairs killed (SIGKILL) under a running VM: the VM keeps running and writing on
    the other two; a replacement VCR brings in a fresh downstairs, which is repaired with
    everything, including what was written while it was gone."""
    disk = disk_factory.create_crucible_disk("data", size_gib=1, extent_mib=16)
    vm = vm_factory.new_vm("ds-killed")
    vm.attach(disk)
    _running(vm)
    before = write_pattern(vm, disk, offset_mib=0, size_mib=16)

    disk.downstairs[1].kill()
    wait_until(lambda: vm.disk_status(disk),
               lambda s: any(ds.mode in ("offline", "faulted") for ds in s.downstairs),
               what="the upstairs to notice the killed downstairs", timeout_s=60.0)
    during = write_pattern(vm, disk, offset_mib=100, size_mib=16)
    assert vm.state() is InstanceState.RUNNING
    assert read_md5(vm, disk, offset_mib=0, size_mib=16) == before

    _replace_with_spare(vm, disk_factory, disk, 1)
    wait_all_active(vm, disk)
    with _only_the_repaired_copy_answers(vm, disk, repaired=1):
        assert read_md5(vm, disk, offset_mib=0, size_mib=16) == before, \
            "data written before the kill was lost"
        assert read_md5(vm, disk, offset_mib=100, size_mib=16) == during, \
            "data written while the downstairs was dead did not reach its replacement"


def test_replacements_that_break_a_rule_are_refused(vm_factory: VmFactory, disk_factory: DiskFactory,
                                                    phd_test_dir: Path) -> None:
    """Each rule a replacement must follow, broken on purpose: the server answers 400 naming
    the rule, and the disk carries on unchanged."""
    disk = disk_factory.create_crucible_disk("data", size_gib=1)
    spares = [disk_factory.add_downstairs(disk) for _ in range(2)]
    disk.set_generation(2)
    vm = vm_factory.new_vm("rules")
    vm.attach(disk)
    vm.launch()
    vm.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
    parent = phd_test_dir / "late-parent.raw"
    parent.write_bytes(bytes(1 << 20))

    def broken(rule: str) -> dict[str, object]:
        vcr = disk.vcr()
        region = vcr["sub_volumes"][0]
        region["gen"] = 3
        if rule == "two-targets-changed":
            region["opts"]["target"][:2] = [spares[0].address, spares[1].address]
        elif rule == "generation-lower":
            region["gen"] = 1
        elif rule == "geometry-changed":
            region["extent_count"] += 1
        elif rule == "read-only-parent-added":
            vcr["read_only_parent"] = {"type": "file", "id": "5f0c1d2e-3a4b-4c5d-8e6f-7a8b9c0d1e2f",
                                       "block_size": disk.block_size, "path": str(parent)}
        return vcr

    problems = []
    for rule in ("two-targets-changed", "generation-lower", "geometry-changed", "read-only-parent-added"):
        try:
            answer = vm.replace_crucible_vcr(disk, vcr=broken(rule))
        except ServerError as exc:
            body = json.loads(exc.body) if exc.body.startswith("{") else {}
            # The Error body's error_code carries the rule: "ReplacementRejected:<rule>".
            if exc.status != 400 or str(body.get("error_code", "")).partition(":")[2] != rule:
                problems.append(f"{rule}: expected HTTP 400 with rule {rule!r}, got {exc}")
            continue
        problems.append(f"{rule}: a replacement breaking this rule was accepted ({answer!r})")
    assert not problems, "replacement rules not enforced: " + "; ".join(problems)
    status = vm.disk_status(disk)
    assert sorted(str(ds.target) for ds in status.downstairs) == sorted(disk.targets()), status
    assert status.generation == 2, status


def test_a_stale_generation_cannot_activate(vm_factory: VmFactory, disk_factory: DiskFactory) -> None:
    """A VM whose VCR carries a generation not above the one the data was written at must
    not activate (Crucible's generation fence): it would roll the disk back."""
    disk = disk_factory.create_crucible_disk("data", size_gib=1)
    disk.set_generation(3)
    vm = vm_factory.new_vm("writer")
    vm.attach(disk)
    _running(vm)
    write_pattern(vm, disk, offset_mib=0, size_mib=1)
    vm.stop()
    vm.wait_for_state(InstanceState.DESTROYED, timeout_s=60.0)

    disk.set_generation(2)
    stale = vm_factory.new_vm("stale")
    stale.attach(disk)
    stale.launch()
    state = wait_until(stale.state, lambda s: s in (InstanceState.FAILED, InstanceState.RUNNING),
                       what="the stale VM to fail or run", timeout_s=60.0)
    assert state is InstanceState.FAILED, (
        "a VM at generation 2 activated on data written at generation 3: the generation fence "
        "is missing, so a stale VCR can roll the disk back")


@pytest.mark.real_nightly
def test_a_successor_fences_its_running_predecessor(vm_factory: VmFactory,
                                                    disk_factory: DiskFactory) -> None:
    """A successor at a higher generation takes the downstairs over: the old VM's writes
    fail from then on, and the successor sees everything the old VM wrote before."""
    disk = disk_factory.create_crucible_disk("data", size_gib=1)
    old = vm_factory.new_vm("old")
    old.attach(disk)
    _running(old)
    written = write_pattern(old, disk, offset_mib=0, size_mib=4)

    new = vm_factory.successor(old, next_generation=True)
    _running(new)
    assert new.disk_status(disk).generation == 2
    assert read_md5(new, disk, offset_mib=0, size_mib=4) == written

    dev = old.device_path(disk)
    old.run_shell_command(f"dd if=/dev/zero of={dev} bs=4k count=1 oflag=direct 2>/dev/null",
                          check=check_err)
    wait_until(lambda: {ds.kind for ds in old.disk_status(disk).downstairs},
               lambda states: states == {"stopping"},
               what="the fenced VM's upstairs to disable all three downstairs", timeout_s=30.0)
    assert read_md5(new, disk, offset_mib=0, size_mib=4) == written, "the fenced VM's write got through"


def test_a_restarted_downstairs_catches_up_by_replay(vm_factory: VmFactory,
                                                     disk_factory: DiskFactory) -> None:
    """A downstairs killed (SIGKILL) under a running VM and started again within the offline
    window is not repaired: the upstairs tells it the last flush it acknowledged and replays
    every write since, so the copy holds what the guest wrote while it was down."""
    disk = disk_factory.create_crucible_disk("data", size_gib=1, extent_mib=16)
    vm = vm_factory.new_vm("replay")
    vm.attach(disk)
    _running(vm)
    before = write_pattern(vm, disk, offset_mib=0, size_mib=8)

    disk.downstairs[1].kill()
    wait_until(lambda: vm.disk_status(disk),
               lambda s: s.downstairs[1].mode == "offline",
               what="the upstairs to see the killed downstairs offline", timeout_s=60.0)
    during = write_pattern(vm, disk, offset_mib=64, size_mib=8)
    disk.downstairs[1].start()
    status = wait_all_active(vm, disk)
    back = status.downstairs[1]
    assert back.detail["repairs_done"] == 0 and back.detail["fault_count"] == 0, (
        f"repaired instead of replayed: {back}")
    with _only_the_repaired_copy_answers(vm, disk, repaired=1):
        assert read_md5(vm, disk, offset_mib=0, size_mib=8) == before, "the restarted copy lost flushed data"
        assert read_md5(vm, disk, offset_mib=64, size_mib=8) == during, (
            "the downstairs that came back lacks the writes it missed while down: "
            "its backlog was not replayed after LastFlush")


def test_a_corrupted_block_on_one_copy_is_never_served(vm_factory: VmFactory,
                                                       disk_factory: DiskFactory) -> None:
    """Bit rot on one downstairs: every block carries its hash, the upstairs checks each one
    it reads, faults the copy that lied and serves the read from another, so the guest never
    sees the damage (and the damaged copy is repaired)."""
    disk = disk_factory.create_crucible_disk("data", size_gib=1, extent_mib=16)
    vm = vm_factory.new_vm("bitrot")
    vm.attach(disk)
    _running(vm)
    written = write_pattern(vm, disk, offset_mib=1, size_mib=1)
    corrupt_copy(disk, 2, offset=(1 << 20) + 4096)
    # large reads rotate over the copies: six reads of the same MiB reach each copy
    seen = [read_md5(vm, disk, offset_mib=1, size_mib=1) for _ in range(6)]
    assert all(md5 == written for md5 in seen), (
        f"the guest read a corrupted block ({seen.count(written)} of 6 reads intact): the upstairs "
        "served data whose block hash does not match")
    status = vm.disk_status(disk)
    assert status.downstairs[2].detail["hash_mismatches"] >= 1, f"the damaged copy was never read: {status}"
    wait_all_active(vm, disk)  # faulted, then live-repaired


@pytest.mark.real_nightly
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_an_encrypted_disk_round_trips_and_stores_no_plaintext(
        vm_factory: VmFactory, disk_factory: DiskFactory, phd_test_dir: Path, encrypted: bool) -> None:
    """What the guest writes reads back the same - also on a successor, whose VCR carries the
    disk's same key at a higher generation, and from a spare repaired from the others - while
    every downstairs of an encrypted disk stores only ciphertext, and the key is written to no
    results file (VCR records, server and downstairs logs). The plain disk is the control: its
    downstairs hold the very bytes the guest wrote, at the place the check reads."""
    mib = 1 << 20
    marker = "phd-plaintext-marker-0123456789"
    plaintext = ((marker + "\n") * (mib // (len(marker) + 1) + 1)).encode()[:mib]
    disk = disk_factory.create_crucible_disk("data", size_gib=1, extent_mib=16, encrypted=encrypted)
    vm = vm_factory.new_vm("crypt")
    vm.attach(disk)
    _running(vm)
    dev = vm.device_path(disk)
    written = vm.run_shell_command(
        f"yes {marker} | head -c {mib} > /tmp/plain && dd if=/tmp/plain of={dev} bs=1M seek=1"
        " conv=fsync 2>/dev/null && md5sum < /tmp/plain && rm /tmp/plain").output.split()[0]
    assert written == hashlib.md5(plaintext).hexdigest(), "the guest wrote another pattern"

    def reads_back(v: TestVm) -> None:
        assert read_md5(v, disk, offset_mib=1, size_mib=1) == written, \
            f"the guest does not read back what it wrote (encrypted={encrypted})"

    vm = run_lifecycle(vm_factory, vm, [Action.STOP_AND_START], reads_back)
    assert vm.disk_status(disk).generation == 2
    # A spare (made encrypted like the disk) is repaired from the others and serves the data.
    _replace_with_spare(vm, disk_factory, disk, 0)
    wait_all_active(vm, disk)
    with _only_the_repaired_copy_answers(vm, disk, repaired=0):
        reads_back(vm)

    for i in range(3):  # the repaired spare too
        stored = stored_bytes(disk, i, offset=mib, length=64 << 10)
        if not encrypted:
            assert stored == plaintext[:64 << 10], f"downstairs {i} does not hold the written bytes"
            continue
        assert marker.encode() not in stored, (
            f"downstairs {i} of an encrypted disk stores the guest's plaintext: {stored[:64]!r}")
        assert stored != bytes(len(stored)), f"downstairs {i} stores nothing where the guest wrote"

    if not encrypted:
        return
    key = disk.vcr()["sub_volumes"][0]["opts"]["key"]
    forms = [key.encode(), base64.b64decode(key).hex().encode()]
    vm_factory.close()  # the servers' logs and run directories land in the test directory
    disk_factory.close()  # and so do the downstairs' logs
    assert list(phd_test_dir.glob("*.vcr.jsonl")), f"no VCR record in {phd_test_dir} to check"
    leaks = [str(p.relative_to(phd_test_dir)) for p in phd_test_dir.rglob("*")
             if p.is_file() and p.stat().st_size < (8 << 20)  # not the regions' extent files
             and any(form in p.read_bytes() for form in forms)]
    assert not leaks, f"the encrypted disk's key is written in clear in {leaks}"
