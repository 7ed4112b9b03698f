"""The downstairs checks every extent id, block, count and number of a job before using it.

A job out of range gets an error reply (of the kind the job expects, with its job_id) and
leaves the region untouched; the connection is not the judge of that (see
tests/integration/storage/test_hostile_wire.py for the same over a real socket).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from sut.storage.downstairs import Downstairs, FaultConfig, _parser
from sut.storage.protocol import MAX_IO_BYTES, PROTOCOL_VERSION, Message, encode, read_message
from sut.storage.region import Region, RegionError

UUID = "557cb12a-396f-4e06-b3c5-75bcc770db89"
BS, EXTENT, COUNT = 512, 16, 4
TOTAL = EXTENT * COUNT
BITMAP = "ff" * (EXTENT // 8)


def files_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def region(tmp_path: Path) -> Region:
    r = Region.create(tmp_path / "r", region_uuid=UUID, block_size=BS, extent_size=EXTENT, extent_count=COUNT)
    r.write(3, b"\x11" * BS)
    r.flush(1, 1)
    return r


def put(eid: object, **over: object) -> Message:
    fields = {"job_id": 9, "eid": eid, "gen": 1, "flush": 1, "written": BITMAP, **over}
    return Message("ExtentPut", fields, bytes(EXTENT * BS))


BAD = [
    (Message("ExtentFetch", {"job_id": 9, "eid": -1}), "ExtentData", "extent -1"),
    (Message("ExtentFetch", {"job_id": 9, "eid": COUNT}), "ExtentData", f"extent {COUNT}"),
    (Message("ExtentFetch", {"job_id": 9, "eid": 10**19}), "ExtentData", "extent"),
    (Message("ExtentFetch", {"job_id": 9, "eid": True}), "ExtentData", "integer"),
    (Message("ExtentFetch", {"job_id": 9, "eid": "1"}), "ExtentData", "integer"),
    (put(-1), "ExtentPutAck", "extent -1"),
    (put(COUNT), "ExtentPutAck", "extent"),
    (put(0, gen=-1), "ExtentPutAck", "gen"),
    (put(0, flush=2**64), "ExtentPutAck", "flush"),
    (put(0, written="zz"), "ExtentPutAck", "written"),
    (put(0, written=["ff"]), "ExtentPutAck", "written"),
    (put(0, dirty="yes"), "ExtentPutAck", "dirty"),
    (Message("Read", {"job_id": 9, "block": -1, "count": 1}), "ReadResponse", "block"),
    (Message("Read", {"job_id": 9, "block": 0, "count": -1}), "ReadResponse", "count"),
    (Message("Read", {"job_id": 9, "block": TOTAL, "count": 1}), "ReadResponse", "outside"),
    (Message("Read", {"job_id": 9, "block": 2**70, "count": 1}), "ReadResponse", "block"),
    (Message("Read", {"job_id": 9, "block": 0.5, "count": 1}), "ReadResponse", "integer"),
    (Message("Read", {"job_id": 9, "block": 0, "count": MAX_IO_BYTES // BS + 1}), "ReadResponse", "count"),
    (Message("Write", {"job_id": 9, "block": -1}, bytes(BS)), "WriteAck", "block"),
    (Message("Write", {"job_id": 9, "block": TOTAL}, bytes(BS)), "WriteAck", "outside"),
    (Message("Write", {"job_id": 9, "block": "0"}, bytes(BS)), "WriteAck", "integer"),
    (Message("WriteUnwritten", {"job_id": 9, "block": 0}, bytes(7)), "WriteAck", "multiple"),
    (Message("Flush", {"job_id": 9, "flush_number": -1, "gen": 1}), "FlushAck", "flush_number"),
    (Message("Flush", {"job_id": 9, "flush_number": 2, "gen": None}), "FlushAck", "gen"),
    (
        Message("Flush", {"job_id": 9, "flush_number": 2, "gen": 2, "extent_limit": -1}),
        "FlushAck",
        "extent_limit",
    ),
    (
        Message("Flush", {"job_id": 9, "flush_number": 2, "gen": 2, "extent_limit": COUNT + 1}),
        "FlushAck",
        "extent_limit",
    ),
]


@pytest.mark.parametrize(
    ("msg", "reply_kind", "reason"), BAD, ids=[f"{m.kind}-{i}" for i, (m, _k, _r) in enumerate(BAD)]
)
def test_out_of_range_jobs_get_an_error_reply_and_change_nothing(
    region: Region, msg: Message, reply_kind: str, reason: str
) -> None:
    ds = Downstairs(region, read_only=False, faults=FaultConfig())
    before = files_hash(region.directory)
    versions = region.versions()
    reply = asyncio.run(ds._dispatch(msg))
    assert reply is not None and reply.kind == reply_kind, reply
    assert reply["job_id"] == 9 and reply["error"], reply
    assert reason in reply["error"], reply["error"]
    assert reply.payload == b""
    assert files_hash(region.directory) == before
    assert region.versions() == versions
    region.close()


def test_region_metadata_is_bounds_checked(region: Region) -> None:
    for eid in (-1, -COUNT, COUNT, 10**6):
        with pytest.raises(RegionError, match="does not exist"):
            region.meta(eid)
    assert region.meta(COUNT - 1).gen == 0
    region.close()


def test_jobs_in_range_still_work(region: Region) -> None:
    ds = Downstairs(region, read_only=False, faults=FaultConfig())

    async def main() -> None:
        reply = await ds._dispatch(Message("Read", {"job_id": 1, "block": 0, "count": TOTAL}))
        assert reply is not None and not reply["error"] and len(reply.payload) == TOTAL * BS
        reply = await ds._dispatch(Message("ExtentFetch", {"job_id": 2, "eid": COUNT - 1}))
        assert reply is not None and not reply["error"] and len(reply.payload) == EXTENT * BS
        reply = await ds._dispatch(put(COUNT - 1, job_id=3, dirty=True))
        assert reply is not None and not reply["error"], reply
        reply = await ds._dispatch(
            Message("Flush", {"job_id": 4, "flush_number": 2, "gen": 2, "extent_limit": COUNT})
        )
        assert reply is not None and not reply["error"], reply

    asyncio.run(main())
    region.close()


def test_an_unexpected_exception_is_one_json_line_and_the_connection_closes(
    region: Region, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug in a handler (here: _dispatch raising RuntimeError) costs that connection and one
    JSON log line; no traceback, and the downstairs serves the next connection."""
    ds = Downstairs(region, read_only=False, faults=FaultConfig())
    calls = {"n": 0}
    real = ds._dispatch

    async def broken(msg: Message) -> Message | None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug")
        return await real(msg)

    ds._dispatch = broken  # type: ignore[method-assign]

    async def session(port: int, gen: int) -> Message | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            hello = {"version": PROTOCOL_VERSION, "upstairs_id": "u", "session_id": f"s{gen}", "gen": gen}
            writer.write(encode(Message("HereIAm", {**hello, "read_only": False, "encrypted": False})))
            writer.write(
                encode(Message("PromoteToActive", {"upstairs_id": "u", "session_id": f"s{gen}", "gen": gen}))
            )
            writer.write(encode(Message("Ruok")))
            await writer.drain()
            replies = [await asyncio.wait_for(read_message(reader), 10) for _ in range(2)]
            assert [r.kind for r in replies if r is not None] == ["YesItsMe", "YouAreNowActive"]
            return await asyncio.wait_for(read_message(reader), 10)
        finally:
            writer.close()

    async def main() -> None:
        port = await ds.start("127.0.0.1", 0)
        try:
            assert await session(port, 1) is None  # closed instead of answering
            reply = await session(port, 2)
            assert reply is not None and reply.kind == "Imok"
        finally:
            await ds.stop()

    asyncio.run(main())
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines()]  # every line is JSON
    failed = [e for e in lines if e["event"] == "connection_error"]
    assert len(failed) == 1 and "RuntimeError: a bug" in failed[0]["error"], lines
    assert "Traceback" not in err


def test_run_flags_default_and_reject_nonsense() -> None:
    parser = _parser()
    args = parser.parse_args(["run", "-d", "/x", "-p", "0"])
    assert args.handshake_timeout == 10.0 and args.max_connections == 64
    args = parser.parse_args(
        ["run", "-d", "/x", "-p", "0", "--handshake-timeout", "0.5", "--max-connections", "3"]
    )
    assert args.handshake_timeout == 0.5 and args.max_connections == 3
    for bad in (["--handshake-timeout", "0"], ["--max-connections", "-1"], ["--max-connections", "many"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["run", "-d", "/x", "-p", "0", *bad])
