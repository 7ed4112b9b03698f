"""Spare servers: the next VM's server process, started while the current VM runs.

Why: a reference server is a Python process that imports its HTTP stack (FastAPI, pydantic,
uvicorn) before it can create an instance: a few hundred milliseconds of the launch-to-shell
time of every VM, the largest part of the framework's cost over raw QEMU (issue 17 item 4).
A test's VM is usually like the one before it (same guest, boot mode and server command
line), so once a VM's guest has reached its shell (or the VM closes without getting there),
the session spawns one more server of the same shape in the background; the next VM of that
shape takes it, already answering. Not at the server's own start: there the spawn would take
CPU from the guest's boot on a two-core machine.

What makes a server's command line is the ServerShape (what every VM of a session shares) plus
its port, SSH forward port, run directory and log - allocated with the spare and handed to the
VM's factory with it (ports released, run directory collected, log moved into the test's
directory, as for a server started on demand). At most one spare per session (xdist worker):
a VM of another shape starts its own server and the spare is replaced by one of the new
shape. The spare is a ManagedProcess like any server: in the reaper's ledger while it runs,
stopped when the session ends, and a spare that died is stopped and replaced, never handed out.
`--phd-spare-servers off` starts every server on demand.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from phd.core.ports import PortAllocator
from phd.vm.server import KernelBoot, ServerProcess

__all__ = ["ServerShape", "Spare", "SpareServers", "make_server", "run_dir", "shape_of"]


@dataclass(frozen=True)
class ServerShape:
    """Everything of a server's command line and environment that is not per VM."""

    server_cmd: tuple[str, ...]
    regressions: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    allow_paths: tuple[Path, ...]
    boot: KernelBoot | None
    bootrom: Path | None
    ssh: bool  # whether it forwards a host port to the guest's port 22


@dataclass
class Spare:
    """A server with what was allocated for it: the taker owns all of it."""

    shape: ServerShape
    server: ServerProcess
    port: int
    ssh_port: int | None


def run_dir(session_id: str, port: int) -> Path:
    # Unix socket paths are capped at 107 bytes, so a server's run directory lives under a
    # short path; its files are copied into the test directory at teardown.
    return Path(tempfile.gettempdir()) / "phd-run" / f"{session_id}-{port}"


def make_server(shape: ServerShape, port: int, ssh_port: int | None, data_dir: Path,
                log: Path | None) -> ServerProcess:
    forwards = [f"127.0.0.1:{ssh_port}:22"] if ssh_port is not None else []
    return ServerProcess(list(shape.server_cmd), port, data_dir, log, regressions=shape.regressions,
                         env=dict(shape.env), allow_paths=shape.allow_paths, boot=shape.boot,
                         forwards=forwards, bootrom=shape.bootrom)


class SpareServers:
    """At most one spare server of a session (see the module docstring)."""

    def __init__(self, ports: PortAllocator, session_id: str, log_dir: Path | None,
                 enabled: bool = True) -> None:
        self.ports = ports
        self.session_id = session_id
        self.log_dir = log_dir  # None: the null output mode, no logs
        self.enabled = enabled
        self.taken = 0  # how many VMs got a spare (tests and the benchmark read it)
        self._spare: Spare | None = None
        self._lock = threading.Lock()

    @property
    def spare(self) -> Spare | None:
        """The spare now, if any (to look at; take() hands it out)."""
        return self._spare

    def take(self, shape: ServerShape) -> Spare | None:
        """The spare if it has this shape and is alive (it may still be starting), else None.
        A spare of another shape stays for a later VM; one that died is stopped and dropped."""
        with self._lock:
            spare = self._spare
            if spare is None or spare.shape != shape:
                return None
            self._spare = None
        if not spare.server.alive():
            self._discard(spare, keep_log=True)  # why it died is in its log
            return None
        self.taken += 1
        return spare

    def prepare(self, shape: ServerShape) -> None:
        """Spawn a spare of this shape (replacing one of another shape); returns at once."""
        if not self.enabled:
            return
        with self._lock:
            old = self._spare
            if old is not None and old.shape == shape and old.server.alive():
                return
            self._spare = None
        if old is not None:
            self._discard(old)
        port = self.ports.allocate()
        ssh_port = self.ports.allocate() if shape.ssh else None
        log = None if self.log_dir is None else self.log_dir / f"spare-{port}.server.log"
        server = make_server(shape, port, ssh_port, run_dir(self.session_id, port), log)
        try:
            server.spawn()
        except BaseException:
            self._release(port, ssh_port)
            raise
        with self._lock:
            self._spare = Spare(shape, server, port, ssh_port)

    def close(self) -> None:
        """Stop the spare (end of session); idempotent."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            self._discard(spare)

    def _discard(self, spare: Spare, *, keep_log: bool = False) -> None:
        """Stop an unused spare and free what it held; its log goes too (nothing ran on it)
        unless it died on its own."""
        try:
            spare.server.stop()
        finally:
            self._release(spare.port, spare.ssh_port)
            shutil.rmtree(spare.server.data_dir, ignore_errors=True)
            if spare.server.log_path is not None and not keep_log:
                spare.server.log_path.unlink(missing_ok=True)

    def _release(self, *ports: int | None) -> None:
        for port in ports:
            if port is not None:
                self.ports.release(port)


def shape_of(server_cmd: Sequence[str], regressions: Sequence[str], env: dict[str, str],
             allow_paths: Sequence[Path], boot: KernelBoot | None, bootrom: Path | None,
             ssh: bool) -> ServerShape:
    return ServerShape(tuple(server_cmd), tuple(regressions), tuple(sorted(env.items())),
                       tuple(Path(p) for p in allow_paths), boot, bootrom, ssh)
