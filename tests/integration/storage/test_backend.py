"""CrucibleBackend end to end: three downstairs processes, our upstairs, a real NBD client."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, cast

import pytest

from sut.storage.backend import CrucibleBackend, RetryPolicy, StorageError, StorageFatalError

from .conftest import (
    BLOCK_SIZE,
    EXTENT_COUNT,
    EXTENT_SIZE,
    DownstairsFactory,
    extent_bytes,
    make_vcr,
    open_fds,
    poll_until,
    qemu_io,
    run_bounded,
)

pytestmark = pytest.mark.integration

FAST = RetryPolicy(connect_timeout_s=1.0, reconnect_delay_s=0.2)
REGION_BYTES = BLOCK_SIZE * EXTENT_SIZE * EXTENT_COUNT


def run(coro: Coroutine[Any, Any, None], timeout_s: float = 90.0) -> None:
    run_bounded(coro, timeout_s)


wait_for = poll_until  # the name the storage tests use


def ds_status(backend: CrucibleBackend) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], backend.status()["downstairs"])


def states(backend: CrucibleBackend) -> list[str]:
    return [str(d["state"]) for d in ds_status(backend)]


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "disk.nbd"


def test_activation_with_three_downstairs_and_io(downstairs: DownstairsFactory, sock: Path) -> None:
    dss = [downstairs.create() for _ in range(3)]

    async def main() -> None:
        backend = CrucibleBackend("disk0-backend", make_vcr([d.target for d in dss]), sock, retry=FAST)
        assert backend.size_bytes == REGION_BYTES
        try:
            await backend.start_export()
            await backend.activate()
            assert backend.status()["activation"] == "active"
            assert states(backend) == ["active"] * 3
            await qemu_io(sock, "write -P 0xab 0 1M", "write -P 0x5c 3M 512k", "flush")
            await qemu_io(sock, "read -P 0xab 0 1M", "read -P 0x5c 3M 512k", "read -P 0 1M 2M")
        finally:
            await backend.close()
        assert not sock.exists()
        assert backend.status()["activation"] == "closed"

    run(main())
    copies = [extent_bytes(d) for d in dss]
    assert copies[0][: 1 << 20] == b"\xab" * (1 << 20)
    assert copies[0] == copies[1] == copies[2]


def test_replace_completes_activation_pending_on_unreachable_target(
    downstairs: DownstairsFactory, dead_target: str, sock: Path
) -> None:
    """THE SEED: activation waits on a dead target until a replacement names a live one."""
    dss = [downstairs.create() for _ in range(3)]
    vid = "3f1c6a52-7f0e-4b44-9d8b-2a9f0c1e5d10"
    blocked = make_vcr([dead_target, dss[1].target, dss[2].target], volume_id=vid)
    fixed = make_vcr([dss[0].target, dss[1].target, dss[2].target], gen=2, volume_id=vid)

    async def main() -> None:
        backend = CrucibleBackend("disk0-backend", blocked, sock, retry=FAST)
        try:
            await backend.start_export()
            activation = asyncio.create_task(backend.activate())
            await wait_for(
                lambda: (
                    states(backend)[1:] == ["wait_quorum"] * 2
                    and ds_status(backend)[0]["failed_attempts"] >= 2
                ),
                "two live downstairs waiting and the dead one failing",
                last=lambda: ds_status(backend),
            )
            assert not activation.done()
            assert backend.status()["activation"] == "activating"
            dead = ds_status(backend)[0]
            assert dead["target"] == dead_target
            assert "refused" in str(dead["last_error"]).lower()
            # the NBD handshake is answered before activation, with the VCR's size
            info = await asyncio.create_subprocess_exec(
                "nbdinfo",
                "--size",
                f"nbd+unix:///?socket={sock}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(info.communicate(), 20)
            assert int(out) == REGION_BYTES

            assert await backend.replace(fixed) == "Started"
            await asyncio.wait_for(activation, 30)
            assert backend.status()["activation"] == "active"
            assert backend.status()["generation"] == 2
            await qemu_io(sock, "write -P 0xab 0 1M", "flush")
            await qemu_io(sock, "read -P 0xab 0 1M")
            assert await backend.replace(fixed) == "CompletedAlready"  # idempotent retry
            gen3 = make_vcr([dss[0].target, dss[1].target, dss[2].target], gen=3, volume_id=vid)
            assert await backend.replace(gen3) == "VcrMatches"
            assert backend.status()["generation"] == 3
        finally:
            await backend.close()

    run(main())
    copies = [extent_bytes(d) for d in dss]
    assert copies[0][: 1 << 20] == b"\xab" * (1 << 20)
    assert copies[0] == copies[1] == copies[2]


def test_cancelled_activation_leaves_no_task_or_socket(
    downstairs: DownstairsFactory, dead_target: str, sock: Path
) -> None:
    dss = [downstairs.create() for _ in range(2)]

    async def main() -> None:
        baseline = open_fds()
        backend = CrucibleBackend(
            "d-backend", make_vcr([dead_target] + [d.target for d in dss]), sock, retry=FAST
        )
        await backend.start_export()
        activation = asyncio.create_task(backend.activate())
        await wait_for(lambda: states(backend)[1:] == ["wait_quorum"] * 2, "live downstairs")
        assert len(open_fds() - baseline) >= 3  # the NBD listener + two downstairs sockets
        activation.cancel()
        with pytest.raises(asyncio.CancelledError):
            await activation
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert backend.status()["activation"] == "inactive"
        leftover = {fd for fd in open_fds() - baseline if fd.startswith("socket:")}
        assert len(leftover) == 1  # only the NBD listener, which close() owns
        await backend.close()
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert {fd for fd in open_fds() - baseline if fd.startswith("socket:")} == set()
        assert not sock.exists()

    run(main())


def test_generation_fence_refuses_lower_generation(downstairs: DownstairsFactory, sock: Path) -> None:
    dss = [downstairs.create() for _ in range(3)]
    targets = [d.target for d in dss]
    vid = "0b6a9a8e-0c56-4a34-8f0a-6c9a0e1f2d33"

    async def main() -> None:
        first = CrucibleBackend("a", make_vcr(targets, gen=2, volume_id=vid), sock, retry=FAST)
        try:
            await first.start_export()
            await first.activate()
            await qemu_io(sock, "write -P 0x11 0 64k", "flush")
        finally:
            await first.close()
        stale = CrucibleBackend("b", make_vcr(targets, gen=1, volume_id=vid), sock, retry=FAST)
        try:
            with pytest.raises(StorageFatalError, match=r"generation 1 is not greater.*2"):
                await stale.activate()
            assert stale.status()["activation"] == "failed"
            assert "generation" in str(stale.status()["error"])
        finally:
            await stale.close()

    run(main())


def test_higher_generation_takes_over(downstairs: DownstairsFactory, tmp_path: Path) -> None:
    dss = [downstairs.create() for _ in range(3)]
    targets = [d.target for d in dss]
    vid = "9d0c2f7e-5a0b-4c1e-8e3f-2b4d6f8a0c11"

    async def main() -> None:
        old = CrucibleBackend(
            "old", make_vcr(targets, gen=1, volume_id=vid), tmp_path / "old.nbd", retry=FAST
        )
        new = CrucibleBackend(
            "new", make_vcr(targets, gen=2, volume_id=vid), tmp_path / "new.nbd", retry=FAST
        )
        try:
            await old.start_export()
            await old.activate()
            await qemu_io(old.socket_path, "write -P 0x22 0 64k", "flush")
            await new.start_export()
            await new.activate()
            await wait_for(
                lambda: old.status()["activation"] == "failed",
                "old upstairs to be deactivated",
                last=old.status,
            )
            assert "taken over" in str(old.status()["error"])
            await qemu_io(new.socket_path, "read -P 0x22 0 64k", "write -P 0x33 64k 64k")
            with pytest.raises(AssertionError, match="qemu-io"):
                await qemu_io(old.socket_path, "write -P 0x44 0 64k", timeout_s=20)
        finally:
            await old.close()
            await new.close()

    run(main())


def test_read_only_parent_fills_unwritten_blocks(
    downstairs: DownstairsFactory, tmp_path: Path, sock: Path
) -> None:
    dss = [downstairs.create() for _ in range(3)]
    parent = tmp_path / "parent.raw"
    parent.write_bytes(b"\x7e" * (1 << 20))  # shorter than the volume: the rest reads as 0

    async def main() -> None:
        backend = CrucibleBackend(
            "p", make_vcr([d.target for d in dss], parent=str(parent)), sock, retry=FAST
        )
        try:
            await backend.start_export()
            await backend.activate()
            await qemu_io(sock, "read -P 0x7e 0 1M", "read -P 0 1M 1M")
            await qemu_io(sock, "write -P 0x01 4k 4k")
            await qemu_io(sock, "read -P 0x7e 0 4k", "read -P 0x01 4k 4k", "read -P 0x7e 8k 4k")
            await qemu_io(sock, "flush")
        finally:
            await backend.close()

    run(main())
    # what the reads took from the parent was written into every copy with WriteUnwritten
    # (Crucible's fill), and the guest's later write to 4k was not overwritten by it
    for ds in dss:
        region = extent_bytes(ds)
        assert region[:4096] == b"\x7e" * 4096 and region[8192 : 1 << 20] == b"\x7e" * ((1 << 20) - 8192)
        assert region[4096:8192] == b"\x01" * 4096


def test_replacement_while_active_live_repairs_new_downstairs(
    downstairs: DownstairsFactory, sock: Path
) -> None:
    dss = [downstairs.create() for _ in range(4)]
    vid = "5e2f0a1b-7c3d-4e5f-8a9b-0c1d2e3f4a5b"
    before = make_vcr([d.target for d in dss[:3]], volume_id=vid)
    after = make_vcr([dss[0].target, dss[3].target, dss[2].target], gen=2, volume_id=vid)

    async def main() -> None:
        backend = CrucibleBackend("r", before, sock, retry=FAST)
        try:
            await backend.start_export()
            await backend.activate()
            await qemu_io(sock, "write -P 0x5a 0 2M", "flush")
            assert await backend.replace(after) == "Started"
            await wait_for(
                lambda: states(backend) == ["active"] * 3, "repair to finish", last=lambda: states(backend)
            )
            assert await backend.replace(after) == "CompletedAlready"
            await qemu_io(sock, "read -P 0x5a 0 2M", "write -P 0x6b 2M 1M", "flush")
        finally:
            await backend.close()

    run(main())
    assert extent_bytes(dss[3]) == extent_bytes(dss[0]) == extent_bytes(dss[2])
    assert extent_bytes(dss[3])[: 2 << 20] == b"\x5a" * (2 << 20)


def test_downstairs_create_twice_is_a_clear_error(downstairs: DownstairsFactory) -> None:
    import subprocess
    import sys

    ds = downstairs.create(start=False)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sut.storage.downstairs",
            "create",
            "-u",
            "557cb12a-396f-4e06-b3c5-75bcc770db89",
            "-d",
            str(ds.data_dir),
            "--extent-size",
            "8",
            "--extent-count",
            "1",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 2
    assert b"already exists" in proc.stderr and b"region.json" in proc.stderr
    assert b"Traceback" not in proc.stderr
    assert shutil.which("qemu-io"), "qemu-io is required for these tests"


def test_second_activate_while_pending_is_refused(dead_target: str, tmp_path: Path) -> None:
    async def main() -> None:
        backend = CrucibleBackend(
            "x", make_vcr([dead_target, "127.0.0.1:1", "127.0.0.1:2"]), tmp_path / "x.nbd", retry=FAST
        )
        first = asyncio.create_task(backend.activate())
        await wait_for(lambda: backend.status()["activation"] == "activating", "activating")
        with pytest.raises(Exception, match="activate in progress"):
            await backend.activate()
        await wait_for(
            lambda: all(d["failed_attempts"] >= 2 for d in ds_status(backend)),
            "failed attempts to be counted",
            last=backend.status,
        )
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await backend.close()

    run(main())


def test_lower_generation_is_refused_while_another_upstairs_is_active(
    downstairs: DownstairsFactory, tmp_path: Path
) -> None:
    dss = [downstairs.create() for _ in range(3)]
    targets = [d.target for d in dss]
    vid = "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f"

    async def main() -> None:
        active = CrucibleBackend("a", make_vcr(targets, gen=3, volume_id=vid), tmp_path / "a.nbd", retry=FAST)
        lower = CrucibleBackend("b", make_vcr(targets, gen=2, volume_id=vid), tmp_path / "b.nbd", retry=FAST)
        try:
            await active.activate()
            # Crucible's downstairs refuses a lower generation by closing the connection after
            # PromoteToActive, without a word; the upstairs retries, as Crucible's does, and
            # its status says where it stops
            pending = asyncio.create_task(lower.activate())

            def refused() -> bool:
                return all("refused our promote at generation 2" in str(d["last_error"])
                           for d in ds_status(lower))

            await wait_for(refused, "every downstairs to drop the lower generation's promote",
                           last=lambda: ds_status(lower))
            assert not pending.done()
            assert lower.status()["activation"] == "activating"
            assert active.status()["activation"] == "active"
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
        finally:
            await lower.close()
            await active.close()

    run(main())


def test_a_handover_activation_fails_at_once_when_its_promote_is_refused(
    downstairs: DownstairsFactory, tmp_path: Path
) -> None:
    """A migration target that would take the disk over at the generation its source holds
    (so it cannot fence it) fails after a few refusals, naming them, not after the hand-over's
    deadline; the holder stays active. At a higher generation the same hand-over succeeds."""
    dss = [downstairs.create() for _ in range(3)]
    targets = [d.target for d in dss]
    vid = "2c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f"

    async def main() -> None:
        source = CrucibleBackend("s", make_vcr(targets, gen=1, volume_id=vid), tmp_path / "s.nbd", retry=FAST)
        same = CrucibleBackend("t", make_vcr(targets, gen=1, volume_id=vid), tmp_path / "t.nbd", retry=FAST)
        above = CrucibleBackend("u", make_vcr(targets, gen=2, volume_id=vid), tmp_path / "u.nbd", retry=FAST)
        try:
            await source.activate()
            # 3 refusals, 0.2 s apart: well under the 10 s bound (the deadline it replaces is 120 s)
            with pytest.raises(StorageFatalError, match=r"refused our promote at generation 1 \(3 in a row"):
                await asyncio.wait_for(same.activate(handover=True), 10.0)
            assert same.status()["activation"] == "failed"
            assert source.status()["activation"] == "active"
            await asyncio.wait_for(above.activate(handover=True), 30.0)
            assert above.status()["activation"] == "active"
        finally:
            for backend in (above, same, source):
                await backend.close()

    run(main())


def test_restarted_downstairs_is_repaired_while_active(downstairs: DownstairsFactory, sock: Path) -> None:
    dss = [downstairs.create() for _ in range(3)]

    async def main() -> None:
        backend = CrucibleBackend("r", make_vcr([d.target for d in dss]), sock, retry=FAST)
        try:
            await backend.start_export()
            await backend.activate()
            port = dss[1].port
            dss[1].stop()
            await wait_for(lambda: states(backend)[1] != "active", "the stopped downstairs")
            # writes continue on the two remaining copies
            await qemu_io(sock, "write -P 0x77 0 1M", "flush")
            await asyncio.to_thread(dss[1].start, port)
            await wait_for(
                lambda: states(backend) == ["active"] * 3,
                "the restarted downstairs to be repaired",
                last=lambda: ds_status(backend),
            )
            await qemu_io(sock, "read -P 0x77 0 1M")
        finally:
            await backend.close()

    run(main())
    assert extent_bytes(dss[0]) == extent_bytes(dss[1]) == extent_bytes(dss[2])


def test_close_ends_a_pending_activation(dead_target: str, tmp_path: Path) -> None:
    async def main() -> None:
        backend = CrucibleBackend(
            "c", make_vcr([dead_target, "127.0.0.1:1", "127.0.0.1:2"]), tmp_path / "c.nbd"
        )
        activation = asyncio.create_task(backend.activate())
        await wait_for(lambda: backend.status()["activation"] == "activating", "activating")
        await backend.close()
        with pytest.raises(StorageError, match="closed while activation was pending"):
            await asyncio.wait_for(activation, 10)
        assert backend.status()["activation"] == "closed"
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(main())


def test_downstairs_drops_garbage_frames_and_keeps_serving(downstairs: DownstairsFactory, sock: Path) -> None:
    dss = [downstairs.create() for _ in range(3)]

    async def main() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", dss[0].port)
        writer.write(b"\xff\xff\xff\xff garbage that is not a frame")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the downstairs
        writer.close()
        backend = CrucibleBackend("g", make_vcr([d.target for d in dss]), sock, retry=FAST)
        try:
            await backend.activate()  # still serving after the bad peer
        finally:
            await backend.close()

    run(main())
    log = dss[0].log_path.read_text()
    assert '"event": "protocol_error"' in log
    assert "exceeds the frame cap" in log
