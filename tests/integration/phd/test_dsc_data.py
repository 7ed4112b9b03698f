"""Data written through a real upstairs survives stop, kill and start of every member."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from sut.storage.backend import CrucibleBackend, RetryPolicy
from sut.storage.vcr import dump_vcr, region_volume

from .conftest import GEOMETRY, SetFactory

pytestmark = pytest.mark.integration

FAST = RetryPolicy(connect_timeout_s=1.0, reconnect_delay_s=0.2)


def run(coro: Coroutine[Any, Any, str], timeout_s: float = 90.0) -> str:
    async def bounded() -> str:
        async with asyncio.timeout(timeout_s):
            return await coro

    return asyncio.run(bounded())


async def qemu_io(sock: Path, *commands: str) -> str:
    """A real NBD client against the upstairs' export; fails with its output."""
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    proc = await asyncio.create_subprocess_exec(
        *argv, f"nbd+unix:///?socket={sock}", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await proc.communicate())[0].decode(errors="replace")
    if proc.returncode != 0 or "Pattern verification failed" in out or "error" in out.lower():
        raise AssertionError(f"qemu-io {commands} failed (rc {proc.returncode}):\n{out}")
    return out


async def through_upstairs(targets: list[str], gen: int, sock: Path, *commands: str) -> str:
    vcr = dump_vcr(region_volume(str(uuid.uuid4()), targets, gen=gen, block_size=GEOMETRY.block_size,
                                 blocks_per_extent=GEOMETRY.extent_size,
                                 extent_count=GEOMETRY.extent_count))
    backend = CrucibleBackend("dsc-data", vcr, sock, retry=FAST)
    try:
        await backend.start_export()
        await backend.activate()
        return await qemu_io(sock, *commands)
    finally:
        await backend.close()


def test_written_data_survives_stop_kill_and_start(make_set: SetFactory) -> None:
    dss = make_set()
    sock = Path("/tmp") / f"phd-dsc-{uuid.uuid4().hex[:8]}.nbd"  # short: unix socket path limit
    run(through_upstairs(dss.targets, 1, sock, "write -P 0x5a 0 1M", "write -P 0xc3 2M 64k", "flush"))
    dss.kill(0)  # a crash
    dss.stop(1)  # a clean stop
    dss.restart(2)
    dss.heal()
    out = run(through_upstairs(dss.targets, 2, sock, "read -P 0x5a 0 1M", "read -P 0xc3 2M 64k"))
    assert "read 1048576/1048576 bytes" in out, dss.format_steps()
