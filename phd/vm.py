"""A VM under test: one server process, one instance, its console and its disks.

The vocabulary follows PHD (`launch`, `wait_to_boot`, `run_shell_command`,
`replace_crucible_vcr`) plus what PHD lacks: `disk_status` shows WHY a VM is not running.
"""

from __future__ import annotations

import contextlib
import enum
import json
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from phd.artifacts import GuestArtifact
from phd.client import InstanceState, ServerClient
from phd.crucible import CrucibleDisk
from phd.errors import HarnessError, SutError, WaitTimeout
from phd.guest import CommandResult, GuestAdapter, adapter_for
from phd.serial import SerialConsole
from phd.server import ServerProcess

__all__ = ["TestVm", "VmConfig"]

TERMINAL = {InstanceState.DESTROYED, InstanceState.FAILED}


@dataclass(frozen=True)
class VmConfig:
    name: str
    cpus: int = 2
    memory_mib: int = 512


@dataclass
class _Attached:
    device: str
    interface: str
    disk: CrucibleDisk

    @property
    def backend_id(self) -> str:
        return f"{self.device}-backend"


class _Phase(enum.Enum):
    NEW = "new"
    ENSURED = "ensured"
    CLOSED = "closed"


@dataclass
class TestVm:
    __test__ = False  # not a pytest test class despite the name

    config: VmConfig
    server: ServerProcess
    guest: GuestArtifact
    test_dir: Path
    disks: list[_Attached] = field(default_factory=list)
    _client: ServerClient | None = None
    _console: SerialConsole | None = None
    _adapter: GuestAdapter | None = None
    _phase: _Phase = _Phase.NEW
    _epoch: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def step(self, name: str, **detail: object) -> Iterator[None]:
        """Log a step with its start (since the VM object was made) and duration, as JSON lines
        in `<test dir>/<vm>.steps.jsonl`; a failed step is logged with its error."""
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
    def add_crucible_disk(self, disk: CrucibleDisk, device: str = "data0",
                          interface: str = "virtio") -> None:
        if self._phase is not _Phase.NEW:
            raise HarnessError("disks must be added before the VM is launched")
        self.disks.append(_Attached(device, interface, disk))

    def spec(self) -> dict[str, Any]:
        disks: dict[str, Any] = {}
        for att in self.disks:
            vcr = att.disk.vcr()
            self._record_vcr(att, vcr)
            disks[att.device] = {"interface": att.interface,
                                 "backend": {"type": "crucible", "request_json": json.dumps(vcr),
                                             "readonly": False}}
        return {"board": {"cpus": self.config.cpus, "memory_mib": self.config.memory_mib},
                "boot": {"kernel": str(self.guest.kernel), "initrd": str(self.guest.initrd),
                         "cmdline": self.guest.cmdline},
                "disks": disks, "nics": {}}

    # --- lifecycle ----------------------------------------------------------------
    @property
    def client(self) -> ServerClient:
        if self._client is None:
            if not self.server.alive():
                self.server.start()
            self._client = ServerClient(self.server.base_url)
        return self._client

    def ensure(self) -> None:
        self.client.ensure({"id": str(uuidlib.uuid4()), "name": self.config.name}, self.spec())
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
                raise WaitTimeout(f"VM {self.config.name} to reach {wanted}", timeout_s, state)
            try:
                state, gen = self.client.state_monitor(gen + 1, timeout_s=min(remaining, 10.0))
            except httpx.TimeoutException:
                state, gen = self.client.state()

    # --- guest ----------------------------------------------------------------------
    @property
    def console(self) -> SerialConsole:
        if self._console is None:
            self._console = SerialConsole(self.client.serial_ws_url(0),
                                          transcript=self.test_dir / f"{self.config.name}.serial.log")
            self._console.connect()
        return self._console

    def wait_to_boot(self, timeout_s: float | None = None) -> None:
        """Wait for the guest's login prompt, log in, reach a shell."""
        with self.step("wait_to_boot"):
            self._adapter = adapter_for(self.guest.name)(self.console)
            self._adapter.login(timeout_s)

    def run_shell_command(self, command: str, *, check: str = "ok",
                          timeout_s: float = 60.0) -> CommandResult:
        if self._adapter is None:
            raise HarnessError("call wait_to_boot() before run_shell_command()")
        with self.step("run_shell_command", command=command):
            return self._adapter.run(command, check=check, timeout_s=timeout_s)

    # --- disks ----------------------------------------------------------------------
    def _attachment(self, disk: CrucibleDisk) -> _Attached:
        for att in self.disks:
            if att.disk is disk:
                return att
        raise HarnessError(f"disk {disk.name} is not attached to VM {self.config.name}")

    def backend_id(self, disk: CrucibleDisk) -> str:
        return self._attachment(disk).backend_id

    def replace_crucible_vcr(self, disk: CrucibleDisk, timeout_s: float = 30.0) -> str:
        """Send the disk's current VCR as a replacement (PHD's `replace_crucible_vcr`)."""
        att = self._attachment(disk)
        vcr = disk.vcr()
        self._record_vcr(att, vcr)
        try:
            with self.step("replace_crucible_vcr", backend=att.backend_id, gen=disk.generation):
                return self.client.replace_vcr(att.backend_id, vcr, timeout_s=timeout_s)
        except httpx.TimeoutException:
            raise WaitTimeout(
                f"the server to answer a VCR replacement for {att.backend_id} (state "
                f"{self._state_or_unknown()}); the server is not serving its request queue",
                timeout_s, self.disk_status(disk)) from None

    def disk_status(self, disk: CrucibleDisk) -> dict[str, Any]:
        return self.client.disk_status(self.backend_id(disk))

    def _state_or_unknown(self) -> str:
        try:
            return str(self.state())
        except Exception:  # noqa: BLE001 - only used in an error message
            return "unknown"

    def _record_vcr(self, att: _Attached, vcr: dict[str, Any]) -> None:
        path = self.test_dir / f"{self.config.name}.{att.device}.vcr.jsonl"
        with path.open("a") as f:
            f.write(json.dumps(vcr) + "\n")

    # --- teardown -------------------------------------------------------------------
    def close(self) -> None:
        """Stop the server (which stops the VM); idempotent; errors raised together."""
        if self._phase is _Phase.CLOSED:
            return
        self._phase = _Phase.CLOSED
        errors: list[BaseException] = []
        if self._console is not None:
            try:
                self._console.close()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        if self._client is not None:
            self._client.close()
        try:
            self.server.stop()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        if errors:
            raise HarnessError(f"tearing down VM {self.config.name}: {errors}")
