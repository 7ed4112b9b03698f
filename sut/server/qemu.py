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
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import EventListener, Message, QMPClient

from sut.server.serial import SerialConsole
from sut.server.spec import CrucibleBackendSpec, FileBackend, FirmwareBoot, InstanceSpec, backend_id

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


class VmLaunchError(QemuError):
    """QEMU did not come up; carries argv, exit code and the log tail."""

    def __init__(self, message: str, argv: list[str], exit_code: int | None, log_tail: str):
        self.argv = argv
        self.exit_code = exit_code
        self.log_tail = log_tail
        super().__init__(f"{message} (exit code {exit_code}); QEMU log tail:\n{log_tail}")


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


def build_argv(
    spec: InstanceSpec,
    run_dir: RunDir,
    *,
    accel: str = "tcg",
    binary: str = "qemu-system-x86_64",
    disk_sizes: dict[str, int] | None = None,
) -> list[str]:
    """The full QEMU command line for ``spec`` (pure; unit-tested).

    ``disk_sizes`` maps a Crucible disk's device name to its size in bytes.
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
        str(spec.board.memory_mib),
        # QEMU connects to our QMP listener (no poll for a socket to appear).
        "-chardev",
        f"socket,id=qmp,path={run_dir.qmp_socket}",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"socket,id=serial0,path={run_dir.serial_socket},server=on,wait=off",
        "-serial",
        "chardev:serial0",
    ]
    boot = spec.boot
    if isinstance(boot, FirmwareBoot):
        boot_index = {device: index for index, device in enumerate(boot.order)}
    else:
        boot_index = {}
        argv += ["-kernel", str(boot.kernel), "-append", boot.cmdline]
        if boot.initrd is not None:
            argv += ["-initrd", str(boot.initrd)]
    for device, disk in spec.disks.items():
        node = backend_id(device)
        backend = disk.backend
        if isinstance(backend, FileBackend):
            ro = "on" if backend.readonly else "off"
            blockdev = (
                f"driver={backend.format},node-name={node},read-only={ro},"
                f"file.driver=file,file.filename={backend.path}"
            )
        else:
            assert isinstance(backend, CrucibleBackendSpec)
            ro = "on" if backend.readonly else "off"
            blockdev = (
                f"driver=nbd,node-name={node},read-only={ro},"
                f"server.type=unix,server.path={run_dir.disk_socket(device)}"
            )
        argv += ["-blockdev", blockdev]
        if disk.interface == "virtio":
            dev = f"virtio-blk-pci,drive={node},id={device}"
            if device in disk_sizes:
                dev += "," + fixed_chs(disk_sizes[device])
        else:
            dev = f"nvme,drive={node},serial={device},id={device}"
        if device in boot_index:
            dev += f",bootindex={boot_index[device]}"
        argv += ["-device", dev]
    for name, nic in spec.nics.items():
        # restrict=on: the guest reaches nothing beyond its host forwards,
        # which keeps tests on loopback (network rule).
        netdev = f"user,id={name},restrict=on"
        for fwd in nic.forwards:
            netdev += f",hostfwd=tcp:{fwd.host_addr}:{fwd.host_port}-:{fwd.guest_port}"
        argv += ["-netdev", netdev, "-device", f"virtio-net-pci,netdev={name},id={name}-nic"]
    return argv


class QemuVm:
    """A QEMU process plus its QMP session; every method is safe to call once started."""

    def __init__(
        self, argv: list[str], run_dir: RunDir, serial: SerialConsole, logger: logging.Logger
    ) -> None:
        self.argv = argv
        self.run_dir = run_dir
        self._serial = serial
        self._log = logger
        self._qmp = QMPClient("phd-server")
        self._guest_events = EventListener(("SHUTDOWN", "RESET"), event_filter=_guest_initiated)
        self._qmp.register_listener(self._guest_events)
        self._proc: asyncio.subprocess.Process | None = None
        self._shutdown_done = False

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def launch(self) -> None:
        """Start QEMU paused, finish the QMP handshake, attach the serial console."""
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        await self._qmp.start_server(str(self.run_dir.qmp_socket))
        self._log.info("launching qemu", extra={"argv": self.argv})
        with self.run_dir.log_file.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C to the server must not hit QEMU directly
                preexec_fn=_die_with_parent,
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
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._qmp.execute("quit"), QUIT_GRACE_S)
                if not await _exited(proc, QUIT_GRACE_S):
                    self._log.warning("qemu ignored quit; sending SIGTERM", extra={"pid": proc.pid})
                    _signal(proc, signal.SIGTERM)
                    if not await _exited(proc, TERM_GRACE_S):
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
