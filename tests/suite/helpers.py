"""Helpers shared by the PHD suite modules (evidence-gathering waits)."""

from __future__ import annotations

import pytest

from phd import (
    CrucibleDisk,
    FileDisk,
    InstanceState,
    ServerError,
    SutError,
    TestVm,
    VolumeStatus,
    WaitTimeout,
    wait_until,
)


def blocked_on(vm: TestVm, status: VolumeStatus, target: str) -> bool:
    """Activation is pending (the upstairs is still going active), and the given target has
    not connected: the reference server also says it has failed at least one connect."""
    state = vm.state()
    if state in (InstanceState.FAILED, InstanceState.DESTROYED):
        raise SutError(f"the VM is {state} while its start should be blocked: {status}")
    if status.active:
        return False
    ds = status.target(target)
    if ds is None or ds.kind != "connecting":
        return False
    return int(ds.detail.get("failed_attempts", 1)) >= 1


def wait_blocked_on_black_hole(vm: TestVm, disk: CrucibleDisk, timeout_s: float = 30.0) -> VolumeStatus:
    """Evidence, not hope: the disk status shows activation waiting on the black-holed target."""
    return wait_until(lambda: vm.disk_status(disk), lambda s: blocked_on(vm, s, disk.black_hole_address),
                      what=f"disk {disk.name} activation to be blocked on {disk.black_hole_address}",
                      timeout_s=timeout_s, interval_s=0.2)


def unblock_by_replacement(vm: TestVm, disk: CrucibleDisk, *, which: str = "") -> None:
    """The seed's fix: point the black-holed target at the real downstairs at generation 2 and
    replace the VCR while the start is blocked; it must be taken ("started"). Fails in the
    words the regression table names (`which` says which disk, e.g. " (the boot disk's)")."""
    disk.disable_vcr_black_hole()
    disk.set_generation(2)
    try:
        result = vm.replace_crucible_vcr(disk, timeout_s=15.0)
    except WaitTimeout as exc:
        pytest.fail(f"VCR replacement during a blocked start was never applied{which} (the state "
                    f"driver does not serve its queue while backends start): {exc}")
    except ServerError as exc:
        pytest.fail(f"VCR replacement during a blocked start was refused{which} (replacements must "
                    f"be accepted while Starting): {exc}")
    assert result == "started", f"replacing the black-holed target answered {result!r}"


def write_pattern(vm: TestVm, disk: CrucibleDisk | FileDisk, *, offset_mib: int, size_mib: int) -> str:
    """Write `size_mib` MiB of random data at `offset_mib` on the disk, from inside the guest,
    synced to the device; returns its md5 (kept by the test, so it outlives the guest)."""
    dev = vm.device_path(disk)
    return vm.run_shell_command(
        f"dd if=/dev/urandom of=/tmp/pattern bs=1M count={size_mib} 2>/dev/null"
        f" && dd if=/tmp/pattern of={dev} bs=1M seek={offset_mib} conv=fsync 2>/dev/null"
        " && md5sum < /tmp/pattern && rm /tmp/pattern").output.split()[0]


def read_md5(vm: TestVm, disk: CrucibleDisk | FileDisk, *, offset_mib: int, size_mib: int) -> str:
    """The md5 of `size_mib` MiB at `offset_mib` as the guest reads it from the device now
    (O_DIRECT after dropping caches: the blocks really come through the storage)."""
    dev = vm.device_path(disk)
    return vm.run_shell_command(
        f"echo 3 > /proc/sys/vm/drop_caches && dd if={dev} of=/tmp/back bs=1M skip={offset_mib}"
        f" count={size_mib} iflag=direct 2>/dev/null && md5sum < /tmp/back && rm /tmp/back"
    ).output.split()[0]


def wait_all_active(vm: TestVm, disk: CrucibleDisk, timeout_s: float = 120.0) -> VolumeStatus:
    """The disk's three downstairs are the ones its VCR names and all are active (a live
    repair, if one ran, has finished)."""
    want = sorted(disk.targets())

    def done(status: VolumeStatus) -> bool:
        states = {str(ds.target): ds.kind for ds in status.downstairs}
        return (sorted(states) == want and set(states.values()) == {"active"}
                and not status.live_repair_in_progress)

    return wait_until(lambda: vm.disk_status(disk), done,
                      what=f"all three downstairs of disk {disk.name} to be active", timeout_s=timeout_s,
                      interval_s=0.25)


def _extent_file(disk: CrucibleDisk, offset: int) -> tuple[str, int]:
    """The raw extent file (relative to the region directory) holding the disk's byte
    ``offset``, and the offset within it (Crucible's raw extent files hold block data first)."""
    eid, within = divmod(offset, disk.blocks_per_extent * disk.block_size)
    return f"{eid >> 24:02X}/{(eid >> 12) & 0xFFF:03X}/{eid & 0xFFF:03X}", within


def stored_bytes(disk: CrucibleDisk, index: int, *, offset: int, length: int) -> bytes:
    """The ``length`` bytes ONE downstairs stores for the disk's bytes at ``offset`` (read
    from its region's extent file, under the running downstairs): the plaintext on a plain
    disk, the ciphertext on an encrypted one."""
    from phd.storage.downstairs import DockerDownstairs, ProcessDownstairs

    rel, within = _extent_file(disk, offset)
    ds = disk.downstairs[index]
    if isinstance(ds, ProcessDownstairs):
        with open(ds.data_dir / rel, "rb") as f:
            f.seek(within)
            return f.read(length)
    assert isinstance(ds, DockerDownstairs), f"cannot reach the region of {ds!r}"
    assert within % 512 == 0 and length % 512 == 0, "reads whole 512-byte units"
    code, out = ds._container.exec_run(
        ["dd", f"if=/data/{rel}", "bs=512", f"skip={within // 512}", f"count={length // 512}",
         "status=none"], stderr=False)
    if code != 0:
        raise SutError(f"reading {rel} in {ds.name} failed ({code}): {out!r}")
    data: bytes = out
    return data


def corrupt_copy(disk: CrucibleDisk, index: int, *, offset: int, length: int = 16) -> None:
    """Overwrite ``length`` bytes of block data at byte ``offset`` of the disk in ONE
    downstairs' region, under the running downstairs (bit rot on one copy): the bytes become
    0xA5, which no pattern a test writes carries. Crucible's raw extent files hold the block
    data first, so the offset within the extent is the offset within its file."""
    from phd.storage.downstairs import DockerDownstairs, ProcessDownstairs

    rel, within = _extent_file(disk, offset)
    ds = disk.downstairs[index]
    if isinstance(ds, ProcessDownstairs):
        with open(ds.data_dir / rel, "r+b") as f:
            f.seek(within)
            f.write(b"\xa5" * length)
            f.flush()
        return
    assert isinstance(ds, DockerDownstairs), f"cannot reach the region of {ds!r}"
    # the region volume is mounted at /data; the image has a shell and dd (Debian minbase)
    script = f"printf '\\245%.0s' $(seq {length}) | dd of=/data/{rel} bs=1 seek={within} conv=notrunc"
    code, out = ds._container.exec_run(["sh", "-c", script])
    if code != 0:
        raise SutError(f"corrupting {rel} in {ds.name} failed ({code}): {out!r}")
