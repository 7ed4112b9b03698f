"""Downstairs faults while the region is active: offline -> replay, faulted -> live repair,
a hung (SIGSTOPped) downstairs, and a takeover that disables the old upstairs.

Real downstairs processes, our upstairs, and qemu-io as the NBD client.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from sut.storage.backend import CrucibleBackend, RetryPolicy
from sut.storage.vcr import dump_vcr, region_volume

from .conftest import DownstairsFactory, DownstairsProc, extent_bytes, make_vcr, qemu_io
from .test_backend import ds_status, run, states, wait_for

pytestmark = pytest.mark.integration

# Short I/O timeout so a hung downstairs is noticed within a test's patience.
POLICY = RetryPolicy(connect_timeout_s=1.0, reconnect_delay_s=0.2, io_timeout_s=2.0, keepalive_s=0.25)


def signal_ds(ds: DownstairsProc, sig: signal.Signals) -> None:
    assert ds.process is not None and ds.process.alive(), "downstairs is not running"
    ds.process.signal(sig)


def kill_ds(ds: DownstairsProc) -> int:
    """SIGKILL (no clean shutdown); returns the port so it can come back on it."""
    port = ds.port
    assert ds.process is not None and ds.process.alive(), "downstairs is not running"
    ds.kill()
    return port


def copies_agree(dss: list[DownstairsProc]) -> None:
    data = [extent_bytes(d) for d in dss]
    for i, other in enumerate(data[1:], start=1):
        if other != data[0]:
            diff = next(k for k in range(len(other)) if other[k] != data[0][k])
            raise AssertionError(f"downstairs {i} differs from downstairs 0 at byte {diff}")


async def until(backend: CrucibleBackend, predicate: Callable[[], bool], what: str) -> None:
    await wait_for(predicate, what, last=lambda: ds_status(backend))


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "disk.nbd"


def test_killed_downstairs_goes_offline_and_is_replayed_not_repaired(
    downstairs: DownstairsFactory, sock: Path
) -> None:
    dss = [downstairs.create() for _ in range(3)]

    async def main() -> None:
        backend = CrucibleBackend("k", make_vcr([d.target for d in dss]), sock, retry=POLICY)
        try:
            await backend.start_export()
            await backend.activate()
            await qemu_io(sock, "write -P 0x11 0 1M", "flush")
            port = kill_ds(dss[1])
            # writes are acknowledged by the two remaining downstairs, never refused
            await qemu_io(sock, "write -P 0x22 1M 1M", "write -P 0x23 0 4k", "flush")
            status = ds_status(backend)[1]
            assert status["state"] == "offline", status
            assert status["backlog"] >= 3, status  # 2 writes (maybe split) + flush kept
            await asyncio.to_thread(dss[1].start, port)
            await until(backend, lambda: states(backend) == ["active"] * 3, "replay")
            back = ds_status(backend)[1]
            assert back["replayed_jobs"] >= 3 and back["repairs_done"] == 0, back
            assert back["offline_count"] == 1 and back["fault_count"] == 0, back
            await qemu_io(sock, "read -P 0x23 0 4k", "read -P 0x11 4k 1020k", "read -P 0x22 1M 1M", "flush")
        finally:
            await backend.close()

    run(main())
    copies_agree(dss)


def test_hung_downstairs_does_not_stall_writes_and_catches_up(
    downstairs: DownstairsFactory, sock: Path
) -> None:
    """A SIGSTOPped downstairs keeps its TCP connection but answers nothing (like a paused
    container): writes still complete with two of three; after SIGCONT it catches up."""
    dss = [downstairs.create() for _ in range(3)]

    async def main() -> None:
        backend = CrucibleBackend("h", make_vcr([d.target for d in dss]), sock, retry=POLICY)
        stopped = False
        try:
            await backend.start_export()
            await backend.activate()
            signal_ds(dss[2], signal.SIGSTOP)
            stopped = True
            t0 = time.monotonic()
            await qemu_io(sock, "write -P 0x31 0 2M", "flush", "read -P 0x31 0 2M")
            # bounded by the two live copies, not by the hung one (io_timeout_s is 2 s)
            assert time.monotonic() - t0 < 15
            await until(backend, lambda: states(backend)[2] == "offline", "hang detection")
            assert "no reply" in str(ds_status(backend)[2]["last_error"])
            signal_ds(dss[2], signal.SIGCONT)
            stopped = False
            await until(backend, lambda: states(backend) == ["active"] * 3, "catch up")
            await qemu_io(sock, "flush")
        finally:
            if stopped:
                signal_ds(dss[2], signal.SIGCONT)
            await backend.close()

    run(main())
    copies_agree(dss)


def test_backlog_over_the_limit_faults_and_live_repairs(downstairs: DownstairsFactory, sock: Path) -> None:
    dss = [downstairs.create() for _ in range(3)]
    small = RetryPolicy(connect_timeout_s=1.0, reconnect_delay_s=0.2, io_timeout_s=2.0,
                        keepalive_s=0.25, max_backlog_jobs=4)

    async def main() -> None:
        backend = CrucibleBackend("b", make_vcr([d.target for d in dss]), sock, retry=small)
        try:
            await backend.start_export()
            await backend.activate()
            port = kill_ds(dss[0])
            await until(backend, lambda: states(backend)[0] == "offline", "offline")
            await qemu_io(sock, *[f"write -P 0x4{i} {i}M 64k" for i in range(4)], "write -P 0x50 3584k 64k",
                          "flush")
            first = ds_status(backend)[0]
            assert first["state"] == "faulted" and first["backlog"] == 0, first
            # last_fault, not last_error: on a loaded machine the upstairs' reconnect attempts
            # (0.2 s apart) overwrite last_error before the check reads it
            assert "backlog" in str(first["last_fault"]), first
            await asyncio.to_thread(dss[0].start, port)
            await until(backend, lambda: states(backend) == ["active"] * 3, "live repair")
            assert ds_status(backend)[0]["repairs_done"] == 1
            await qemu_io(sock, "flush")
        finally:
            await backend.close()

    run(main())
    copies_agree(dss)
    assert extent_bytes(dss[0])[3 << 20 : (3 << 20) + 65536] == b"\x43" * 65536


def _big_downstairs(factory: DownstairsFactory, n: int) -> list[DownstairsProc]:
    """Regions of 64 x 1 MiB extents: big enough that a live repair takes a while here."""
    made = []
    for i in range(n):
        ds = DownstairsProc(factory.root / f"big{i}", factory.root / f"big{i}.log")
        subprocess.run(
            [sys.executable, "-m", "sut.storage.downstairs", "create", "-u", str(uuid.uuid4()),
             "-d", str(ds.data_dir), "--block-size", "512", "--extent-size", str(BIG_EXTENT),
             "--extent-count", str(BIG_COUNT)],
            stdin=subprocess.DEVNULL, capture_output=True, check=True,
        )
        factory.made.append(ds)  # the factory stops it at teardown
        ds.start()
        made.append(ds)
    return made


BIG_EXTENT = 2048  # blocks of 512 B: 1 MiB extents
BIG_COUNT = 64


def test_live_repair_lets_guest_io_continue(downstairs: DownstairsFactory, sock: Path) -> None:
    """Replacement while active: the new downstairs is repaired extent by extent while a
    writer keeps going; writes complete DURING the repair, and every copy agrees after."""
    dss = _big_downstairs(downstairs, 4)
    vid = "0b6f3c2e-9d8a-4f1b-a2c3-d4e5f6a7b8c9"

    def vcr(targets: list[str], gen: int) -> str:
        return dump_vcr(region_volume(vid, targets, gen=gen, block_size=512,
                                      blocks_per_extent=BIG_EXTENT, extent_count=BIG_COUNT))

    before = vcr([d.target for d in dss[:3]], 1)
    after = vcr([dss[0].target, dss[1].target, dss[3].target], 2)

    async def main() -> None:
        backend = CrucibleBackend("l", before, sock, retry=POLICY)
        try:
            await backend.start_export()
            await backend.activate()
            await qemu_io(sock, "write -P 0x61 0 64M", "flush")
            assert await backend.replace(after) == "Started"
            assert await backend.replace(after) in ("StartedAlready", "CompletedAlready")
            progress: list[object] = []
            rng = random.Random(7)
            boundary = {e: 0x61 for e in range(1, BIG_COUNT)}  # last pattern around each
            round_no = 0
            while states(backend)[2] != "active":
                # 8 KiB writes straddling extent boundaries: one written while the copy of
                # the extent below it runs lands half in a repaired extent, half in one not
                # yet repaired. A new pattern each round, 8 random boundaries per round.
                pattern = 0x70 + round_no % 16
                chosen = rng.sample(sorted(boundary), 8)
                await qemu_io(sock, *[f"write -P {pattern} {e * 1024 - 4}k 8k" for e in chosen], timeout_s=30)
                boundary.update(dict.fromkeys(chosen, pattern))
                if ds_status(backend)[2]["state"] == "repairing":
                    progress.append(ds_status(backend)[2]["repair_progress"])
                round_no += 1
                assert round_no < 500, ds_status(backend)
            assert progress, "no write round completed while the repair ran"
            assert await backend.replace(after) == "CompletedAlready"
            await qemu_io(sock, "flush")
            await qemu_io(sock, *[f"read -P {p} {e * 1024 - 4}k 8k" for e, p in boundary.items()],
                          "read -P 0x61 4k 1016k")
        finally:
            await backend.close()

    run(main(), timeout_s=150)
    copies_agree([dss[0], dss[1], dss[3]])


def test_takeover_fails_pending_and_later_io_of_the_old_upstairs(
    downstairs: DownstairsFactory, tmp_path: Path
) -> None:
    dss = [downstairs.create() for _ in range(3)]
    targets = [d.target for d in dss]
    vid = "2c4e6a8b-0d1f-4a3c-9e5b-7d9f1b3d5e7a"

    async def main() -> None:
        old_vcr, new_vcr = (make_vcr(targets, gen=g, volume_id=vid) for g in (1, 2))
        old = CrucibleBackend("old", old_vcr, tmp_path / "o.nbd", retry=POLICY)
        new = CrucibleBackend("new", new_vcr, tmp_path / "n.nbd", retry=POLICY)
        writer: asyncio.Task[None] | None = None
        try:
            await old.start_export()
            await old.activate()
            await qemu_io(old.socket_path, "write -P 0x0a 0 1M", "flush")

            async def write_forever() -> None:
                # the VM above: keeps writing until the storage says no
                while True:
                    await qemu_io(old.socket_path, "write -P 0x0b 1M 1M", timeout_s=20)

            writer = asyncio.create_task(write_forever())
            await new.start_export()
            await new.activate()
            with pytest.raises(AssertionError, match=r"qemu-io|Input/output error"):
                await asyncio.wait_for(writer, 20)  # fails cleanly, does not hang
            assert old.status()["activation"] == "failed"
            assert all(d["state"] == "disabled" for d in ds_status(old)), ds_status(old)
            with pytest.raises(AssertionError, match="qemu-io"):
                await qemu_io(old.socket_path, "read 0 4k", timeout_s=10)  # later I/O fails too
            await qemu_io(new.socket_path, "read -P 0x0a 0 4k")  # the flushed data survived
        finally:
            if writer is not None and not writer.done():
                writer.cancel()
            await old.close()
            await new.close()

    run(main())


def test_equal_generation_from_another_session_is_refused(
    downstairs: DownstairsFactory, tmp_path: Path
) -> None:
    dss = [downstairs.create() for _ in range(3)]
    vcr = make_vcr([d.target for d in dss], gen=4)

    async def main() -> None:
        first = CrucibleBackend("first", vcr, tmp_path / "f.nbd", retry=POLICY)
        second = CrucibleBackend("second", vcr, tmp_path / "s.nbd", retry=POLICY)
        try:
            await first.start_export()
            await first.activate()
            # Crucible's downstairs drops a promote at the active generation from another
            # session by closing the connection; the second upstairs keeps retrying (as
            # Crucible's does) and its status names the step that failed
            pending = asyncio.create_task(second.activate())

            def refused() -> bool:
                return all("after PromoteToActive" in str(d["last_error"]) for d in ds_status(second))

            await wait_for(refused, "every downstairs to drop the second session's promote",
                           last=lambda: ds_status(second))
            assert not pending.done() and second.status()["activation"] == "activating"
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
            # the first session was not disturbed
            assert states(first) == ["active"] * 3
            await qemu_io(first.socket_path, "write -P 0x4e 0 64k", "flush", "read -P 0x4e 0 64k")
        finally:
            await second.close()
            await first.close()

    run(main())
