"""One QEMU process per VM, controlled over QMP (``qemu.qmp``).

Launch is split as in QEMU's own ``machine.py``: pre-launch (QMP listener,
log file), launch (argv, started paused with ``-S``), post-launch (QMP
handshake raced against QEMU dying, serial console attached). Shutdown is
layered and idempotent: QMP ``quit``, then SIGTERM, then SIGKILL, then the
socket files are always removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import EventListener, Message, QMPClient

from sut.server.forwards import HostForward
from sut.server.images import ImageLayer, LaunchFiles
from sut.server.serial import SerialConsole
from sut.server.spec import CrucibleStorageBackend, InstanceSpec, NvmeDisk, VirtioDisk

QMP_TIMEOUT_S = 10.0
QUIT_GRACE_S = 5.0
TERM_GRACE_S = 5.0
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


class GuestEvent(enum.Enum):
    """Something the GUEST did to its machine (host-initiated resets and quits are not events)."""

    POWEROFF = "poweroff"
    RESET = "reset"


def _guest_initiated(message: Message) -> bool:
    # SHUTDOWN and RESET carry ``guest: true`` only when the guest asked
    # (ACPI poweroff, reboot); our own quit / system_reset carry false.
    data = message.get("data")
    return isinstance(data, dict) and bool(data.get("guest"))


class QemuError(Exception):
    """Root of errors about the QEMU process."""


class QemuOptionError(QemuError, ValueError):
    """A value cannot be written into a QEMU option string (NUL or newline)."""


def qemu_opt(value: str) -> str:
    """``value`` quoted for a QEMU option string (``key=VALUE,...``): commas doubled.

    THE one quoting function for option values built from input or from configuration (the
    data dir's socket paths, file names, ids). QemuOpts splits on a single comma and reads
    ``,,`` as a literal comma; nothing else is special inside a value. NUL cannot be passed
    in an argv and a newline has no business in any of our values: both are refused.
    -blockdev values are not written with this: they go as JSON (see :func:`_blockdev`).
    """
    if "\0" in value or "\n" in value or "\r" in value:
        raise QemuOptionError(f"{value!r}: a QEMU option value cannot contain NUL or a newline")
    return value.replace(",", ",,")


# QEMU's seccomp filter: no obsolete syscalls, no setuid/setgid, no fork/exec, no
# scheduler/affinity changes. Costs nothing at run time; a guest escape then cannot spawn
# processes or raise privileges through QEMU.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# With -runas QEMU itself calls setgid/setuid once, after it has opened everything, to drop
# to the unprivileged user; "deny" would kill it there (SIGSYS). Having dropped, the user
# cannot regain root (no capabilities, and spawn=deny forbids exec of a setuid binary).
SANDBOX_RUNAS = "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"


class VmLaunchError(QemuError):
    """QEMU did not come up; carries argv, exit code and the log tail."""

    def __init__(self, message: str, argv: list[str], exit_code: int | None, log_tail: str):
        self.argv = argv
        self.exit_code = exit_code
        self.log_tail = log_tail
        super().__init__(f"{message} (exit code {exit_code}); QEMU log tail:\n{log_tail}")


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot (the server's ``--kernel/--initrd/--cmdline``; v5 has no field)."""

    cmdline: str = "console=ttyS0"


@dataclass(frozen=True)
class RunDir:
    """File layout of one VM's run directory."""

    path: Path

    @property
    def qmp_socket(self) -> Path:
        return self.path / "qmp.sock"

    @property
    def serial_socket(self) -> Path:
        return self.path / "serial.sock"

    @property
    def log_file(self) -> Path:
        return self.path / "qemu.log"

    def disk_socket(self, device: str) -> Path:
        return self.path / f"{device}.nbd.sock"

    def check_socket_paths(self, devices: list[str]) -> None:
        paths = [self.qmp_socket, self.serial_socket, *map(self.disk_socket, devices)]
        longest = max(paths, key=lambda p: len(str(p)))
        if len(os.fsencode(longest)) > _MAX_SOCKET_PATH:
            raise QemuError(
                f"unix socket path too long ({len(str(longest))} > {_MAX_SOCKET_PATH} bytes): "
                f"{longest}; start the server with a shorter --data-dir"
            )
        for path in paths:
            qemu_opt(str(path))  # a newline in --data-dir is refused here, before QEMU sees it


def fixed_chs(size_bytes: int) -> str:
    """Explicit CHS geometry properties for a virtio-blk device of ``size_bytes``.

    Without them QEMU guesses the geometry by READING the first sector while it
    realizes the device, before the QMP greeting. A Crucible export holds I/O
    until activation, so that read would block QEMU's startup (and our QMP
    handshake) forever; with a fixed geometry QEMU reads nothing until ``cont``.
    """
    heads, secs = 16, 63
    cyls = max(1, min(65535, size_bytes // (heads * secs * 512)))
    return f"cyls={cyls},heads={heads},secs={secs}"


def _file_node(fdset: int) -> dict[str, object]:
    return {"driver": "file", "filename": f"/dev/fdset/{fdset}"}


def _blockdev(layers: tuple[ImageLayer, ...], fdsets: dict[int, int], read_only: bool) -> dict[str, object]:
    """A file disk as -blockdev JSON: every layer of its chain spelled out, each by fd set.

    A qcow2 layer always says ``backing`` (the next layer, or null): QEMU then opens no
    backing file by the name written in the image header.
    """
    top, rest = layers[0], layers[1:]
    node: dict[str, object] = {
        "driver": top.format, "read-only": read_only, "file": _file_node(fdsets[top.file.fd])}
    if top.format == "qcow2":
        node["backing"] = _blockdev(rest, fdsets, True) if rest else None
    return node


def build_argv(
    spec: InstanceSpec,
    run_dir: RunDir,
    *,
    files: LaunchFiles,
    accel: str = "tcg",
    binary: str = "qemu-system-x86_64",
    disk_sizes: dict[str, int] | None = None,
    sandbox: bool = True,
    run_as: str | None = None,
    kernel_boot: KernelBoot | None = None,
    forwards: tuple[HostForward, ...] = (),
    incoming: bool = False,
) -> list[str]:
    """The full QEMU command line for ``spec`` (pure; unit-tested).

    ``files`` are the spec's files, opened and checked by the server: QEMU gets them as
    inherited descriptors (the caller passes ``files.fds`` to the child), never by name.
    ``disk_sizes`` maps a Crucible backend's key to its size in bytes. Every option
    value built from input is quoted by :func:`qemu_opt` or written as -blockdev JSON.
    ``run_as``: QEMU drops to this user once it has opened its descriptors and sockets.
    ``kernel_boot`` (with ``files.kernel``): direct kernel boot; ``forwards``: host forwards
    of the first virtio NIC (in PCI order). ``incoming``: a migration target, whose state
    comes from a source (``-incoming defer``: the listening address is given over QMP).
    """
    disk_sizes = disk_sizes or {}
    argv = [
        binary,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-S",  # paused: vCPUs start only after block backends are active
        # A guest poweroff pauses QEMU and sends SHUTDOWN instead of exiting, so
        # the driver tells a poweroff from a crash and tears down in order
        # (QEMU flushes its disks on quit, then the backends close).
        "-no-shutdown",
        "-accel",
        accel,
        # graphics=off: SeaBIOS then prints to the serial port (no VGA here).
        "-machine",
        "q35,graphics=off",
        "-smp",
        str(spec.board.cpus),
        "-m",
        str(spec.board.memory_mb),
        # QEMU connects to our QMP listener (no poll for a socket to appear).
        "-chardev",
        f"socket,id=qmp,path={qemu_opt(str(run_dir.qmp_socket))}",
        "-mon",
        "chardev=qmp,mode=control",
        # The console socket exists whether or not the spec has com1 (the server attaches
        # to it); only a serial_port component connects a UART to it.
        "-chardev",
        f"socket,id=serial0,path={qemu_opt(str(run_dir.serial_socket))},server=on,wait=off",
    ]
    if spec.has_serial:
        argv += ["-serial", "chardev:serial0"]
    if incoming:
        argv += ["-incoming", "defer"]
    if sandbox:
        argv += ["-sandbox", SANDBOX_RUNAS if run_as else SANDBOX]
    if run_as:
        argv += ["-runas", run_as]
    if files.bootrom is not None:
        argv += ["-bios", f"/proc/self/fd/{files.bootrom.fd}"]
    if spec.pvpanic:
        argv += ["-device", "pvpanic"]
    if spec.smbios is not None:
        smbios = spec.smbios
        argv += ["-smbios", f"type=1,manufacturer={qemu_opt(smbios.manufacturer)},"
                 f"product={qemu_opt(smbios.product_name)},serial={qemu_opt(smbios.serial_number)},"
                 f"version={smbios.version}"]
    fdsets: dict[int, int] = {}
    for chain in files.disks.values():
        for layer in chain.layers:
            fdsets[layer.file.fd] = len(fdsets) + 1
            argv += ["-add-fd",
                     f"fd={layer.file.fd},set={fdsets[layer.file.fd]},opaque={qemu_opt(str(layer.file.path))}"]
    if kernel_boot is not None:
        if files.kernel is None:
            raise QemuError("kernel boot without an opened kernel file")
        # -kernel/-initrd are read with a plain open(): /proc/self/fd/N re-opens QEMU's
        # inherited descriptor, i.e. exactly the file the server checked.
        argv += ["-kernel", f"/proc/self/fd/{files.kernel.fd}", "-append", kernel_boot.cmdline]
        if files.initrd is not None:
            argv += ["-initrd", f"/proc/self/fd/{files.initrd.fd}"]
    # A directly booted kernel is QEMU's boot entry 0 (its linuxboot option ROM): the firmware
    # never picks a disk, so boot_settings only order the disks when the firmware boots them.
    order = spec.boot_order if kernel_boot is None else []
    boot_index = {device: index for index, device in enumerate(order)}
    for device, disk in spec.disks.items():
        node = disk.backend_id
        backend = spec.storage(node)
        blockdev: dict[str, object]
        if isinstance(backend, CrucibleStorageBackend):
            blockdev = {"driver": "nbd", "read-only": backend.readonly,
                        "server": {"type": "unix", "path": str(run_dir.disk_socket(node))}}
        else:
            blockdev = _blockdev(files.disks[node].layers, fdsets, backend.readonly)
        argv += ["-blockdev", json.dumps({"node-name": node, **blockdev})]
        where = disk.pci_path.qemu_addr()
        if isinstance(disk, VirtioDisk):
            dev = f"virtio-blk-pci,drive={qemu_opt(node)},id={qemu_opt(device)},{where}"
            if node in disk_sizes:
                dev += "," + fixed_chs(disk_sizes[node])
        else:
            assert isinstance(disk, NvmeDisk)
            dev = (f"nvme,drive={qemu_opt(node)},serial={qemu_opt(disk.serial_text() or device)},"
                   f"id={qemu_opt(device)},{where}")
        block_size = getattr(backend, "block_size", 512)
        if block_size != 512:
            dev += f",logical_block_size={block_size},physical_block_size={block_size}"
        if device in boot_index:
            dev += f",bootindex={boot_index[device]}"
        argv += ["-device", dev]
    for index, (name, nic) in enumerate(spec.nics.items()):
        # restrict=on: the guest reaches nothing beyond its host forwards,
        # which keeps tests on loopback (network rule).
        netdev = f"user,id={qemu_opt(nic.backend_id)},restrict=on"
        for fwd in forwards if index == 0 else ():
            netdev += f",hostfwd={qemu_opt(f'tcp:{fwd.host_addr}:{fwd.host_port}-:{fwd.guest_port}')}"
        argv += ["-netdev", netdev, "-device",
                 f"virtio-net-pci,netdev={qemu_opt(nic.backend_id)},id={qemu_opt(name)},"
                 f"{nic.pci_path.qemu_addr()}"]
    return argv


class QemuVm:
    """A QEMU process plus its QMP session; every method is safe to call once started."""

    def __init__(
        self, argv: list[str], run_dir: RunDir, serial: SerialConsole, logger: logging.Logger,
        pass_fds: dict[int, str] | None = None,
    ) -> None:
        self.argv = argv
        # fd -> the real path it was opened from: the argv names /proc/self/fd/N and fd sets,
        # so the log carries what each descriptor is.
        self.pass_fds = dict(pass_fds or {})
        self.run_dir = run_dir
        self._serial = serial
        self._log = logger
        self._qmp = QMPClient("phd-server")
        self._guest_events = EventListener(("SHUTDOWN", "RESET"), event_filter=_guest_initiated)
        self._qmp.register_listener(self._guest_events)
        self._proc: asyncio.subprocess.Process | None = None
        self._shutdown_done = False
        # When shutdown() sent quit / SIGTERM (monotonic): a shutdown cancelled part-way (the
        # server's stop deadline) and called again goes on from there instead of granting
        # each step its grace anew (a QEMU stuck flushing to a dead export took 20 s, not 10).
        self._quit_at: float | None = None
        self._term_at: float | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def launch(self) -> None:
        """Start QEMU paused, finish the QMP handshake, attach the serial console."""
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        await self._qmp.start_server(str(self.run_dir.qmp_socket))
        self._log.info("launching qemu", extra={"argv": self.argv, "fds": self.pass_fds})
        with self.run_dir.log_file.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C to the server must not hit QEMU directly
                preexec_fn=_die_with_parent,
                pass_fds=tuple(self.pass_fds),  # the checked files, by descriptor (images.py)
            )
        accept = asyncio.ensure_future(self._qmp.accept())
        died = asyncio.ensure_future(self._proc.wait())
        try:
            done, _ = await asyncio.wait(
                {accept, died}, timeout=QMP_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (accept, died):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        if accept not in done or accept.exception() is not None:
            code = self._proc.returncode
            await self.shutdown()
            reason = (
                "QEMU exited before QMP connected"
                if code is not None
                else ("QMP handshake failed or timed out")
            )
            raise VmLaunchError(reason, self.argv, code, self.log_tail())
        self._log.info("qemu started", extra={"pid": self._proc.pid})
        await self._serial.attach(self.run_dir.serial_socket)

    async def cont(self) -> None:
        await self._execute("cont")

    async def reset(self) -> None:
        await self._execute("system_reset")

    async def nmi(self) -> None:
        await self._execute("inject-nmi")

    async def qmp(self, command: str, arguments: dict[str, object] | None = None) -> object:
        """One QMP command and its answer (the migration's commands)."""
        try:
            return await asyncio.wait_for(self._qmp.execute(command, arguments), QMP_TIMEOUT_S)
        except Exception as exc:
            raise QemuError(f"QMP {command} failed: {exc!r}") from exc

    async def _execute(self, command: str) -> None:
        try:
            await asyncio.wait_for(self._qmp.execute(command), QMP_TIMEOUT_S)
        except Exception as exc:
            raise QemuError(f"QMP {command} failed: {exc!r}") from exc

    async def guest_event(self) -> GuestEvent:
        """The next guest-initiated poweroff or reset (waits; cancel-safe)."""
        message = await self._guest_events.get()
        return GuestEvent.POWEROFF if message["event"] == "SHUTDOWN" else GuestEvent.RESET

    async def wait_exit(self) -> int:
        if self._proc is None:
            raise QemuError("QEMU was never launched")
        return await self._proc.wait()

    async def shutdown(self) -> None:
        """quit -> SIGTERM -> SIGKILL, then remove sockets; idempotent."""
        proc = self._proc
        if self._shutdown_done:
            return
        try:
            if proc is not None and proc.returncode is None:
                if self._quit_at is None:
                    self._quit_at = time.monotonic()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._qmp.execute("quit"), QUIT_GRACE_S)
                if not await _exited(proc, _left(self._quit_at, QUIT_GRACE_S)):
                    if self._term_at is None:
                        self._term_at = time.monotonic()
                        self._log.warning("qemu ignored quit; sending SIGTERM", extra={"pid": proc.pid})
                        _signal(proc, signal.SIGTERM)
                    if not await _exited(proc, _left(self._term_at, TERM_GRACE_S)):
                        self._log.warning("qemu ignored SIGTERM; killing", extra={"pid": proc.pid})
                        _signal(proc, signal.SIGKILL)
                        await proc.wait()
            if proc is not None:
                self._log.info("qemu exited", extra={"pid": proc.pid, "exit_code": proc.returncode})
        finally:
            self._shutdown_done = proc is None or proc.returncode is not None
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()
            for path in (self.run_dir.qmp_socket, self.run_dir.serial_socket):
                path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.run_dir.log_file.read_text(errors="replace")
        except OSError:
            return "<no QEMU log>"
        return "\n".join(text.splitlines()[-lines:])


def _left(since: float, grace_s: float) -> float:
    """What remains of a grace period that began at ``since`` (monotonic); 0 once over."""
    return max(0.0, since + grace_s - time.monotonic())


async def _exited(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        return False
    return True


def _signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the forked child before exec: if the server dies, even by SIGKILL, the kernel
    kills QEMU too, so a killed server or harness never leaves a guest running."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
