"""One instance: builds the backends, QEMU command line and driver from a SPEC."""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sut.path_policy import PathPolicy
from sut.server.backends import BlockBackend, CrucibleDisk
from sut.server.driver import NoSuchBackendError, StateDriver
from sut.server.images import LaunchFiles, open_spec_files
from sut.server.policy import TargetPolicy
from sut.server.qemu import QemuVm, RunDir, build_argv
from sut.server.regressions import NO_REGRESSIONS, Regressions
from sut.server.serial import SerialConsole
from sut.server.spec import CrucibleBackendSpec, FileBackend, InstanceEnsureRequest, backend_id


@dataclass(frozen=True)
class VmConfig:
    """Server-wide settings that shape every VM."""

    data_dir: Path
    regressions: Regressions = NO_REGRESSIONS
    accel: str = "tcg"
    qemu_binary: str = "qemu-system-x86_64"
    # None: the data dir only (the CLI passes --allow-path DIRs plus the defaults).
    paths: PathPolicy | None = None
    targets: TargetPolicy = field(default_factory=TargetPolicy.default)
    qemu_sandbox: bool = True
    # QEMU drops to this user (-runas) once it has its files and sockets; None: stays as is.
    qemu_user: str | None = None

    @property
    def path_policy(self) -> PathPolicy:
        return self.paths if self.paths is not None else PathPolicy([self.data_dir])


class Instance:
    def __init__(
        self,
        request: InstanceEnsureRequest,
        run_dir: RunDir,
        backends: dict[str, BlockBackend],
        config: VmConfig,
        logger: logging.Logger,
        files: LaunchFiles | None = None,
    ) -> None:
        self.request = request
        self.run_dir = run_dir
        self.files = files or LaunchFiles()
        self.serial = SerialConsole(logger=logger)
        sizes = {
            device: backends[backend_id(device)].size_bytes
            for device in request.spec.disks
            if backend_id(device) in backends
        }
        argv = build_argv(
            request.spec, run_dir, files=self.files, accel=config.accel, binary=config.qemu_binary,
            disk_sizes=sizes, sandbox=config.qemu_sandbox, run_as=config.qemu_user,
        )
        fds = {opened.fd: str(opened.path) for opened in self.files.opened}
        self.driver = StateDriver(
            backends=backends,
            vm_factory=lambda: QemuVm(argv, run_dir, self.serial, logger, pass_fds=fds),
            regressions=config.regressions,
            logger=logger,
            on_destroyed=self._destroyed,
        )

    async def _destroyed(self) -> None:
        try:
            await self.serial.close()
        finally:
            self.files.close()

    @classmethod
    async def create(
        cls, request: InstanceEnsureRequest, config: VmConfig, logger: logging.Logger
    ) -> Instance:
        """Validate what the SPEC alone cannot (socket paths, VCRs) and start the driver.

        Raises ``QemuError`` / ``BackendError`` with a message naming the fix.
        """
        spec = request.spec
        run_dir = RunDir(config.data_dir / f"vm-{request.properties.id.hex[:12]}")
        run_dir.check_socket_paths(list(spec.disks))
        # Every file first (before anything is created): a refused path leaves nothing behind.
        files = open_spec_files(spec, config.path_policy)
        backends: dict[str, BlockBackend] = {}
        created = not run_dir.path.exists()
        try:
            run_dir.path.mkdir(parents=True, exist_ok=True)
            for device, disk in spec.disks.items():
                if isinstance(disk.backend, CrucibleBackendSpec):
                    bid = backend_id(device)
                    backends[bid] = CrucibleDisk(
                        bid,
                        disk.backend.request_json,
                        run_dir.disk_socket(device),
                        read_only=disk.backend.readonly,
                        regressions=config.regressions.storage,
                        logger=logger.getChild(bid),
                        targets=config.targets,
                        paths=config.path_policy,
                    )
            instance = cls(request, run_dir, backends, config, logger, files)
        except BaseException:
            files.close()
            for backend in backends.values():
                await backend.close()
            if created:
                with contextlib.suppress(OSError):
                    shutil.rmtree(run_dir.path)
            raise
        instance.driver.start()
        return instance

    def describe(self) -> dict[str, object]:
        snapshot = self.driver.state
        return {
            "properties": self.request.properties.model_dump(mode="json"),
            "state": str(snapshot.state),
            "gen": snapshot.gen,
        }

    def disk_status(self, bid: str) -> dict[str, object]:
        snapshot = self.driver.state
        vm = {"vm_state": str(snapshot.state), "vm_gen": snapshot.gen, "backend_id": bid}
        for device, disk in self.request.spec.disks.items():
            if backend_id(device) == bid and isinstance(disk.backend, FileBackend):
                return {"type": "file", "path": str(disk.backend.path), **vm}
        return {"type": "crucible", **self.driver.backend_status(bid), **vm}

    def known_backends(self, kind: str | None = None) -> list[str]:
        """Backend ids of the disks, of one ``kind`` ("file" or "crucible") or all."""
        return sorted(
            backend_id(device)
            for device, disk in self.request.spec.disks.items()
            if kind is None or disk.backend.type == kind
        )


__all__ = ["Instance", "NoSuchBackendError", "VmConfig"]
