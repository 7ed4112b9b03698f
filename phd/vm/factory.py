"""Factories that tests call to get VMs and disks; each owns and tears down what it built.

Teardown runs every step and raises the errors together (phd.core.teardown, pytest's own habit).
VMs go before their disks (their servers hold the disks' connections): the disk factory
stops every VM that attached one of its disks before it destroys the disks, whichever
fixture pytest happens to tear down first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import subprocess
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING

from phd.artifacts.manifest import short_repr
from phd.artifacts.store import GuestArtifact
from phd.core.errors import ArtifactUnavailable, HarnessError
from phd.core.ports import BLACK_HOLE_KINDS, BlackHole
from phd.core.teardown import Teardown
from phd.storage.crucible import CrucibleDisk
from phd.storage.downstairs import Downstairs
from phd.storage.dsc import DownstairsSet, RegionGeometry, members_for
from phd.vm.guest import adapter_for
from phd.vm.server import KernelBoot, uefi_bootrom
from phd.vm.spares import make_server, run_dir, shape_of
from phd.vm.testvm import BOOT_DEVICE, TERMINAL, FileDisk, GuestBoot, MigrationFailures, TestVm, VmConfig

if TYPE_CHECKING:  # the session object, for annotations only: phd.framework is above this layer
    from phd.framework import Framework

__all__ = ["DiskFactory", "VmFactory", "create_file_disk", "overlay_argv"]

GIB = 1 << 30
MIB = 1 << 20
_NAME_OK = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")


def overlay_argv(base: Path, overlay: Path, base_format: str = "raw") -> list[str]:
    """`qemu-img` argv for a qcow2 overlay whose reads fall through to `base` until written.

    The backing path is absolute (qcow2 resolves a relative one against the overlay's own
    folder, which is the test directory, not the artifact cache), and its format is named
    (`-F`) so QEMU never probes it - probing a raw image is a known security hole.
    """
    return ["qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format,
            "-b", str(base.resolve()), str(overlay)]


def create_file_disk(path: Path, *, base: Path | None = None, size_gib: int = 1) -> FileDisk:
    """A file disk at `path`: a qcow2 overlay of `base` (its size), or a blank sparse raw
    image of `size_gib` GiB. `base` is only ever read."""
    if path.exists():
        raise HarnessError(f"disk image {path} already exists: disk and VM names must be unique "
                           "within a test")
    name = path.stem
    if base is None:
        with path.open("xb") as f:
            f.truncate(size_gib * GIB)
        return FileDisk(name, path, "raw", size_gib * GIB)
    if not base.is_file():
        raise HarnessError(f"base image {base} does not exist")
    argv = overlay_argv(base, path)
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,  # noqa: S603
                              text=True, check=False)
    except FileNotFoundError:
        raise ArtifactUnavailable(f"a copy-on-write overlay of {base.name}",
                                  "qemu-img is not installed: run ci/bootstrap (qemu-utils)") from None
    if done.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return FileDisk(name, path, "qcow2", base.stat().st_size, base=base)


class VmFactory:
    def __init__(self, framework: Framework, node_id: str, test_dir: Path) -> None:
        self.fw = framework
        self.node_id = node_id
        self.test_dir = test_dir
        self.vms: list[TestVm] = []
        self._ports: list[int] = []
        self._data_dirs: list[tuple[Path, Path]] = []
        self._successors: dict[str, int] = {}

    def new_vm(self, name: str, *, guest: str | None = None, cpus: int = 2,
               memory_mib: int = 512, ssh: bool | None = None,
               boot_disk: CrucibleDisk | FileDisk | None = None, boot: str | None = None,
               migration_failures: MigrationFailures | None = None,
               base_server: bool = False) -> TestVm:
        """A VM of `guest` (default: --phd-guest), not yet launched.

        boot: "firmware" (the UEFI BOOTROM boots the guest's firmware-bootable disk image, as
        Propolis does), "kernel" (the server boots the guest's kernel and initrd directly) or
        "auto" (firmware for disk-image guests, kernel for initramfs guests); default --phd-boot.

        A VM that boots from a disk (firmware boot, or a disk-image guest such as debian) boots
        a copy-on-write overlay of the image, `boot0` in the test directory, or `boot_disk`: a
        Crucible disk whose read-only parent is that image (`disk_factory.create_crucible_disk(
        "boot", read_only_parent=vm_factory.guest_image(boot=...))`), or any file disk
        (`create_file_disk`) - a blank one, say, to see the firmware fail. `ssh`: forward a
        127.0.0.1 port to the guest's sshd (a user-networking NIC); None means "if the guest
        runs sshd".

        `migration_failures`: the spec gets a migration failure injector (its server fails
        that many migration exports / imports). `base_server`: the VM runs on the
        --phd-base-server-cmd server (a "from base" migration source).
        """
        artifact = self.fw.artifacts.guest(guest or self.fw.config.default_guest)
        mode = self.boot_mode(artifact, boot)
        image = _boot_image(artifact, mode)
        disk: CrucibleDisk | FileDisk | None = boot_disk
        if boot_disk is not None and image is None:
            raise HarnessError(f"guest {artifact.name} boots its kernel and initramfs directly here, so "
                               f"boot disk {boot_disk.name} would go unused: boot it through firmware "
                               "(new_vm(..., boot=\"firmware\")) or attach the disk as a data disk")
        if disk is None and image is not None:
            disk = create_file_disk(self.test_dir / f"{name}.{BOOT_DEVICE}.qcow2", base=image)
        config = VmConfig(name, cpus, memory_mib, boot=mode, migration_failures=migration_failures)
        return self._new_vm(config, artifact, ssh, disk, base_server=base_server)

    def new_migration_target(self, source: TestVm, name: str | None = None, *,
                             migration_failures: MigrationFailures | None = None,
                             base_server: bool = False) -> TestVm:
        """A new VM (own server) to migrate `source` into with `vm.migrate_from(source)`:
        the same guest, board, boot and disks (file disks are shared: QEMU hands them over; a
        Crucible disk moves at the next generation when the migration starts).

        `migration_failures`: replaces the source's failure injector on this target (the
        source must have one: `new_vm(..., migration_failures=MigrationFailures())`).
        `base_server`: this target runs on the --phd-base-server-cmd server.
        """
        self._successors[source.config.name] = n = self._successors.get(source.config.name, 0) + 1
        name = name or f"{source.config.name}-m{n}"
        if migration_failures is not None and source.config.migration_failures is None:
            raise HarnessError(f"VM {source.config.name} has no migration failure injector for "
                               f"{name} to replace: create it with "
                               "new_vm(..., migration_failures=MigrationFailures())")
        cfg = source.config
        # The same boot: the target's QEMU must have the source's firmware (or linuxboot ROM)
        # for the migrated RAM blocks to line up.
        config = VmConfig(name, cfg.cpus, cfg.memory_mib, boot=cfg.boot,
                          migration_failures=migration_failures or cfg.migration_failures)
        boot = source.disks[0].disk if source.disks and source.disks[0].device == BOOT_DEVICE else None
        target = self._new_vm(config, source.guest, cfg.ssh_port is not None, boot, base_server=base_server)
        for att in source.disks:
            if att.device != BOOT_DEVICE:
                target.attach(att.disk, att.device, att.interface)
        return target

    def boot_mode(self, artifact: GuestArtifact, boot: str | None = None) -> GuestBoot:
        """How a VM of `artifact` boots: `boot` (or --phd-boot) with "auto" resolved."""
        wanted = boot or self.fw.config.boot
        if wanted not in ("auto", "firmware", "kernel"):
            raise HarnessError(f"boot {short_repr(wanted)} is not one of auto, firmware, kernel")
        if wanted == "auto":
            return "firmware" if artifact.disk is not None else "kernel"
        if wanted == "firmware" and artifact.firmware_disk is None:
            raise HarnessError(f"guest {artifact.name} has no firmware-bootable disk image (guest.json "
                               "names no files.firmware_disk): rebuild it with `phd artifacts build "
                               f"{artifact.name} --force`, or boot it with --phd-boot kernel")
        return "firmware" if wanted == "firmware" else "kernel"

    def guest_image(self, guest: str | None = None, *, boot: str | None = None) -> Path | None:
        """The raw disk image a VM of `guest` (default: --phd-guest) boots from in boot mode
        `boot` (default: --phd-boot): the firmware-bootable image for firmware boot, the root
        disk for kernel boot; None for an initramfs guest booted directly."""
        artifact = self.fw.artifacts.guest(guest or self.fw.config.default_guest)
        return _boot_image(artifact, self.boot_mode(artifact, boot))

    def successor(self, vm: TestVm, name: str | None = None, *, next_generation: bool) -> TestVm:
        """A new VM (own server) on `vm`'s disks, not yet launched: the same guest, board
        and devices (PHD's successor).

        next_generation (required, so the call says it): True sets every Crucible disk of
        `vm` to a generation one higher than any sent so far, so the successor's activation
        takes the downstairs over from `vm`; False leaves the generations as they are (a
        successor that must not be able to activate while `vm` holds the disks).

        File disks have no generation fence: `vm` must be stopped first if it has any.
        """
        self._successors[vm.config.name] = n = self._successors.get(vm.config.name, 0) + 1
        name = name or f"{vm.config.name}-s{n}"
        boot = vm.disks[0].disk if vm.disks and vm.disks[0].device == BOOT_DEVICE else None
        # An initramfs guest booted through firmware keeps nothing on its boot disk (the
        # firmware only reads the boot image from it), so its successor boots a fresh overlay
        # of the same image and may run beside its predecessor.
        fresh_boot = isinstance(boot, FileDisk) and boot.base is not None and vm.guest.disk is None
        shared = [att for att in vm.disks if isinstance(att.disk, FileDisk)
                  and not (fresh_boot and att.disk is boot)]
        if shared and vm.server.alive() and vm.state() not in TERMINAL:
            raise HarnessError(f"VM {vm.config.name} still runs on file disks; stop it (and wait "
                               "for Destroyed) before its successor uses them")
        if next_generation:
            for disk in {id(att.disk): att.disk for att in vm.disks}.values():
                if isinstance(disk, CrucibleDisk):
                    disk.set_generation(disk.generation + 1)
        if fresh_boot:
            assert isinstance(boot, FileDisk) and boot.base is not None
            boot = create_file_disk(self.test_dir / f"{name}.{BOOT_DEVICE}.qcow2", base=boot.base)
        cfg = vm.config
        succ = self._new_vm(VmConfig(name, cfg.cpus, cfg.memory_mib, boot=cfg.boot,
                                     migration_failures=cfg.migration_failures), vm.guest,
                            cfg.ssh_port is not None, boot)
        for att in vm.disks:
            if att.device != BOOT_DEVICE:
                succ.attach(att.disk, att.device, att.interface)
        return succ

    def _new_vm(self, config: VmConfig, artifact: GuestArtifact, ssh: bool | None,
                boot: CrucibleDisk | FileDisk | None, *, base_server: bool = False) -> TestVm:
        if not _NAME_OK.match(config.name):
            raise HarnessError(f"VM name {config.name!r} must match {_NAME_OK.pattern}")
        if any(vm.config.name == config.name for vm in self.vms):
            raise HarnessError(f"this test already has a VM named {config.name!r}: VM names must "
                               "be unique within a test (they name its logs)")
        cfg = self.fw.config
        has_sshd = adapter_for(artifact.guest_os or artifact.name).has_sshd
        if ssh and not has_sshd:
            raise HarnessError(f"guest {artifact.name} runs no sshd, so ssh=True cannot work; "
                               "check `vm.supports_ssh` or skip on this guest")
        log = None if cfg.output_mode == "null" else self.test_dir / f"{config.name}.server.log"
        # The reference server reads its accelerator from SUT_SERVER_ACCEL (--phd-accel).
        # What v5 has no field for goes on the server's command line: the guest's kernel,
        # initrd and command line (direct kernel boot) and the SSH forward. Firmware boot
        # needs none of it: the BOOTROM boots the boot disk, as on a real propolis-server.
        kernel_boot = None
        bootrom = cfg.bootrom
        if config.boot == "firmware":
            bootrom = bootrom or uefi_bootrom()
        else:
            kernel_boot = KernelBoot(artifact.kernel, artifact.initrd, artifact.cmdline)
        shape = shape_of(cfg.migration_base_cmd if base_server else cfg.server_cmd, cfg.regressions,
                         {"SUT_SERVER_ACCEL": cfg.accel}, (cfg.tmp_dir, cfg.artifact_dir), kernel_boot,
                         bootrom, ssh=has_sshd if ssh is None else ssh)
        spare = self.fw.spares.take(shape)
        if spare is not None:
            # A server of this very command line, spawned while the previous VM ran: it is
            # this VM's now (ports, run directory, log), as if started here.
            server, port, ssh_port = spare.server, spare.port, spare.ssh_port
            if log is not None:
                server.move_log(log)
        else:
            port = self.fw.ports.allocate()
            ssh_port = self.fw.ports.allocate() if shape.ssh else None
            server = make_server(shape, port, ssh_port, run_dir(self.fw.session_id, port), log)
        self._ports += [p for p in (port, ssh_port) if p is not None]
        self._data_dirs.append((server.data_dir, self.test_dir / f"{config.name}.server-data"))
        vm = TestVm(dataclasses.replace(config, ssh_port=ssh_port), server, artifact, self.test_dir)
        vm.on_settled = lambda: self.fw.spares.prepare(shape)
        self.vms.append(vm)
        if boot is not None:
            vm.attach(boot, BOOT_DEVICE, "virtio")
        return vm

    def close(self) -> None:
        """Tear every VM down, newest first, then keep their run directories' files and free
        their ports; idempotent (a VM's close is, and the disk factory may have stopped the
        VMs on its disks already)."""
        teardown = Teardown("tearing down VMs")
        for vm in reversed(self.vms):
            with teardown.step():
                vm.close()
        while self._ports:
            with teardown.step():
                self.fw.ports.release(self._ports.pop())
        while self._data_dirs:
            with teardown.step():
                _collect(*self._data_dirs.pop())
        teardown.finish()

    def keep_running(self) -> str:
        """--phd-keep-on-failure: leave every VM of this test up; returns how to reach them.
        Ports stay taken for the rest of the run, so nothing else lands on them."""
        notes = []
        for vm in self.vms:
            notes.append(vm.how_to_reach())
            vm.close(keep_running=True)  # closed for this process: close() skips it
        for data_dir, keep_as in self._data_dirs:
            _collect(data_dir, keep_as)
        return "\n".join(notes)


def _boot_image(artifact: GuestArtifact, mode: GuestBoot) -> Path | None:
    return artifact.firmware_disk if mode == "firmware" else artifact.disk


def _collect(run_dir: Path, keep_as: Path) -> None:
    """Copy a server run directory's regular files (logs, argv) into the test directory."""
    if not run_dir.exists():
        return
    for src in run_dir.rglob("*"):
        if src.is_file() and not src.is_symlink():
            dst = keep_as / src.relative_to(run_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copy2(src, dst)
    shutil.rmtree(run_dir, ignore_errors=True)


class DiskFactory:
    def __init__(self, framework: Framework, node_id: str, test_dir: Path) -> None:
        self.fw = framework
        self.node_id = node_id
        self.test_dir = test_dir
        self._disks: list[CrucibleDisk] = []
        self._ports: list[int] = []
        self._names: set[str] = set()
        self._tag = uuidlib.uuid4().hex[:6]  # container names stay unique across tests

    def create_crucible_disk(self, name: str = "data", *, size_gib: int | None = None,
                             block_size: int = 512, extent_mib: int = 64,
                             read_only_parent: Path | None = None,
                             encrypted: bool = False) -> CrucibleDisk:
        """A Crucible disk: three fresh regions, each served by its own downstairs.

        encrypted: the regions (and every spare `add_downstairs` makes for the disk) are
        created `--encrypted` and the VCR carries a random key of the disk's own, the same
        for its whole life; the upstairs seals every block (AES-256-GCM-SIV), so the
        downstairs store only ciphertext.

        read_only_parent: a raw image (a guest's disk, say) whose blocks the disk shows until
        they are written; the size then defaults to the image's, rounded up to whole extents.
        Without it the disk is blank and 1 GiB by default.
        """
        if not _NAME_OK.match(name):
            raise HarnessError(f"disk name {name!r} must match {_NAME_OK.pattern}")
        if name in self._names:
            raise HarnessError(f"this test already has a disk named {name!r}: disk names must be "
                               "unique within a test (they name the downstairs and their logs)")
        extent = extent_mib * MIB
        size = (size_gib or 1) * GIB
        if read_only_parent is not None:
            if not read_only_parent.is_file():
                raise HarnessError(f"read-only parent {read_only_parent} is not a file")
            parent_size = read_only_parent.stat().st_size
            if size_gib is None:
                size = -(-parent_size // extent) * extent
            elif size < parent_size:
                raise HarnessError(f"disk {name}: {size_gib} GiB is smaller than its read-only "
                                   f"parent {read_only_parent} ({parent_size} bytes)")
        geometry = RegionGeometry.of_size(size, block_size=block_size, extent_bytes=extent,
                                          encrypted=encrypted)
        # A downstairs' repair port (+4000) must be free as well.
        ports = [self._allocate_pair() for _ in range(3)]
        black_holes: list[BlackHole] = []
        try:
            for kind in BLACK_HOLE_KINDS:  # both kinds held, so a test can pick either
                black_holes.append(self.fw.ports.black_hole(kind))
            self._names.add(name)
            # ds0..ds2 for a disk's first three, ds3... for spares: log files sort by disk. The
            # set brings them up side by side, all or none (it undoes a half start).
            members = members_for(self.fw, self.node_id, self.test_dir,
                                  prefix=f"phd-{self.fw.session_id}-{self._tag}-{name}")
            downstairs = DownstairsSet(members, ports, count=3, geometry=geometry).open()
        except BaseException:
            for hole in black_holes:
                hole.close()
            raise
        disk = CrucibleDisk(name, downstairs, black_holes, read_only_parent=read_only_parent)
        self._disks.append(disk)
        return disk

    def add_downstairs(self, disk: CrucibleDisk) -> Downstairs:
        """A spare downstairs for `disk`: a fresh, empty region of the same geometry (an
        encrypted disk's spare is encrypted too), started and owned by the disk's set. Swap it
        in with `disk.replace_downstairs(i, spare)`; the next replacement VCR makes the
        upstairs repair it from the others."""
        return disk.add_spare(self._allocate_pair())

    def _allocate_pair(self) -> int:
        port = self.fw.ports.allocate_pair()
        self._ports.append(port)  # released when the factory closes, after the disks
        return port

    def create_file_disk(self, name: str = "data", *, base: Path | None = None,
                         size_gib: int = 1) -> FileDisk:
        """A file disk in the test directory: a qcow2 overlay of `base`, or blank raw.
        It goes away with the test directory (kept when the test fails)."""
        if not _NAME_OK.match(name):
            raise HarnessError(f"disk name {name!r} must match {_NAME_OK.pattern}")
        suffix = "raw" if base is None else "qcow2"
        return create_file_disk(self.test_dir / f"{name}.{suffix}", base=base, size_gib=size_gib)

    def close(self) -> None:
        """Stop every VM that uses one of these disks, then destroy the disks (newest first)
        and free their ports; every step runs, the errors are raised together."""
        teardown = Teardown("tearing down disks")
        # VMs before their disks: a server stopping its VM flushes to the downstairs, which
        # must still be there to answer. TestVm.close is idempotent, so the VM factory's own
        # close later only keeps the logs and frees the ports.
        for disk in self._disks:
            for vm in disk.users:
                with teardown.step():
                    vm.close()
        while self._disks:
            disk = self._disks.pop()
            with teardown.step():
                disk.destroy()
        while self._ports:
            with teardown.step():
                self.fw.ports.release(self._ports.pop())
        teardown.finish()
