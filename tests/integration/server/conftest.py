"""A real ``python -m sut.server`` process on an ephemeral loopback port."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from phd.artifacts.store import GuestArtifact
from phd.core.process import ManagedProcess
from phd.framework import Framework

from .console import tiny_args

START_DEADLINE_S = 20.0
STOP_DEADLINE_S = 30.0


def listening_port(log_text: str) -> int | None:
    """The port of the server's JSON `listening` line, once it has logged one."""
    for raw in log_text.splitlines():
        if '"listening"' in raw:
            return int(json.loads(raw)["port"])
    return None


@dataclass
class ServerProcess:
    process: ManagedProcess
    base_url: str
    data_dir: Path
    log_path: Path

    def client(self, timeout: float = 10.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)

    def log_lines(self) -> list[dict[str, object]]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                lines.append({"raw": raw})
        return lines

    def close(self) -> int:
        """Stop the server and remove its data dir; returns its exit code."""
        try:
            return self.stop()
        finally:
            top = self.data_dir
            while top.parent.name.startswith("srv-"):
                top = top.parent
            shutil.rmtree(top, ignore_errors=True)

    def stop(self) -> int:
        """SIGTERM; a server that needs the SIGKILL after STOP_DEADLINE_S fails the test."""
        code = self.process.stop(STOP_DEADLINE_S)
        if self.process.killed:
            raise AssertionError(f"server ignored SIGTERM; log:\n{self.log_path.read_text()}")
        assert code is not None
        return code


def start_server(tmp_path: Path, *extra: str, allow_tmp: bool = True,
                 data_dir_name: str | None = None) -> ServerProcess:
    """Start a server; ``allow_tmp`` lets specs name files under ``tmp_path`` (--allow-path)."""
    # tmp_path can be long; unix socket paths are capped at 107 bytes, so
    # the data dir lives under a short per-test directory instead.
    data_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"srv-{os.getpid()}-{time.monotonic_ns()}"
    if data_dir_name is not None:
        data_dir = data_dir / data_dir_name
    if allow_tmp:
        extra = ("--allow-path", str(tmp_path), *extra)
    log_path = tmp_path / "server.log"
    process = ManagedProcess(
        [sys.executable, "-m", "sut.server", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), *extra],
        name="sut.server", log_path=log_path, ready=lambda proc: listening_port(proc.output()) is not None,
        ready_timeout_s=START_DEADLINE_S, stop_timeout_s=STOP_DEADLINE_S).start()
    port = listening_port(process.output())
    return ServerProcess(process, f"http://127.0.0.1:{port}", data_dir, log_path)


@contextmanager
def serving(tmp_path: Path, *extra: str) -> Iterator[ServerProcess]:
    """A started server, closed afterwards; a non-zero exit code fails the test."""
    srv = start_server(tmp_path, *extra)
    try:
        yield srv
    finally:
        code = srv.close()
        assert code == 0, f"server exit code {code}; log:\n{srv.log_path.read_text()}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with serving(tmp_path) as srv:
        yield srv


@pytest.fixture(scope="module")
def tiny(phd_framework: Framework) -> GuestArtifact:
    """The tiny guest from the artifact store (built by its recipe on first use, then cached)."""
    return phd_framework.artifacts.guest("tiny")


@pytest.fixture
def tiny_server(tmp_path: Path, tiny: GuestArtifact) -> Iterator[ServerProcess]:
    """A server that boots the tiny guest directly (--kernel/--initrd/--cmdline: v5 has no
    field for them)."""
    with serving(tmp_path, *tiny_args(tiny)) as srv:
        yield srv


def qemu_pids_for(data_dir: Path) -> list[int]:
    """QEMU processes whose command line mentions ``data_dir`` (ours only)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and b"qemu-system" in cmdline[0] and any(str(data_dir).encode() in arg for arg in cmdline):
            pids.append(int(entry.name))
    return pids
