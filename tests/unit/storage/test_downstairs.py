"""sut.storage.downstairs in-process: the per-connection job bounds (the protocol itself is
tested against the real binary in tests/integration/storage/test_downstairs_conformance.py)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from sut.storage import downstairs, wire
from sut.storage.extent_raw import RawRegion
from sut.storage.wire import messages as m

U, S = uuid.UUID(int=1), uuid.UUID(int=2)
TIMEOUT_S = 10.0


async def _session(tmp_path: Path, jobs: list[wire.Message]) -> tuple[list[wire.Message], bool]:
    """Negotiate, send ``jobs``; return the replies to them and whether the connection closed."""
    region = RawRegion.create(tmp_path / "r", uuid.UUID(int=3), block_size=512, extent_size=8, extent_count=2)
    ds = downstairs.Downstairs(region, read_only=False)
    port = await ds.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assembler = wire.FrameAssembler(wire.MAX_FRAME)
    pending: list[wire.Message] = []

    async def recv() -> wire.Message | None:
        while not pending:
            chunk = await asyncio.wait_for(reader.read(1 << 16), TIMEOUT_S)
            if not chunk:
                return None
            pending.extend(assembler.feed(chunk))
        return pending.pop(0)

    try:
        for msg in (
            m.HereIAm(13, U, S, 1, False, False, ()),
            m.PromoteToActive(U, S, 1),
            m.RegionInfoPlease(),
            m.ExtentVersionsPlease(),
        ):
            writer.write(wire.encode(msg))
            assert await recv() is not None
        for msg in jobs:
            writer.write(wire.encode(msg))
        await writer.drain()
        replies: list[wire.Message] = []
        while (reply := await recv()) is not None:
            replies.append(reply)
        return replies, True
    finally:
        writer.close()
        await ds.stop()


def test_jobs_waiting_for_dependencies_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(downstairs, "MAX_PENDING_JOBS", 3)
    jobs: list[wire.Message] = [m.Barrier(U, S, 1000 + i, (999,)) for i in range(4)]  # 999 never comes
    replies, closed = asyncio.run(_session(tmp_path, jobs))
    assert replies == [] and closed


def test_jobs_done_between_flushes_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(downstairs, "MAX_DONE_SINCE_FLUSH", 3)
    reads: list[wire.Message] = [m.ReadRequest(U, S, 1000 + i, (), 0, 0) for i in range(3)]
    flush: list[wire.Message] = [m.Flush(U, S, 1003, (), 1, 1)]
    more: list[wire.Message] = [m.ReadRequest(U, S, 1004 + i, (), 0, 0) for i in range(4)]
    replies, closed = asyncio.run(_session(tmp_path, reads + flush + more))
    # 3 reads, the flush (it resets the set to itself), 2 more reads; the 3rd is refused
    assert [type(r).__name__ for r in replies] == ["ReadResponse"] * 3 + ["FlushAck"] + ["ReadResponse"] * 2
    assert closed
