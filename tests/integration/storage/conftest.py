"""Fixtures for storage integration tests: real downstairs processes (ours, speaking Crucible's
protocol) on loopback port pairs (the repair server listens on port + 4000)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from phd.core.errors import ProcessStartFailure
from phd.core.process import ManagedProcess
from sut.storage.extent_raw import RawRegion
from sut.storage.vcr import FileVcr, dump_vcr, region_volume
from sut.storage.wire.negotiation import REPAIR_PORT_OFFSET

BLOCK_SIZE = 512
EXTENT_SIZE = 1024  # blocks: 512 KiB extents
EXTENT_COUNT = 8  # 4 MiB region: small, so reconciliation copies stay fast


def _listening_port(log_text: str) -> int | None:
    """The port of the last `listening` line in a downstairs' log."""
    port = None
    for line in log_text.splitlines():
        if '"event": "listening"' in line:
            port = int(json.loads(line)["port"])
    return port


def port_pair() -> int:
    """A free loopback port p with p + 4000 free as well (the repair server's port)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            if port + REPAIR_PORT_OFFSET > 0xFFFF:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + REPAIR_PORT_OFFSET))
                except OSError:
                    continue
                return port
    raise AssertionError("no free loopback port pair")


@dataclass
class DownstairsProc:
    """One ``python -m sut.storage.downstairs run`` process and its region."""

    data_dir: Path
    log_path: Path
    process: ManagedProcess | None = None  # the current life; a restart is a new one
    port: int = 0
    flags: tuple[str, ...] = ()  # extra `run` flags, e.g. ("--write-errors",); kept on restart

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, port: int = 0, timeout_s: float = 15.0) -> None:
        """Start on ``port``, or on a free port pair; a lost race for a free pair is retried."""
        for attempt in range(5):
            try:
                self._start(port or port_pair(), timeout_s)
                return
            except ProcessStartFailure as exc:
                if port or attempt == 4 or exc.exit_code is None:
                    raise

    def _start(self, port: int, timeout_s: float) -> None:
        self.port = 0
        self.process = ManagedProcess(
            [sys.executable, "-m", "sut.storage.downstairs", "run", "-d", str(self.data_dir),
             "-a", "127.0.0.1", "-p", str(port), *self.flags],
            name=f"downstairs {self.data_dir.name} on {port}", log_path=self.log_path,
            # only lines of this start count (a restart appends to the same log)
            ready=lambda proc: _listening_port(proc.output()) == port, ready_timeout_s=timeout_s)
        self.process.start()
        self.port = port

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        self.process = None

    def kill(self) -> None:
        """SIGKILL (no chance to clean up) and reap; the port is free for a restart after."""
        if self.process is not None:
            self.process.kill()
        self.process = None

    def log_offset(self) -> int:
        """Where the log ends now: pass to :meth:`events` to see only what comes later."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """The JSON log lines from byte ``since`` on; a line that is not JSON is returned as
        ``{"event": "NOT-JSON", "raw": line}`` so a test can assert there are none."""
        out: list[dict[str, Any]] = []
        raw = self.log_path.read_bytes()[since:].decode(errors="replace")
        for line in raw.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            out.append(record if isinstance(record, dict) else {"event": "NOT-JSON", "raw": line})
        return out

    def session_open(self, since: int = 0) -> bool:
        """Whether an upstairs session that began after log offset ``since`` is still active
        (its "active" line has no "deactivated" line after it)."""
        kinds = [e.get("event") for e in self.events(since)]
        if "active" not in kinds:
            return False
        last_active = len(kinds) - 1 - kinds[::-1].index("active")
        return "deactivated" not in kinds[last_active:]


class DownstairsFactory:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: list[DownstairsProc] = []

    def create(self, *, start: bool = True, flags: tuple[str, ...] = ()) -> DownstairsProc:
        n = len(self.made)
        ds = DownstairsProc(self.root / f"ds{n}", self.root / f"ds{n}.log", flags=flags)
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
    return dump_vcr(
        region_volume(
            vid,
            targets,
            gen=gen,
            block_size=BLOCK_SIZE,
            blocks_per_extent=EXTENT_SIZE,
            extent_count=EXTENT_COUNT,
            read_only_parent=ro_parent,
        )
    )


async def run_tool(argv: list[str], timeout_s: float) -> tuple[int, str]:
    """Run a real client tool to completion (killed on timeout or cancel); (rc, output)."""
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
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def qemu_io(socket_path: Path, *commands: str, timeout_s: float = 60.0) -> str:
    """Run a real NBD client (qemu-io) against our export; fail with its output."""
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    argv.append(f"nbd+unix:///?socket={socket_path}")
    rc, text = await run_tool(argv, timeout_s)
    if rc != 0 or "Pattern verification failed" in text or "error" in text.lower():
        raise AssertionError(f"qemu-io {commands} failed (rc {rc}):\n{text}")
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
    """All block data of a region, read straight from its extent files."""
    return region_on_disk(ds.data_dir).data


# -- helpers for tests that drive a backend on an asyncio loop ---------------------------------
def run_bounded(coro: Coroutine[Any, Any, None], timeout_s: float) -> None:
    """``asyncio.run`` with a hard deadline, so a hung test fails instead of waiting forever."""

    async def bounded() -> None:
        async with asyncio.timeout(timeout_s):
            await coro

    asyncio.run(bounded())


async def poll_until(
    predicate: Callable[[], bool],
    what: str,
    timeout_s: float = 20.0,
    last: Callable[[], object] | None = None,
) -> None:
    """Poll ``predicate`` on the running loop until a monotonic deadline; report what was seen."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            seen = last() if last else None
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last saw {seen}")
        await asyncio.sleep(0.05)  # yield to the loop between polls


async def qemu_io_status(socket_path: Path, *commands: str, timeout_s: float = 60.0) -> tuple[bool, str]:
    """Like :func:`qemu_io` but returns (succeeded, output) instead of raising: for tests where
    a failure is expected (the export's process was killed mid-command)."""
    try:
        return True, await qemu_io(socket_path, *commands, timeout_s=timeout_s)
    except AssertionError as exc:
        return False, str(exc)


async def read_image(socket_path: Path, dest: Path, timeout_s: float = 60.0) -> bytes:
    """The whole export, read by a second real NBD client (qemu-img convert)."""
    argv = ["qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///?socket={socket_path}", str(dest)]
    rc, text = await run_tool(argv, timeout_s)
    if rc != 0:
        raise AssertionError(f"qemu-img convert failed (rc {rc}): {text}")
    data = dest.read_bytes()
    dest.unlink()
    return data


@dataclass(frozen=True)
class RegionOnDisk:
    """A region as its files say: per-extent (gen, flush, dirty) and all extent data."""

    stamps: tuple[tuple[int, int, bool], ...]
    data: bytes
    tmp_files: tuple[str, ...]  # leftovers of an interrupted repair (scratch directories)


def region_on_disk(data_dir: Path) -> RegionOnDisk:
    """Read a region as its files say, with our reader of Crucible's raw extents (which refuses
    a torn extent: a dirty one whose context slots match none of its data)."""
    with RawRegion.open(data_dir, read_only=True) as region:
        gens, flushes, dirty = region.versions()
        data, _contexts = region.read(0, region.total_blocks)
    stamps = tuple(zip(gens, flushes, dirty, strict=True))
    stages = (".copy", ".replace", ".completed")
    scratch = tuple(sorted(p.name for p in data_dir.rglob("*") if p.suffix in stages))
    return RegionOnDisk(stamps, data, scratch)


def assert_regions_identical(dss: list[DownstairsProc]) -> RegionOnDisk:
    """The three copies agree: same data, same (gen, flush, dirty) per extent, none dirty."""
    regions = [region_on_disk(d.data_dir) for d in dss]
    first = regions[0]

    for ds, region in zip(dss[1:], regions[1:], strict=True):
        assert region.stamps == first.stamps, (
            f"extent stamps differ: {dss[0].data_dir}={first.stamps} {ds.data_dir}={region.stamps}"
        )
        if region.data != first.data:
            diff = next(i for i, (a, b) in enumerate(zip(region.data, first.data, strict=True)) if a != b)
            raise AssertionError(
                f"extent data of {ds.data_dir} differs from {dss[0].data_dir} at byte {diff}"
            )
    assert not any(dirty for _g, _f, dirty in first.stamps), f"dirty extents left: {first.stamps}"
    leftovers = {str(d.data_dir): r.tmp_files for d, r in zip(dss, regions, strict=True) if r.tmp_files}
    assert not leftovers, f"interrupted repairs never cleaned up: {leftovers}"
    return first
