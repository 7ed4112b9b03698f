"""A VM under test: one server process, one instance, its console, its disks, SSH.

The vocabulary follows PHD (`launch`, `wait_to_boot`, `run_shell_command`,
`replace_crucible_vcr`) plus what PHD lacks: `disk_status` shows WHY a VM is not running,
and `ssh()` gives a guest with sshd a real SSH session (exact stdout/stderr, SFTP).
"""

from __future__ import annotations

import contextlib
import enum
import json
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from phd.artifacts.store import GuestArtifact
from phd.core.errors import HarnessError, SutError, SutTimeout
from phd.core.teardown import Teardown
from phd.storage.crucible import CrucibleDisk, redacted_vcr
from phd.vm.client import InstanceState, ServerClient
from phd.vm.guest import CommandResult, GuestAdapter, adapter_for
from phd.vm.serial import SerialConsole
from phd.vm.server import ServerProcess
from phd.vm.ssh import SshSession, authorized_keys_command, connect_when_ready, generate_key
from phd.vm.status import StatusCheck, check_ok
from phd.vm.volume_status import VolumeStatus

__all__ = ["FileDisk", "GuestBoot", "MigrationFailures", "MigrationState", "TestVm", "VmConfig"]

TERMINAL = {InstanceState.DESTROYED, InstanceState.FAILED}
BOOT_DEVICE = "boot0"
GuestBoot = Literal["firmware", "kernel"]
NIC = "net0"
NIC_SLOT = 0x08
FIRST_DISK_SLOT = 0x10
_PHD_UUID = uuidlib.uuid5(uuidlib.NAMESPACE_URL, "https://github.com/oxidecomputer/propolis/phd")
# The spec key of the migration failure injector (the same on source and target, so a
# target's replacement finds it).
FAILURE_INJECTOR = "failure-injector"
# Propolis's PHD allows a migration this long per GiB of guest memory; TCG is slower.
MIGRATION_S_PER_GIB = 600


class MigrationState(enum.StrEnum):
    """The phases of a live migration (v5's MigrationState)."""

    SYNC = "Sync"
    RAM_PUSH = "RamPush"
    PAUSE = "Pause"
    RAM_PUSH_DIRTY = "RamPushDirty"
    DEVICE = "Device"
    RESUME = "Resume"
    RAM_PULL = "RamPull"
    SERVER = "Server"
    FINISH = "Finish"
    ERROR = "Error"


@dataclass(frozen=True)
class MigrationFailures:
    """A migration failure injector in the VM's spec: its server fails this many migration
    exports (as a source) and imports (as a target), as Propolis's does."""

    exports: int = 0
    imports: int = 0

    def component(self) -> dict[str, Any]:
        return {"fail_exports": self.exports, "fail_imports": self.imports}


def _pci(slot: int) -> dict[str, int]:
    return {"bus": 0, "device": slot, "function": 0}


@dataclass(frozen=True)
class VmConfig:
    name: str
    cpus: int = 2
    memory_mib: int = 512
    # A 127.0.0.1 port forwarded to the guest's port 22 (user-networking NIC `net0`);
    # None: the VM has no NIC.
    ssh_port: int | None = None
    # firmware: the server's BOOTROM (UEFI) boots the boot disk; kernel: the server boots the
    # guest's kernel and initrd directly (its own option).
    boot: GuestBoot = "kernel"
    # A migration failure injector component; None: the spec has none.
    migration_failures: MigrationFailures | None = None


@dataclass(frozen=True)
class FileDisk:
    """A disk image file the server opens itself; `base` is the backing file of a
    copy-on-write overlay (qcow2), None for a standalone image."""

    name: str
    path: Path
    format: str  # "raw" | "qcow2"
    size_bytes: int
    base: Path | None = None
    readonly: bool = False

    def backend(self) -> dict[str, Any]:
        """The v5 ``file_storage_backend`` component (the server reads the format, raw or
        qcow2, from the image itself: v5 has no field for it)."""
        return {"type": "file_storage_backend",
                "component": {"path": str(self.path), "readonly": self.readonly, "block_size": 512}}


@dataclass
class _Attached:
    device: str
    interface: str
    disk: CrucibleDisk | FileDisk

    @property
    def backend_id(self) -> str:
        return f"{self.device}-backend"


class _Phase(enum.Enum):
    NEW = "new"
    ENSURED = "ensured"
    CLOSED = "closed"


@dataclass(eq=False)  # a VM is itself: two handles are never "equal"
class TestVm:
    """A VM under test. Tests get one from `vm_factory.new_vm()` (or `successor()`), never
    by calling this class: the factory allocates its ports, server and boot disk and tears
    it all down. Only the four public fields below are constructor parameters."""

    __test__ = False  # not a pytest test class despite the name

    config: VmConfig
    server: ServerProcess
    guest: GuestArtifact
    test_dir: Path
    # Internal state, set by the VM's own methods, never by a caller.
    disks: list[_Attached] = field(init=False, default_factory=list)
    _client: ServerClient | None = field(init=False, default=None, repr=False)
    _console: SerialConsole | None = field(init=False, default=None, repr=False)
    _adapter: GuestAdapter | None = field(init=False, default=None, repr=False)
    _ssh: SshSession | None = field(init=False, default=None, repr=False)
    # The VM's public key line, once generated, and whether it is in the guest's authorized_keys.
    _ssh_public: str | None = field(init=False, default=None, repr=False)
    _ssh_installed: bool = field(init=False, default=False, repr=False)
    _phase: _Phase = field(init=False, default=_Phase.NEW, repr=False)
    _epoch: float = field(init=False, default_factory=time.monotonic, repr=False)
    # Set by the factory: called once, when the guest first reaches its shell, or else when the
    # VM closes - it spawns the next spare server (phd.vm.spares) at a moment when the spawn
    # (a Python process importing its HTTP stack) does not compete with this guest's boot.
    on_settled: Callable[[], None] | None = field(init=False, default=None, repr=False)

    @contextlib.contextmanager
    def step(self, name: str, **detail: object) -> Iterator[None]:
        """Log a step with its start (since the VM object was made) and duration, as JSON lines
        in `<test dir>/<vm>.steps.jsonl`; a failed step is logged with its error. The
        framework logs its own calls; a test may wrap its phases: `with vm.step("fill disk"):`."""
        start = time.monotonic()
        outcome = "ok"
        try:
            yield
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {str(exc)[:300]}"
            raise
        finally:
            record = {"vm": self.config.name, "step": name, "at_s": round(start - self._epoch, 3),
                      "duration_s": round(time.monotonic() - start, 3), "outcome": outcome, **detail}
            with (self.test_dir / f"{self.config.name}.steps.jsonl").open("a") as f:
                f.write(json.dumps(record, default=str) + "\n")

    # --- configuration (before launch) --------------------------------------------
    def attach(self, disk: CrucibleDisk | FileDisk, device: str = "data0",
               interface: str = "virtio") -> None:
        """Attach a disk from the disk factory (`disk_factory.create_crucible_disk()` or
        `create_file_disk()`) as `device`, on `interface` "virtio" or "nvme", before launch.
        Devices appear in attachment order (see `device_path`)."""
        self._attach(_Attached(device, interface, disk))

    @property
    def boot_disk(self) -> CrucibleDisk | FileDisk | None:
        """What a disk-image guest boots from (device `boot0`): a copy-on-write overlay of the
        image, or a Crucible disk with the image as its read-only parent."""
        for att in self.disks:
            if att.device == BOOT_DEVICE:
                return att.disk
        return None

    def _attach(self, att: _Attached) -> None:
        if self._phase is not _Phase.NEW:
            raise HarnessError("disks must be added before the VM is launched")
        if any(a.device == att.device for a in self.disks):
            raise HarnessError(f"VM {self.config.name} already has a disk device {att.device!r}")
        self.disks.append(att)
        if isinstance(att.disk, CrucibleDisk):
            att.disk.attached_to(self)

    def spec(self) -> dict[str, Any]:
        """The v5 InstanceSpec: ``{board, components}``. Each disk is a device component
        (``virtio_disk`` / ``nvme_disk``, key = the device name) plus its storage backend
        (key ``<device>-backend``, PHD's naming), on PCI slots in attachment order from 0x10:
        the boot disk, attached first, becomes vda. The guest kernel, initrd and command line
        and the SSH forward are the server's command line (`phd.server`), not spec fields."""
        components: dict[str, Any] = {"com1": {"type": "serial_port", "component": {"num": "com1"}}}
        for slot, att in enumerate(self.disks, start=FIRST_DISK_SLOT):
            if isinstance(att.disk, FileDisk):
                components[att.backend_id] = att.disk.backend()
            else:
                vcr = att.disk.vcr()
                self._record_vcr(att, vcr)
                components[att.backend_id] = {"type": "crucible_storage_backend", "component": {
                    "request_json": json.dumps(vcr), "readonly": False}}
            device: dict[str, Any] = {"backend_id": att.backend_id, "pci_path": _pci(slot)}
            if att.interface == "nvme":
                device["serial_number"] = list(att.device.encode()[:20].ljust(20, b"\0"))
            components[att.device] = {"type": f"{att.interface}_disk", "component": device}
        if self.boot_disk is not None:
            components["boot-settings"] = {"type": "boot_settings",
                                           "component": {"order": [{"id": BOOT_DEVICE}]}}
        if self.config.migration_failures is not None:
            components[FAILURE_INJECTOR] = {"type": "migration_failure_injector",
                                            "component": self.config.migration_failures.component()}
        if self.config.ssh_port is not None:
            components[NIC] = {"type": "virtio_nic", "component": {
                "backend_id": f"{NIC}-backend", "interface_id": str(_PHD_UUID),
                "pci_path": _pci(NIC_SLOT)}}
            components[f"{NIC}-backend"] = {"type": "virtio_network_backend", "component": {"vnic_name": NIC}}
        return {"board": {"cpus": self.config.cpus, "memory_mb": self.config.memory_mib,
                          "chipset": {"type": "i440_fx", "value": {"enable_pcie": False}}},
                "components": components}

    # --- lifecycle ----------------------------------------------------------------
    @property
    def client(self) -> ServerClient:
        """The HTTP client of this VM's server, for requests the framework has no verb for.
        The server starts in `launch()` (or `ensure()`); reading this before is an error."""
        if self._client is None:
            raise HarnessError(f"VM {self.config.name} has no server running yet: call "
                               "vm.launch() (or vm.ensure()) before using vm.client")
        return self._client

    def _start_server(self) -> ServerClient:
        if self._phase is _Phase.CLOSED:
            raise HarnessError(f"VM {self.config.name} is closed; make a new one (vm_factory.new_vm)")
        if self._client is None:
            self.server.ensure_started()  # a spare (phd.vm.spares) may have been spawned already
            self._client = ServerClient(self.server.base_url)
        return self._client

    def _settled(self) -> None:
        hook, self.on_settled = self.on_settled, None
        if hook is not None:
            hook()

    def properties(self) -> dict[str, Any]:
        """The v5 InstanceProperties: a fresh id, the VM's name, and metadata naming phd."""
        phd = str(_PHD_UUID)
        return {"id": str(uuidlib.uuid4()), "name": self.config.name,
                "description": f"phd test VM {self.config.name}",
                "metadata": {"project_id": phd, "silo_id": phd, "sled_id": phd,
                             "sled_model": "phd", "sled_revision": 0, "sled_serial": "phd"}}

    def ensure(self) -> None:
        """Start the VM's server (on the first call) and create the instance on it
        (`PUT /instance`, state Creating); `launch()` is ensure + run."""
        client = self._start_server()
        client.ensure(self.properties(), self.spec())
        self._phase = _Phase.ENSURED

    def run(self) -> None:
        self.client.put_state("Run")

    def launch(self) -> None:
        """Ensure the instance and ask it to run (PHD's `launch`); does not wait for Running."""
        with self.step("launch"):
            self.ensure()
            self.run()

    def stop(self) -> None:
        self.client.put_state("Stop")

    def reboot(self) -> None:
        """Ask for a reboot (204 even when one is already pending); does not wait. After it,
        `wait_for_state(RUNNING)` then `wait_to_boot()` reach the new boot's shell."""
        self.client.put_state("Reboot")

    def state(self) -> InstanceState:
        return self.client.state()[0]

    def wait_for_state(self, wanted: InstanceState, timeout_s: float) -> None:
        """Follow the state monitor (long-poll) until `wanted`; fail fast on a terminal state."""
        with self.step("wait_for_state", wanted=str(wanted), timeout_s=timeout_s):
            self._wait_for_state(wanted, timeout_s)

    def _wait_for_state(self, wanted: InstanceState, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state, gen = self.client.state()
        while state is not wanted:
            if state in TERMINAL:
                raise SutError(f"VM {self.config.name} reached {state} while waiting for {wanted}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SutTimeout(f"VM {self.config.name} to reach {wanted}", timeout_s, state)
            try:
                state, gen = self.client.state_monitor(gen + 1, timeout_s=min(remaining, 10.0))
            except httpx.TimeoutException:
                state, gen = self.client.state()

    # --- migration --------------------------------------------------------------------
    def migrate_from(self, source: TestVm, timeout_s: float | None = None, *,
                     migration_id: str | None = None) -> None:
        """Take the running guest over from `source` (live migration): this VM's server is
        made a migration target of `source`'s (`PUT /instance` with a MigrationTarget init)
        and the migration is followed to its end. Make this VM with
        `vm_factory.new_migration_target(source)`: the same guest, board and disks.

        Each Crucible disk moves at the next generation (the replacement VCR goes in
        `replace_components`), so this VM's activation fences `source`'s upstairs; a
        migration failure injector of this VM's config replaces `source`'s. On success this
        VM runs, its console continues the source's shell (logged in if the source's was)
        and `source` is Destroyed. A failed migration raises SutError naming both sides'
        migration status (the source then runs on). `timeout_s`: default 600 s per GiB of
        guest memory.
        """
        timeout = timeout_s if timeout_s is not None else max(
            120.0, MIGRATION_S_PER_GIB * self.config.memory_mib / 1024)
        with self.step("migrate_from", source=source.config.name, timeout_s=timeout):
            mid = self.start_migration_from(source, migration_id=migration_id)
            record = self._wait_for_migration("in", {MigrationState.FINISH, MigrationState.ERROR}, timeout)
            if record["state"] != MigrationState.FINISH:
                raise SutError(f"migration {mid} from {source.config.name} to {self.config.name} "
                               f"failed: target {self.migration_status()}, source "
                               f"{source._migration_status_or_unknown()}")
            self._wait_for_state(InstanceState.RUNNING, 60.0)
        client = self.client
        if source._adapter is not None:
            # Only what the guest prints from now on: the carried-over history holds the
            # source's command markers (numbering goes on from them, see continued_on).
            _, end = client.serial_history(most_recent=0)
            self._open_console(from_start=end)
            self._adapter = source._adapter.continued_on(self.console)

    def start_migration_from(self, source: TestVm, *, migration_id: str | None = None) -> str:
        """Only begin what `migrate_from` does (the MigrationTarget ensure) and return the
        migration id; the migration goes on in the servers. For tests of what happens
        DURING a migration (a stop, say); follow it with `wait_for_migration("in", ...)`.
        The console is not carried over: `migrate_from` does that."""
        if self._phase is not _Phase.NEW:
            raise HarnessError(f"VM {self.config.name} was already created; a migration target "
                               "must be a new VM (vm_factory.new_migration_target)")
        if source is self:
            raise HarnessError("a VM cannot migrate from itself")
        mid = migration_id or str(uuidlib.uuid4())
        client = self._start_server()
        replace = self._replacement_components()
        src_addr = source.server.base_url.removeprefix("http://")
        with self.step("start_migration_from", source=source.config.name, migration_id=mid):
            client.ensure_migration_target(self.properties(), mid, src_addr, replace)
        self._phase = _Phase.ENSURED
        return mid

    def _replacement_components(self) -> dict[str, Any]:
        replace: dict[str, Any] = {}
        for att in self.disks:
            if isinstance(att.disk, CrucibleDisk):
                att.disk.set_generation(att.disk.generation + 1)
                vcr = att.disk.vcr()
                self._record_vcr(att, vcr)
                replace[att.backend_id] = {"component": "CrucibleStorageBackend",
                                           "spec": {"request_json": json.dumps(vcr), "readonly": False}}
        if self.config.migration_failures is not None:
            replace[FAILURE_INJECTOR] = {"component": "MigrationFailureInjector",
                                         "spec": self.config.migration_failures.component()}
        return replace

    def migration_status(self) -> dict[str, Any]:
        """``{migration_in, migration_out}``: each ``{id, state}`` of the latest migration
        into / out of this VM's server, or None."""
        return self.client.migration_status()

    def _migration_status_or_unknown(self) -> str:
        try:
            return str(self.migration_status())
        except Exception as exc:  # noqa: BLE001 - only used in an error message
            return f"unknown ({exc})"

    def wait_for_migration(self, direction: str, wanted: MigrationState | set[MigrationState],
                           timeout_s: float) -> dict[str, Any]:
        """Poll the migration status until the migration `direction` ("in" or "out") is in
        `wanted`; returns its ``{id, state}``. Error ends the wait at once unless wanted."""
        states = {wanted} if isinstance(wanted, MigrationState) else set(wanted)
        with self.step("wait_for_migration", direction=direction, wanted=sorted(states), timeout_s=timeout_s):
            return self._wait_for_migration(direction, states, timeout_s)

    def _wait_for_migration(self, direction: str, wanted: set[MigrationState],
                            timeout_s: float) -> dict[str, Any]:
        if direction not in ("in", "out"):
            raise HarnessError(f"direction must be 'in' or 'out', got {direction!r}")
        key = f"migration_{direction}"
        deadline = time.monotonic() + timeout_s
        seen: list[str] = []
        while True:
            record = self.client.migration_status().get(key)
            if record is not None:
                state = MigrationState(record["state"])
                if not seen or seen[-1] != state:
                    seen.append(state)
                if state in wanted:
                    return dict(record)
                if state is MigrationState.ERROR:
                    raise SutError(f"VM {self.config.name}: {key} reached Error while waiting for "
                                   f"{sorted(wanted)} (phases seen: {seen})")
            if time.monotonic() >= deadline:
                raise SutTimeout(f"VM {self.config.name}: {key} to reach {sorted(wanted)}", timeout_s,
                                 f"phases seen: {seen or 'none'}")
            # A poll interval against the deadline above (the status has no long-poll).
            time.sleep(0.1)

    def serial_history(self, from_start: int = 0) -> tuple[bytes, int]:
        """The server's serial history from byte `from_start` and the offset past it."""
        return self.client.serial_history(from_start=from_start)

    # --- guest ----------------------------------------------------------------------
    @property
    def console(self) -> SerialConsole:
        if self._console is None:
            self._open_console(from_start=0)
        assert self._console is not None
        return self._console

    def _open_console(self, from_start: int) -> None:
        if self._console is not None:
            self._console.close()
        self._console = SerialConsole(self.client.serial_ws_url(from_start),
                                      transcript=self.test_dir / f"{self.config.name}.serial.log")
        self._console.connect()

    def wait_to_boot(self, timeout_s: float | None = None) -> None:
        """Wait for the guest's login prompt, log in, reach a shell."""
        with self.step("wait_to_boot"):
            self._adapter = self._adapter_class()(self.console)
            self._adapter.login(timeout_s)
        self._settled()

    def run_shell_command(self, command: str, *, check: StatusCheck = check_ok,
                          timeout_s: float = 60.0) -> CommandResult:
        """Run `command` on the serial console shell: exact output and exit status; `check`
        (phd.check_ok, check_err or ignore_status; nothing else) says what the status must be."""
        if self._adapter is None:
            raise HarnessError("call wait_to_boot() before run_shell_command()")
        with self.step("run_shell_command", command=command):
            return self._adapter.run(command, check=check, timeout_s=timeout_s)

    # --- ssh --------------------------------------------------------------------------
    @property
    def supports_ssh(self) -> bool:
        """The guest runs sshd (its adapter says so) and the VM has the forward for it."""
        return self.config.ssh_port is not None and self._adapter_class().has_sshd

    def _adapter_class(self) -> type[GuestAdapter]:
        # The manifest's guest_os names the adapter family; it defaults to the key.
        return adapter_for(self.guest.guest_os or self.guest.name)

    def ssh(self, timeout_s: float = 120.0) -> SshSession:
        """An SSH session to the guest as root (reused; reconnected after a reboot).

        The first call makes an ed25519 key in the test directory, installs it through
        the serial console and waits until sshd accepts it.
        """
        if self.config.ssh_port is None:
            raise HarnessError(f"VM {self.config.name} has no SSH forward: create it with "
                               "vm_factory.new_vm(..., ssh=True)")
        if self._adapter is None:
            raise HarnessError("call wait_to_boot() before ssh(): the key goes in through the console")
        if not self._adapter.has_sshd:
            raise HarnessError(f"guest {self.guest.name} runs no sshd; use run_shell_command()")
        if self._ssh is not None and self._ssh.active:
            return self._ssh
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        key = self.test_dir / f"{self.config.name}.ssh_ed25519"
        if self._ssh_public is None:
            self._ssh_public = generate_key(key, comment=f"phd-{self.config.name}")
        if not self._ssh_installed:
            # The key lives on the VM's own disk, so it survives a guest reboot.
            self.run_shell_command(authorized_keys_command(self._ssh_public))
            self._ssh_installed = True
        with self.step("ssh_connect", port=self.config.ssh_port):
            self._ssh = connect_when_ready(self.config.ssh_port, key,
                                           user=self._adapter.user, timeout_s=timeout_s)
        return self._ssh

    # --- disks ----------------------------------------------------------------------
    def _attachment(self, disk: CrucibleDisk | FileDisk) -> _Attached:
        for att in self.disks:
            if att.disk is disk:
                return att
        raise HarnessError(f"disk {disk.name} is not attached to VM {self.config.name}")

    def backend_id(self, disk: CrucibleDisk | FileDisk) -> str:
        return self._attachment(disk).backend_id

    def device_path(self, disk: CrucibleDisk | FileDisk) -> str:
        """The disk's block device in a Linux guest. Devices are created in attachment order,
        so the n-th virtio disk is /dev/vd<a+n> and the n-th NVMe one /dev/nvme<n>n1."""
        att = self._attachment(disk)
        same = [a for a in self.disks if a.interface == att.interface]
        n = same.index(att)
        if att.interface == "nvme":
            return f"/dev/nvme{n}n1"
        return f"/dev/vd{chr(ord('a') + n)}"

    def replace_crucible_vcr(self, disk: CrucibleDisk, timeout_s: float = 30.0, *,
                             vcr: dict[str, Any] | None = None) -> str:
        """Send the disk's current VCR as a replacement (PHD's `replace_crucible_vcr`) and
        return the server's answer, a ReplaceResult ("started", "vcr_matches", ...). `vcr`: send this one
        instead (to test the rules a replacement must follow); a refusal raises ServerError
        (status 400, with the rule in its body)."""
        att = self._attachment(disk)
        vcr = disk.vcr() if vcr is None else vcr
        self._record_vcr(att, vcr)
        gen = max((sub.get("gen", 0) for sub in vcr.get("sub_volumes", [])), default=0)
        try:
            with self.step("replace_crucible_vcr", backend=att.backend_id, gen=gen):
                return self.client.replace_vcr(att.backend_id, vcr, timeout_s=timeout_s)
        except httpx.TimeoutException:
            raise SutTimeout(
                f"the server to answer a VCR replacement for {att.backend_id} (state "
                f"{self._state_or_unknown()}); the server is not serving its request queue",
                timeout_s, self.disk_status(disk)) from None

    def disk_status(self, disk: CrucibleDisk) -> VolumeStatus:
        """The server's VolumeStatus of a Crucible disk: generation, upstairs state, whether a
        reconciliation or live repair is in progress, each downstairs' state (and, from the
        reference server, why a downstairs is not active)."""
        return self.client.disk_status(self.backend_id(disk))

    def _state_or_unknown(self) -> str:
        try:
            return str(self.state())
        except Exception:  # noqa: BLE001 - only used in an error message
            return "unknown"

    def _record_vcr(self, att: _Attached, vcr: dict[str, Any]) -> None:
        """Append the VCR to `<vm>.<device>.vcr.jsonl`, its key redacted (results are kept)."""
        path = self.test_dir / f"{self.config.name}.{att.device}.vcr.jsonl"
        with path.open("a") as f:
            f.write(json.dumps(redacted_vcr(vcr)) + "\n")

    # --- teardown -------------------------------------------------------------------
    def how_to_reach(self) -> str:
        """Where a person finds this VM's API, serial console and SSH (for kept VMs)."""
        state = self._state_or_unknown() if self.server.alive() else "server not running"
        lines = [f"VM {self.config.name}: server pid {self.server.pid}, state {state}",
                 f"  API:     curl {self.server.base_url}/instance",
                 # From the server's address, not self.client: this text must describe
                 # what is there, even for a VM whose server never started.
                 f"  console: python -m websockets "
                 f"{self.server.base_url.replace('http://', 'ws://', 1)}/instance/serial?from_start=0"]
        key = self.test_dir / f"{self.config.name}.ssh_ed25519"
        if self.config.ssh_port is not None and key.exists():
            lines.append(f"  SSH:     ssh -i {key} -p {self.config.ssh_port} -o StrictHostKeyChecking=no "
                         "-o UserKnownHostsFile=/dev/null root@127.0.0.1")
        elif self.config.ssh_port is not None:
            lines.append(f"  SSH:     127.0.0.1:{self.config.ssh_port} (no key was installed: the "
                         "test never called vm.ssh(); log in on the console)")
        return "\n".join(lines)

    def close(self, *, keep_running: bool = False) -> None:
        """Stop the server (which stops the VM); idempotent; errors raised together.

        keep_running: only let go of this process's handles (console, SSH, HTTP); the
        server, its QEMU and the disks stay up for a person to look at (`phd sweep`, or the
        next run, removes them once this run has ended).
        """
        if self._phase is _Phase.CLOSED:
            return
        self._phase = _Phase.CLOSED
        teardown = Teardown(f"tearing down VM {self.config.name}")
        ssh, self._ssh = self._ssh, None
        if ssh is not None:
            with teardown.step():
                ssh.close()
        if self._console is not None:
            with teardown.step():
                self._console.close()
        if self._client is not None:
            with teardown.step():
                self._client.close()
        if not keep_running:
            with teardown.step():
                self.server.stop()
        if self._client is not None:  # it had a server: the next VM may want one like it
            with teardown.step():
                self._settled()
        teardown.finish()
