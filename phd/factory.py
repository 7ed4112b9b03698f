"""Factories that tests call to get VMs and disks; each owns and tears down what it built.

Teardown runs every finalizer and raises the errors together (pytest's own habit), VMs
first (their servers hold the disks' connections), then disks.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import tempfile
import uuid as uuidlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from phd.crucible import CrucibleDisk
from phd.downstairs import DockerDownstairs, Downstairs, ProcessDownstairs
from phd.errors import ArtifactUnavailable, HarnessError
from phd.framework import Framework
from phd.guest import adapter_for
from phd.ports import BLACK_HOLE_KINDS, BlackHole
from phd.server import ServerProcess
from phd.vm import BOOT_DEVICE, FileDisk, TestVm, VmConfig

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


def _teardown_all(finalizers: list[Callable[[], None]], what: str) -> None:
    """Run every finalizer, newest first, and raise the errors together."""
    errors: list[BaseException] = []
    while finalizers:
        try:
            finalizers.pop()()
        except Exception as exc:  # noqa: BLE001 - collected, raised together below
            errors.append(exc)
    if errors:
        raise HarnessError(f"{len(errors)} error(s) tearing down {what}: {errors}")


class VmFactory:
    def __init__(self, framework: Framework, node_id: str, test_dir: Path) -> None:
        self.fw = framework
        self.node_id = node_id
        self.test_dir = test_dir
        self._vms: list[Callable[[], None]] = []
        self.vms: list[TestVm] = []
        self._ports: list[int] = []
        self._data_dirs: list[tuple[Path, Path]] = []

    def new_vm(self, name: str, *, guest: str | None = None, cpus: int = 2,
               memory_mib: int = 512, ssh: bool | None = None) -> TestVm:
        """A VM of `guest` (default: --phd-guest), not yet launched.

        A guest with a disk image boots from a copy-on-write overlay of it, `boot0` in the
        test directory. `ssh`: forward a 127.0.0.1 port to the guest's sshd (a user-
        networking NIC); None means "if the guest runs sshd".
        """
        if not _NAME_OK.match(name):
            raise HarnessError(f"VM name {name!r} must match {_NAME_OK.pattern}")
        cfg = self.fw.config
        artifact = self.fw.artifacts.guest(guest or cfg.default_guest)
        has_sshd = adapter_for(artifact.guest_os or artifact.name).has_sshd
        if ssh and not has_sshd:
            raise HarnessError(f"guest {artifact.name} runs no sshd, so ssh=True cannot work; "
                               "check `vm.supports_ssh` or skip on this guest")
        boot = None
        if artifact.disk is not None:
            boot = create_file_disk(self.test_dir / f"{name}.{BOOT_DEVICE}.qcow2", base=artifact.disk)
        port = self.fw.ports.allocate()
        self._ports.append(port)
        ssh_port = None
        if has_sshd if ssh is None else ssh:
            ssh_port = self.fw.ports.allocate()
            self._ports.append(ssh_port)
        log = None if cfg.output_mode == "null" else self.test_dir / f"{name}.server.log"
        # Unix socket paths are capped at 107 bytes, so the server's run directory lives
        # under a short path; its files are copied into the test directory at teardown.
        data_dir = Path(tempfile.gettempdir()) / "phd-run" / f"{self.fw.session_id}-{port}"
        self._data_dirs.append((data_dir, self.test_dir / f"{name}.server-data"))
        # The reference server reads its accelerator from SUT_SERVER_ACCEL (--phd-accel).
        server = ServerProcess(list(cfg.server_cmd), port, data_dir, log, regressions=cfg.regressions,
                               env={"SUT_SERVER_ACCEL": cfg.accel})
        vm = TestVm(VmConfig(name, cpus, memory_mib, ssh_port), server, artifact, self.test_dir)
        self._vms.append(vm.close)
        self.vms.append(vm)
        if boot is not None:
            vm.add_file_disk(boot, device=BOOT_DEVICE)
        return vm

    def close(self) -> None:
        try:
            _teardown_all(self._vms, "VMs")
        finally:
            for port in self._ports:
                self.fw.ports.release(port)
            for run_dir, keep_as in self._data_dirs:
                _collect(run_dir, keep_as)

    def keep_running(self) -> str:
        """--phd-keep-on-failure: leave every VM of this test up; returns how to reach them.
        Ports stay taken for the rest of the run, so nothing else lands on them."""
        notes = []
        for vm in self.vms:
            notes.append(vm.how_to_reach())
            vm.close(keep_running=True)
        self._vms.clear()
        for run_dir, keep_as in self._data_dirs:
            _collect(run_dir, keep_as)
        return "\n".join(notes)


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
        self._disks: list[Callable[[], None]] = []
        self._ports: list[int] = []

    def create_crucible_disk(self, name: str = "data", *, size_gib: int = 1,
                             block_size: int = 512, extent_mib: int = 64) -> CrucibleDisk:
        """A blank Crucible disk: three fresh regions, each served by its own downstairs."""
        disk_id = str(uuidlib.uuid4())
        size, extent = size_gib * GIB, extent_mib * MIB
        prefix = f"phd-{self.fw.session_id}-{uuidlib.uuid4().hex[:6]}-{name}"
        downstairs: list[Downstairs] = []
        black_holes: list[BlackHole] = []
        try:
            for kind in BLACK_HOLE_KINDS:  # both kinds held, so a test can pick either
                black_holes.append(self.fw.ports.black_hole(kind))
            for i in range(3):
                port = self.fw.ports.allocate()
                self._ports.append(port)
                downstairs.append(self._downstairs(f"{prefix}-ds{i}", port))

            def bring_up(ds: Downstairs) -> None:
                ds.create_region(disk_id, block_size, extent // block_size, size // extent)
                ds.start()

            # The three are independent and each start is mostly waiting on Docker, so they
            # come up side by side; every error is collected before anything is torn down.
            with ThreadPoolExecutor(max_workers=3, thread_name_prefix="phd-ds") as pool:
                futures = [pool.submit(bring_up, ds) for ds in downstairs]
            errors = [exc for f in futures if (exc := f.exception()) is not None]
            if errors:
                raise errors[0] if len(errors) == 1 else HarnessError(
                    f"{len(errors)} downstairs of disk {name} failed to start: {errors}")
        except BaseException:
            for ds in downstairs:
                ds.destroy()
            for hole in black_holes:
                hole.close()
            raise
        disk = CrucibleDisk(name, size, block_size, extent, downstairs, black_holes, disk_id)
        self._disks.append(disk.destroy)
        return disk

    def create_file_disk(self, name: str = "data", *, base: Path | None = None,
                         size_gib: int = 1) -> FileDisk:
        """A file disk in the test directory: a qcow2 overlay of `base`, or blank raw.
        It goes away with the test directory (kept when the test fails)."""
        if not _NAME_OK.match(name):
            raise HarnessError(f"disk name {name!r} must match {_NAME_OK.pattern}")
        suffix = "raw" if base is None else "qcow2"
        return create_file_disk(self.test_dir / f"{name}.{suffix}", base=base, size_gib=size_gib)

    def _downstairs(self, name: str, port: int) -> Downstairs:
        cfg = self.fw.config
        log = None if cfg.output_mode == "null" else self.test_dir / f"{name}.log"
        if cfg.downstairs == "docker":
            return DockerDownstairs(self.fw.docker(), self.fw.downstairs_image(), name, port,
                                    self.fw.labels(self.node_id), log)
        return ProcessDownstairs(list(cfg.downstairs_cmd), name, port,
                                 self.test_dir / f"{name}-region", log)

    def close(self) -> None:
        try:
            _teardown_all(self._disks, "disks")
        finally:
            for port in self._ports:
                self.fw.ports.release(port)
