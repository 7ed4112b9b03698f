"""One instance: builds the backends, QEMU command line and driver from a v5 instance spec."""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sut.path_policy import PathPolicy
from sut.server.backends import BlockBackend, CrucibleDisk
from sut.server.driver import NoSuchBackendError, StateDriver
from sut.server.forwards import HostForward
from sut.server.images import LaunchFiles, open_spec_files
from sut.server.policy import TargetPolicy
from sut.server.qemu import KernelBoot, QemuVm, RunDir, build_argv
from sut.server.regressions import NO_REGRESSIONS, Regressions
from sut.server.serial import SerialConsole
from sut.server.spec import CrucibleStorageBackend, InstanceEnsureRequest, properties_json
from sut.server.volume_status import volume_status


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
    # What v5 has no field for, from the server's command line: the guest firmware (the
    # BOOTROM argument; None: QEMU's own), direct kernel boot, the NIC's host forwards.
    bootrom: Path | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = "console=ttyS0"
    forwards: tuple[HostForward, ...] = ()

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
        sizes = {key: backend.size_bytes for key, backend in backends.items()}
        argv = build_argv(
            request.spec, run_dir, files=self.files, accel=config.accel, binary=config.qemu_binary,
            disk_sizes=sizes, sandbox=config.qemu_sandbox, run_as=config.qemu_user,
            kernel_boot=KernelBoot(config.cmdline) if config.kernel is not None else None,
            forwards=config.forwards,
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
        crucible = spec.of(CrucibleStorageBackend)
        run_dir.check_socket_paths(list(crucible))
        # Every file first (before anything is created): a refused path leaves nothing behind.
        files = open_spec_files(spec, config.path_policy, kernel=config.kernel, initrd=config.initrd,
                                bootrom=config.bootrom)
        backends: dict[str, BlockBackend] = {}
        created = not run_dir.path.exists()
        try:
            run_dir.path.mkdir(parents=True, exist_ok=True)
            for bid, component in crucible.items():
                assert isinstance(component, CrucibleStorageBackend)
                backends[bid] = CrucibleDisk(
                    bid,
                    component.request_json,
                    run_dir.disk_socket(bid),
                    read_only=component.readonly,
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
        """The document's ``Instance``: ``{properties, state}``."""
        return {"properties": properties_json(self.request.properties), "state": str(self.driver.state.state)}

    def describe_spec(self) -> dict[str, object]:
        """The document's ``InstanceSpecGetResponse`` (the spec as it was given)."""
        spec = self.request.spec
        value: dict[str, object] = {
            "board": spec.board.model_dump(mode="json", exclude_none=True),
            "components": {key: c.dump() for key, c in spec.components.items()},
        }
        if spec.smbios is not None:
            value["smbios"] = spec.smbios.model_dump(mode="json")
        return {"properties": properties_json(self.request.properties),
                "spec": {"type": "Present", "value": value}, "state": str(self.driver.state.state)}

    def volume_status(self, bid: str) -> dict[str, object]:
        """The document's ``VolumeStatus`` of a Crucible backend (NoSuchBackendError else)."""
        return volume_status(self.driver.backend_status(bid))

    def known_backends(self, kind: str | None = None) -> list[str]:
        """Keys of the storage backends, of one ``kind`` ("file", "blob", "crucible") or all."""
        names = {"crucible": "crucible_storage_backend", "file": "file_storage_backend",
                 "blob": "blob_storage_backend"}
        wanted = {names[kind]} if kind is not None else set(names.values())
        return sorted(key for key, c in self.request.spec.components.items() if c.type in wanted)


__all__ = ["Instance", "NoSuchBackendError", "VmConfig"]
