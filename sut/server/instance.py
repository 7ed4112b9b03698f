"""One instance: builds the backends, QEMU command line and driver from a v5 instance spec."""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sut import regressions as table
from sut.path_policy import PathPolicy
from sut.server.backends import BlockBackend, CrucibleDisk
from sut.server.driver import MigrationSetup, NoSuchBackendError, StateDriver
from sut.server.forwards import HostForward
from sut.server.images import LaunchFiles, open_spec_files
from sut.server.migration import FailureInjector, Link, MigrationError, SerialSnapshot, connect_to_source
from sut.server.policy import TargetPolicy
from sut.server.qemu import KernelBoot, QemuVm, RunDir, build_argv
from sut.server.regressions import NO_REGRESSIONS, Regressions
from sut.server.serial import SerialConsole
from sut.server.spec import (
    CrucibleStorageBackend,
    InstanceEnsureRequest,
    InstanceSpec,
    MigrationFailureInjector,
    apply_replacements,
    properties_json,
    spec_json,
)
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
        *,
        spec: InstanceSpec | None = None,
        incoming: Link | None = None,
    ) -> None:
        """``spec``: a migration target's (its source's, replacements applied); ``incoming``:
        a target's control connection to its source."""
        self.request = request
        self.spec = spec if spec is not None else request.spec
        self.run_dir = run_dir
        self.files = files or LaunchFiles()
        self.serial = SerialConsole(logger=logger)
        sizes = {key: backend.size_bytes for key, backend in backends.items()}
        argv = build_argv(
            self.spec, run_dir, files=self.files, accel=config.accel, binary=config.qemu_binary,
            disk_sizes=sizes, sandbox=config.qemu_sandbox, run_as=config.qemu_user,
            kernel_boot=KernelBoot(config.cmdline) if config.kernel is not None else None,
            forwards=config.forwards, incoming=incoming is not None,
        )
        fds = {opened.fd: str(opened.path) for opened in self.files.opened}
        injectors = list(self.spec.of(MigrationFailureInjector).values())
        injector = FailureInjector()
        if injectors:
            assert isinstance(injectors[0], MigrationFailureInjector)
            injector = FailureInjector(injectors[0].fail_exports, injectors[0].fail_imports)
        target = request.migration_target
        self.migration = MigrationSetup(
            spec_json=spec_json(self.spec),
            snapshot_serial=self._serial_snapshot,
            take_serial=lambda snap: self.serial.take_over(snap.data, snap.start),
            injector=injector,
            incoming=(target.migration_id, incoming) if target is not None and incoming is not None else None,
        )
        self.migration.status.log = logger
        self.driver = StateDriver(
            backends=backends,
            vm_factory=lambda: QemuVm(argv, run_dir, self.serial, logger, pass_fds=fds),
            regressions=config.regressions,
            logger=logger,
            on_destroyed=self._destroyed,
            migration=self.migration,
        )

    def _serial_snapshot(self) -> SerialSnapshot:
        piece = self.serial.snapshot()
        return SerialSnapshot(piece.start_offset, piece.data)

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

        Raises ``QemuError`` / ``BackendError`` / ``MigrationError`` with a message naming
        the fix. A migration target first connects to its source and takes its spec.
        """
        target = request.migration_target
        link: Link | None = None
        if target is None:
            spec = request.spec
        else:
            config.targets.check(target.src_addr, "init.value.src_addr")
            replacements = dict(target.replace_components)
            if config.regressions.enabled(table.MIGRATION_SAME_GENERATION):
                # REGRESSION migration-same-generation: the replacement VCRs (the next
                # generation) were dropped; the target's upstairs came up at the source's.
                replacements = {key: r for key, r in replacements.items()
                                if r.component != "CrucibleStorageBackend"}
            link, source_spec = await connect_to_source(target.src_addr, target.migration_id)
            try:
                spec = apply_replacements(source_spec, replacements)
            except ValueError as exc:
                await link.close(1011, "bad replacement")
                raise MigrationError(f"the source's spec does not take this target's replacements: "
                                     f"{exc}") from exc
        try:
            return await cls._create(request, config, logger, spec, link)
        except BaseException:
            if link is not None:
                await link.close(1011, "target creation failed")
            raise

    @classmethod
    async def _create(cls, request: InstanceEnsureRequest, config: VmConfig, logger: logging.Logger,
                      spec: InstanceSpec, link: Link | None) -> Instance:
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
            instance = cls(request, run_dir, backends, config, logger, files, spec=spec, incoming=link)
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
        value = spec_json(self.spec)
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
        return sorted(key for key, c in self.spec.components.items() if c.type in wanted)


__all__ = ["Instance", "NoSuchBackendError", "VmConfig"]
