"""One server-under-test process per VM.

The process is started from an argv list: the configurable `--phd-server-cmd`, then
propolis-server's own command line, `run <BOOTROM> 127.0.0.1:<PORT>`, then our options for
what the v5 API has no field for (`--data-dir`, `--allow-path`, direct kernel boot with
`--kernel/--initrd/--cmdline`, the SSH forward `--forward`, `--regression`). It runs as a
`phd.core.process.ManagedProcess`: its own session (a Ctrl-C at the terminal
reaches only the harness), a ledger entry with its run directory, ready once `GET /instance`
answers, and a start that fails at once with the exit code when the server exits. It is
stopped in order: SIGTERM (graceful: the server stops its VM), then SIGKILL. `stop()` is
idempotent and always leaves the log file for the failure bundle.
"""

from __future__ import annotations

import http.client
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from phd.core.errors import ArtifactUnavailable, HarnessError, ProcessStartFailure
from phd.core.process import ManagedProcess, ProcessState

__all__ = ["KernelBoot", "ServerProcess", "ServerStartFailure", "default_bootrom", "uefi_bootrom"]

STOP_TIMEOUT_S = 30.0  # the server stops its VM on SIGTERM: give it time to quit QEMU


# QEMU's own x86 firmware (SeaBIOS; what q35 loads by default), as Debian installs it.
BOOTROM_CANDIDATES = (Path("/usr/share/seabios/bios-256k.bin"), Path("/usr/share/qemu/bios-256k.bin"))


def default_bootrom() -> Path:
    """The BOOTROM for propolis-server's `run <BOOTROM> <IP:PORT>`: QEMU's SeaBIOS image."""
    for candidate in BOOTROM_CANDIDATES:
        if candidate.is_file():
            return candidate
    raise HarnessError(f"no guest firmware for the server's BOOTROM argument: none of "
                       f"{[str(c) for c in BOOTROM_CANDIDATES]} exists; install Debian's seabios "
                       "(ci/bootstrap does, with qemu-system-x86)")


# UEFI firmware for firmware boot: Debian's OVMF build with code and variables in one image,
# which QEMU loads with -bios (the split _CODE/_VARS images need two pflash drives).
UEFI_CANDIDATES = (Path("/usr/share/ovmf/OVMF.fd"), Path("/usr/share/qemu/OVMF.fd"))


def uefi_bootrom() -> Path:
    """The BOOTROM for firmware boot: OVMF (what Propolis boots every guest with is its own
    OVMF build). Missing, it is an unavailable artifact: the test SKIPs with the fix."""
    for candidate in UEFI_CANDIDATES:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in UEFI_CANDIDATES)
    raise ArtifactUnavailable(f"UEFI firmware for firmware boot (none of {tried} exists)",
                              "install Debian's ovmf (ci/bootstrap does), give one with --phd-bootrom "
                              "PATH, or boot the guest's kernel directly with --phd-boot kernel")


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot of a guest (server options; v5 has no field for it)."""

    kernel: Path
    initrd: Path | None
    cmdline: str


class ServerStartFailure(ProcessStartFailure, HarnessError):
    """The server process exited, or never answered, while starting (QEMU's VMLaunchFailure).

    A harness error: the usual cause is the command line (--phd-server-cmd) or the machine;
    a server that starts but then misbehaves is a SutError.
    """


class ServerProcess:
    def __init__(self, server_cmd: list[str], port: int, data_dir: Path, log_path: Path | None,
                 regressions: tuple[str, ...] = (), ready_timeout_s: float = 30.0,
                 env: dict[str, str] | None = None, allow_paths: Sequence[Path] = (),
                 boot: KernelBoot | None = None, forwards: Sequence[str] = (),
                 bootrom: Path | None = None) -> None:
        self.port = port
        self.data_dir = data_dir
        self.log_path = log_path
        self.bootrom = bootrom = bootrom or default_bootrom()
        argv = [*server_cmd, "run", str(bootrom), f"127.0.0.1:{port}", "--data-dir", str(data_dir)]
        if boot is not None:
            argv += ["--kernel", str(boot.kernel), "--cmdline", boot.cmdline]
            if boot.initrd is not None:
                argv += ["--initrd", str(boot.initrd)]
        for forward in forwards:
            argv += ["--forward", forward]
        # The framework's own directories that specs name (per-test disks under the tmp dir,
        # kernels and images in the artifact cache): the server opens no file outside its
        # allowed roots.
        for allowed in allow_paths:
            argv += ["--allow-path", os.path.abspath(allowed)]
        for name in regressions:
            argv += ["--regression", name]
        # The run directory is in the ledger too: if this run is SIGKILLed, the next one stops
        # the server (which stops its VM) and removes it.
        self.process = ManagedProcess(
            argv, name=f"server on port {port}", log_path=log_path, env=env,
            ready=lambda _proc: self._answers(), ready_timeout_s=ready_timeout_s,
            stop_timeout_s=STOP_TIMEOUT_S, owns_dirs=(data_dir,), start_error=ServerStartFailure)

    @property
    def argv(self) -> list[str]:
        return self.process.argv

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.spawn()
        self.process.finish_start()

    def spawn(self) -> None:
        """Start the process without waiting for it to answer (a spare; see phd.vm.spares)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process.spawn()

    def ensure_started(self) -> None:
        """Started and answering: start it if new, finish a spawned start; no-op if running.
        A server that was started and has since ended raises (it has one life)."""
        if self.process.state is ProcessState.NEW:
            self.start()
        else:
            self.process.finish_start()  # waits if starting, returns if running, else raises

    def move_log(self, path: Path) -> None:
        self.process.move_log(path)
        self.log_path = path

    def _answers(self) -> bool:
        """Whether the server answers HTTP at all (any status). A bare http.client request:
        an httpx client per poll built an SSL context each time, 20 ms of CPU (100 ms under
        load) on the path from launch to the guest's first instruction."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
        try:
            conn.request("GET", "/instance")
            conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
        return True

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.alive()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (graceful), then SIGKILL; returns the exit code. Safe to call twice."""
        return self.process.stop(timeout_s)

    def log_tail(self, lines: int = 30) -> str:
        return self.process.log_tail(lines)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
