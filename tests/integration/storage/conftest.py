"""Fixtures for storage integration tests: real downstairs processes on loopback port 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sut.storage.vcr import FileVcr, dump_vcr, region_volume

BLOCK_SIZE = 512
EXTENT_SIZE = 1024  # blocks: 512 KiB extents
EXTENT_COUNT = 8  # 4 MiB region: small, so reconciliation copies stay fast


@dataclass
class DownstairsProc:
    """One ``python -m sut.storage.downstairs run`` process and its region."""

    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, port: int = 0, timeout_s: float = 15.0) -> None:
        skip = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed right after Popen dups it
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sut.storage.downstairs",
                    "run",
                    "-d",
                    str(self.data_dir),
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(port),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        last = ""
        self.port = 0
        while time.monotonic() < deadline:
            # only lines written after this start count (a restart appends to the same log)
            for line in self.log_path.read_bytes()[skip:].decode().splitlines():
                last = line
                if '"event": "listening"' in line:
                    self.port = int(json.loads(line)["port"])
            if self.port and (port == 0 or self.port == port):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)  # polling interval of a deadline-bounded wait
        self.stop()
        raise AssertionError(f"downstairs did not report listening; last log line: {last}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class DownstairsFactory:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: list[DownstairsProc] = []

    def create(self, *, start: bool = True) -> DownstairsProc:
        n = len(self.made)
        ds = DownstairsProc(self.root / f"ds{n}", self.root / f"ds{n}.log")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sut.storage.downstairs",
                "create",
                "-u",
                str(uuid.uuid4()),
                "-d",
                str(ds.data_dir),
                "--block-size",
                str(BLOCK_SIZE),
                "--extent-size",
                str(EXTENT_SIZE),
                "--extent-count",
                str(EXTENT_COUNT),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=True,
        )
        self.made.append(ds)
        if start:
            ds.start()
        return ds

    def close(self) -> None:
        errors = []
        for ds in self.made:
            try:
                ds.stop()
            except Exception as exc:  # noqa: BLE001 - stop every process, report all
                errors.append(exc)
        if errors:
            raise ExceptionGroup("stopping downstairs failed", errors)


@pytest.fixture
def downstairs(tmp_path: Path) -> Iterator[DownstairsFactory]:
    factory = DownstairsFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def dead_target() -> Iterator[str]:
    """A loopback address where nothing answers: bound (so nobody else gets the port), never
    listening, so connects are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def make_vcr(
    targets: list[str], *, gen: int = 1, volume_id: str | None = None, parent: str | None = None
) -> str:
    vid = volume_id or str(uuid.uuid4())
    ro_parent = None if parent is None else FileVcr(id=str(uuid.uuid4()), block_size=BLOCK_SIZE, path=parent)
    return dump_vcr(region_volume(vid, targets, gen=gen, block_size=BLOCK_SIZE,
                                  blocks_per_extent=EXTENT_SIZE, extent_count=EXTENT_COUNT,
                                  read_only_parent=ro_parent))


async def qemu_io(socket_path: Path, *commands: str, timeout_s: float = 60.0) -> str:
    """Run a real NBD client (qemu-io) against our export; fail with its output."""
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    argv.append(f"nbd+unix:///?socket={socket_path}")
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0 or "Pattern verification failed" in text or "error" in text.lower():
        raise AssertionError(f"qemu-io {commands} failed (rc {proc.returncode}):\n{text}")
    return text


def open_fds() -> set[str]:
    """Targets of this process's open descriptors (sockets show as socket:[inode])."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # the descriptor closed while we listed the directory
    return out


def extent_bytes(ds: DownstairsProc) -> bytes:
    """All extent data of a region, read straight from its files."""
    files = sorted((ds.data_dir / "extents").glob("*.dat"))
    return b"".join(f.read_bytes() for f in files)
