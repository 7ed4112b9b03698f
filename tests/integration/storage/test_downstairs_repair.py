"""Repair on our Crucible-protocol downstairs (sut.storage.downstairs) against the REAL one.

The repair HTTP server on port + 4000 (the same answers as the real binary's), reconciliation
(ExtentFlush / ExtentClose / ExtentRepair / ExtentReopen) and live repair (ExtentLiveClose /
ExtentLiveFlushClose / ExtentLiveRepair / ExtentLiveReopen / ExtentLiveNoOp) between downstairs
of either kind: ours from a real source, the real one from our source, ours from ours. Each
``test_interop_*`` runs on both kinds; ``test_real_*`` pins the real one where it aborts,
``test_ours_*`` where ours answers instead, and the hostile requests to our repair server.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sut.storage import wire
from sut.storage.extent_raw import RawExtent, extent_path, repair_dir
from sut.storage.repair_http import MAX_REPAIR_CONNECTIONS, MAX_REQUEST_HEAD
from sut.storage.wire import messages as m
from sut.storage.wire.blockhash import encrypted_block_hash, unencrypted_contexts
from tests.integration.storage.crucible_ds import (
    BLOCK_SIZE,
    EXTENT_COUNT,
    EXTENT_SIZE,
    KINDS,
    REPLY_TIMEOUT_S,
    CrucibleDownstairs,
    OurDownstairs,
    exchange,
    needs_binary,
    negotiate,
    negotiated,
    region_snapshot,
    repair_get,
    start_downstairs,
)
from tests.unit.storage.test_wire import ORACLE_REGION, ORACLE_SESSION, ORACLE_UPSTAIRS, oracle_pattern

pytestmark = [pytest.mark.integration]

U, S = ORACLE_UPSTAIRS, ORACLE_SESSION
REAL = pytest.param("real", marks=needs_binary)
FILE_SIZE = RawExtent.file_size(BLOCK_SIZE, EXTENT_SIZE)
UNREACHABLE = wire.SocketAddr.parse("127.0.0.1", 9)  # discard port: nothing listens on loopback
# (source kind, destination kind)
PAIRS = [
    pytest.param(("real", "ours"), marks=needs_binary, id="ours-from-real"),
    pytest.param(("ours", "real"), marks=needs_binary, id="real-from-ours"),
    pytest.param(("ours", "ours"), id="ours-from-ours"),
]


@pytest.fixture(params=[REAL, "ours"])
def downstairs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[CrucibleDownstairs]:
    with start_downstairs(tmp_path, request.param) as ds:
        yield ds


@pytest.fixture
def ours(tmp_path: Path) -> Iterator[CrucibleDownstairs]:
    with start_downstairs(tmp_path, "ours") as ds:
        yield ds


def write(
    job: int, start: int, data: bytes, deps: tuple[int, ...] = (), u: uuid.UUID = U, s: uuid.UUID = S
) -> m.Write:
    return m.Write(wire.WriteHeader(u, s, job, deps, start, unencrypted_contexts(data, BLOCK_SIZE)), data)


def _pattern(seed: int, blocks: int) -> bytes:
    return bytes((seed * 37 + i * 11) & 0xFF for i in range(blocks * BLOCK_SIZE))


# -- the repair API --------------------------------------------------------------------------------
REGION_INFO_JSON = (
    '{"block_size":512,"extent_size":{"value":64,"shift":9},"extent_count":4,'
    f'"uuid":"{ORACLE_REGION}","encrypted":false,"database_read_version":1,"database_write_version":1}}'
).encode()
BAD_U32 = "bad parameter in URL path: unable to parse '{}' as u32"
BAD_TYPE = "bad parameter in URL path: unknown variant `{}`, expected one of `data`, `db`, `db_shm`, `db_wal`"

# path -> (status, body: exact JSON bytes for a 200, the error message for others, None: any)
API_CASES: dict[str, tuple[int, bytes | str | None]] = {
    "/region-info": (200, REGION_INFO_JSON),
    "/region-mode": (200, b"false"),
    "/work": (200, b"true"),
    "/extent/0/files": (200, b'["000"]'),
    "/extent/3/files": (200, b'["003"]'),
    "/extent/0/repair-ready": (200, b"false"),
    "/extent/4/files": (400, "EBADF"),
    "/extent/4095/files": (400, "EBADF"),
    "/extent/x/files": (400, BAD_U32.format("x")),
    "/extent/-1/files": (400, BAD_U32.format("-1")),
    "/extent/4294967296/files": (400, BAD_U32.format("4294967296")),
    "/extent/99999999999999999999999/repair-ready": (400, BAD_U32.format("99999999999999999999999")),
    "/newextent/0/junk": (400, BAD_TYPE.format("junk")),
    "/newextent/0/Data": (400, BAD_TYPE.format("Data")),
    "/newextent/0/db-shm": (400, BAD_TYPE.format("db-shm")),
    "/newextent/x/junk": (400, BAD_U32.format("x")),  # the eid is checked first
    "/newextent/0/db": (400, None),  # no SQLite file (the messages differ: the real one names the path)
    "/newextent/0/db_wal": (400, None),
    "/newextent/9/data": (400, None),  # no such extent
    "/extent/0": (404, "Not Found"),
    "/nothing": (404, "Not Found"),
    "/newextent/0/data/more": (404, "Not Found"),
    # dropshot's path handling, which ours copies
    "/extent/00/files": (200, b'["000"]'),
    "/extent/+1/files": (200, b'["001"]'),
    "/extent/%31/files": (200, b'["001"]'),
    "//region-info/": (200, REGION_INFO_JSON),
    "/region-mode?x=1": (200, b"false"),
    "/extent/0/../0/files": (400, "invalid path encoding"),
    "/newextent/../data": (400, "invalid path encoding"),
    "/newextent/./0/data": (400, "invalid path encoding"),
}


@pytest.mark.parametrize("path", sorted(API_CASES))
def test_interop_repair_api_answers(downstairs: CrucibleDownstairs, path: str) -> None:
    status, expected = API_CASES[path]
    answer = repair_get(downstairs, path)
    assert answer.status == status, answer
    assert answer.headers["content-type"] == "application/json"
    assert "date" in answer.headers
    request_id = answer.headers["x-request-id"]
    uuid.UUID(request_id)
    if status == 200:
        assert answer.body == expected
        return
    body = answer.json()
    assert isinstance(body, dict) and set(body) == {"request_id", "message"}
    assert body["request_id"] == request_id
    assert answer.body.startswith(b'{\n  "request_id": ')  # indented, as dropshot's
    if expected is not None:
        assert body["message"] == expected


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD"])
def test_interop_repair_api_other_methods(downstairs: CrucibleDownstairs, method: str) -> None:
    answer = repair_get(downstairs, "/region-info", method)
    assert answer.status == 405
    assert answer.headers["allow"] == "GET"
    if method != "HEAD":
        assert answer.json() == {
            "request_id": answer.headers["x-request-id"],
            "message": "Method Not Allowed",
        }
    assert repair_get(downstairs, "/nothing", method).status == 404  # the route first


def test_interop_repair_api_serves_the_extent_file(downstairs: CrucibleDownstairs) -> None:
    data = oracle_pattern(2)
    with negotiated(downstairs) as peer:
        assert exchange(peer, write(1000, EXTENT_SIZE + 5, data)) == m.WriteAck(U, S, 1000, None)
        assert exchange(peer, m.Flush(U, S, 1001, (1000,), 4, 2)) == m.FlushAck(U, S, 1001, None)
        answer = repair_get(downstairs, "/newextent/1/data")
        assert answer.status == 200
        assert answer.headers["content-type"] == "application/octet-stream"
        assert len(answer.body) == FILE_SIZE
        assert answer.body == extent_path(downstairs.region_dir, 1).read_bytes()
        assert answer.body[5 * BLOCK_SIZE : 7 * BLOCK_SIZE] == data
        assert repair_get(downstairs, "/extent/1/repair-ready").body == b"false"  # open


@pytest.mark.parametrize("kind", [REAL, "ours"])
def test_interop_repair_api_read_only(tmp_path: Path, kind: str) -> None:
    with start_downstairs(tmp_path, kind, ("--mode", "ro")) as ds:
        assert repair_get(ds, "/region-mode").body == b"true"
        assert repair_get(ds, "/extent/2/repair-ready").body == b"true"  # always, read-only


@needs_binary
def test_real_downstairs_aborts_on_repair_ready_past_the_end(tmp_path: Path) -> None:
    """Pinned: /extent/{eid}/repair-ready indexes the extent table unchecked; eid = extent_count
    panics and the process aborts (every session lost). Ours answers 400 (below)."""
    with start_downstairs(tmp_path, "real") as ds:
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            repair_get(ds, f"/extent/{EXTENT_COUNT}/repair-ready")
        assert ds.proc is not None
        assert ds.proc.wait(timeout=REPLY_TIMEOUT_S) != 0


def test_ours_answers_repair_ready_past_the_end(ours: CrucibleDownstairs) -> None:
    for eid in (EXTENT_COUNT, 4096, 0xFFFFFFFF):
        answer = repair_get(ours, f"/extent/{eid}/repair-ready")
        assert answer.status == 400
        assert answer.json()["message"] == f"extent {eid} is not in this region of {EXTENT_COUNT} extents"  # type: ignore[index]
    assert repair_get(ours, "/work").status == 200


# -- reconciliation ----------------------------------------------------------------------------------
SRC_U, SRC_S = uuid.UUID(int=0x50), uuid.UUID(int=0x51)
DST_U, DST_S = uuid.UUID(int=0xD0), uuid.UUID(int=0xD1)
ALL_BLOCKS = EXTENT_SIZE * EXTENT_COUNT


def _io(
    peer_ids: tuple[uuid.UUID, uuid.UUID], job: int, start: int, data: bytes, deps: tuple[int, ...] = ()
) -> m.Write:
    return write(job, start, data, deps, *peer_ids)


def _seed(ds: CrucibleDownstairs, ids: tuple[uuid.UUID, uuid.UUID], seed: int, *, flush: bool) -> None:
    """Writes to extents 1 and 2 (one session); flushed (flush 5, gen 1) or left dirty."""
    peer, _ = negotiate(ds, *ids)
    u, s = ids
    try:
        assert exchange(peer, _io(ids, 1000, EXTENT_SIZE + 3, _pattern(seed, 4))) == m.WriteAck(
            u, s, 1000, None
        )
        assert exchange(peer, _io(ids, 1001, 2 * EXTENT_SIZE + 60, _pattern(seed + 1, 2))) == m.WriteAck(
            u, s, 1001, None
        )
        if flush:
            assert exchange(peer, m.Flush(u, s, 1002, (1000, 1001), 5, 1)) == m.FlushAck(u, s, 1002, None)
        # one more rewrite of extent 1, never flushed: the extent is dirty
        assert exchange(peer, _io(ids, 1003, EXTENT_SIZE + 4, _pattern(seed + 2, 1))) == m.WriteAck(
            u, s, 1003, None
        )
    finally:
        peer.close()


def _extent_blocks(read: m.ReadResponse, eid: int) -> tuple[bytes, tuple[object, ...]]:
    assert not isinstance(read.header.blocks, wire.CrucibleError)
    lo, hi = eid * EXTENT_SIZE, (eid + 1) * EXTENT_SIZE
    return read.data[lo * BLOCK_SIZE : hi * BLOCK_SIZE], read.header.blocks[lo:hi]


@pytest.fixture(params=PAIRS)
def pair(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[CrucibleDownstairs, CrucibleDownstairs]]:
    source_kind, dest_kind = request.param
    with start_downstairs(tmp_path, source_kind) as source, start_downstairs(tmp_path, dest_kind) as dest:
        yield source, dest


def test_interop_reconciliation_repairs_an_extent(
    pair: tuple[CrucibleDownstairs, CrucibleDownstairs],
) -> None:
    """The upstairs' sequence for one extent: ExtentFlush (source only), ExtentClose (all),
    ExtentRepair (destination only), ExtentReopen (all). Afterwards the destination's extent
    has the source's versions, data and contexts; its other extents are untouched."""
    source, dest = pair
    _seed(source, (SRC_U, SRC_S), 1, flush=True)
    _seed(dest, (DST_U, DST_S), 9, flush=False)
    _, dest_before = region_snapshot(dest, 2, DST_U, DST_S, ALL_BLOCKS)
    src, src_versions = negotiate(source, SRC_U, SRC_S, 3)
    dst, dst_versions = negotiate(dest, DST_U, DST_S, 3)
    try:
        assert src_versions.dirty_bits[1] and dst_versions.dirty_bits[1]
        assert exchange(src, m.ExtentFlush(0, 1, 0, 7, 3)) == m.RepairAckId(0)
        for peer in (src, dst):
            assert exchange(peer, m.ExtentClose(1, 1)) == m.RepairAckId(1)
        assert repair_get(source, "/extent/1/repair-ready").body == b"true"
        assert repair_get(source, "/extent/2/repair-ready").body == b"false"
        repair = m.ExtentRepair(2, 1, 0, source.repair_addr, (1,))
        assert exchange(dst, repair) == m.RepairAckId(2)
        for peer in (src, dst):
            assert exchange(peer, m.ExtentReopen(3, 1)) == m.RepairAckId(3)
        assert not repair_dir(dest.region_dir, 1, "copy").exists()
        assert not repair_dir(dest.region_dir, 1, "replace").exists()
        assert not repair_dir(dest.region_dir, 1, "completed").exists()
    finally:
        src.close()
        dst.close()
    src_versions, src_read = region_snapshot(source, 4, SRC_U, SRC_S, ALL_BLOCKS)
    dst_versions, dst_read = region_snapshot(dest, 4, DST_U, DST_S, ALL_BLOCKS)
    for field in ("gen_numbers", "flush_numbers", "dirty_bits"):
        assert getattr(dst_versions, field)[1] == getattr(src_versions, field)[1], field
    assert (src_versions.gen_numbers[1], src_versions.flush_numbers[1], src_versions.dirty_bits[1]) == (
        3,
        7,
        False,
    )
    assert _extent_blocks(dst_read, 1) == _extent_blocks(src_read, 1)
    for eid in (0, 2, 3):
        assert _extent_blocks(dst_read, eid) == _extent_blocks(dest_before, eid)
    assert extent_path(dest.region_dir, 1).read_bytes() == extent_path(source.region_dir, 1).read_bytes()


def test_interop_reconciliation_messages_during_negotiation_are_ignored(
    downstairs: CrucibleDownstairs,
) -> None:
    """Before ExtentVersionsPlease / LastFlush they are logged and dropped (no reply, the
    extent stays open); afterwards they are served."""
    peer = downstairs.connect()
    try:
        peer.send(m.ExtentClose(0, 0))
        peer.send(m.ExtentFlush(0, 0, 0, 1, 1))
        peer.send(hello_msg())
        assert isinstance(peer.recv(), m.YesItsMe)
        peer.send(m.ExtentClose(1, 0))
        peer.send(m.PromoteToActive(U, S, 1))
        assert peer.recv() == m.YouAreNowActive(U, S, 1)
        peer.send(m.ExtentClose(2, 0))
        peer.send(m.RegionInfoPlease())
        assert isinstance(peer.recv(), m.RegionInfo)
        peer.send(m.ExtentClose(3, 0))
        peer.send(m.ExtentVersionsPlease())
        assert isinstance(peer.recv(), m.ExtentVersions)
        assert repair_get(downstairs, "/extent/0/repair-ready").body == b"false"
        peer.send(m.ReadRequest(U, S, 1000, (), 0, 1))
        assert isinstance(peer.recv(), m.ReadResponse)
        assert exchange(peer, m.ExtentClose(4, 0)) == m.RepairAckId(4)
        assert repair_get(downstairs, "/extent/0/repair-ready").body == b"true"
        assert exchange(peer, m.ExtentReopen(5, 0)) == m.RepairAckId(5)
    finally:
        peer.close()


def hello_msg() -> m.HereIAm:
    return m.HereIAm(wire.MESSAGE_VERSION, U, S, 1, False, False, ())


def test_interop_extent_repair_from_an_unreachable_source(downstairs: CrucibleDownstairs) -> None:
    """RepairRequestError, leaving NNN.copy behind: a second attempt is an IoError (the copy
    directory exists) until the extent is reopened, which removes it."""
    with negotiated(downstairs) as peer:
        assert exchange(peer, m.ExtentClose(1, 2)) == m.RepairAckId(1)
        first = exchange(peer, m.ExtentRepair(2, 2, 0, UNREACHABLE, (1,)))
        assert isinstance(first, m.ExtentError) and (first.repair_id, first.extent_id) == (2, 2)
        assert first.error.kind == wire.ErrorKind.RepairRequestError
        assert repair_dir(downstairs.region_dir, 2, "copy").is_dir()
        second = exchange(peer, m.ExtentRepair(3, 2, 0, UNREACHABLE, (1,)))
        assert isinstance(second, m.ExtentError) and second.error.kind == wire.ErrorKind.IoError
        assert exchange(peer, m.ExtentReopen(4, 2)) == m.RepairAckId(4)
        assert not repair_dir(downstairs.region_dir, 2, "copy").exists()
        peer.send(m.ReadRequest(U, S, 1000, (), 2 * EXTENT_SIZE, 1))
        read = peer.recv()
        assert isinstance(read, m.ReadResponse) and read.header.blocks == (wire.ReadBlockEmpty(),)


def test_interop_extent_repair_from_a_source_whose_extent_is_open(
    pair: tuple[CrucibleDownstairs, CrucibleDownstairs],
) -> None:
    """The source's repair-ready is false after the download: RepairRequestError, the
    destination's extent is left as it was."""
    source, dest = pair
    _seed(source, (SRC_U, SRC_S), 1, flush=True)
    before = extent_path(dest.region_dir, 1).read_bytes()
    with negotiated(dest, DST_U, DST_S, 1) as dst:
        assert exchange(dst, m.ExtentClose(1, 1)) == m.RepairAckId(1)
        reply = exchange(dst, m.ExtentRepair(2, 1, 0, source.repair_addr, (1,)))
        assert isinstance(reply, m.ExtentError) and reply.error.kind == wire.ErrorKind.RepairRequestError
        assert extent_path(dest.region_dir, 1).read_bytes() == before
        assert exchange(dst, m.ExtentReopen(3, 1)) == m.RepairAckId(3)


# -- live repair -------------------------------------------------------------------------------------
def test_interop_live_repair_of_an_extent(pair: tuple[CrucibleDownstairs, CrucibleDownstairs]) -> None:
    """Live repair of extent 1 while both serve I/O, all ordered by dependencies: a write before
    (on the source only: the destination missed it), FlushClose on the source / Close on the
    destination, Repair on the destination / NoOp on the source, Reopen on both, and a write
    after that was SENT before the repair jobs but depends on the reopen."""
    source, dest = pair
    src, _ = negotiate(source, SRC_U, SRC_S, 1)
    dst, _ = negotiate(dest, DST_U, DST_S, 1)
    before, after = _pattern(3, 3), _pattern(4, 2)
    try:
        assert exchange(src, _io((SRC_U, SRC_S), 1000, EXTENT_SIZE + 10, before)) == m.WriteAck(
            SRC_U, SRC_S, 1000, None
        )
        dst.send(m.ExtentLiveNoOp(DST_U, DST_S, 1000, ()))  # stands for the write it missed
        assert dst.recv() == m.ExtentLiveAckId(DST_U, DST_S, 1000, None)
        # the write after, first: it waits for the reopen (job 1003)
        src.send(_io((SRC_U, SRC_S), 1004, EXTENT_SIZE + 11, after, (1003,)))
        dst.send(_io((DST_U, DST_S), 1004, EXTENT_SIZE + 11, after, (1003,)))
        src.send(m.ExtentLiveFlushClose(SRC_U, SRC_S, 1001, (1000,), 1, 6, 1))
        assert src.recv() == m.ExtentLiveCloseAck(SRC_U, SRC_S, 1001, (1, 6, False))
        dst.send(m.ExtentLiveClose(DST_U, DST_S, 1001, (1000,), 1))
        assert dst.recv() == m.ExtentLiveCloseAck(DST_U, DST_S, 1001, (0, 0, False))
        assert repair_get(source, "/extent/1/repair-ready").body == b"true"
        src.send(m.ExtentLiveNoOp(SRC_U, SRC_S, 1002, (1001,)))
        assert src.recv() == m.ExtentLiveAckId(SRC_U, SRC_S, 1002, None)
        dst.send(m.ExtentLiveRepair(DST_U, DST_S, 1002, (1001,), 1, 0, source.repair_addr))
        assert dst.recv() == m.ExtentLiveRepairAckId(DST_U, DST_S, 1002, None)
        for peer, (u, s) in ((src, (SRC_U, SRC_S)), (dst, (DST_U, DST_S))):
            peer.send(m.ExtentLiveReopen(u, s, 1003, (1002,), 1))
            assert peer.recv() == m.ExtentLiveAckId(u, s, 1003, None)
            assert peer.recv() == m.WriteAck(u, s, 1004, None)  # released by the reopen
            peer.send(m.ReadRequest(u, s, 1005, (1004,), EXTENT_SIZE, EXTENT_SIZE))
            read = peer.recv()
            assert isinstance(read, m.ReadResponse)
            assert read.data[10 * BLOCK_SIZE : 13 * BLOCK_SIZE] == before[:BLOCK_SIZE] + after
            peer.send(m.Flush(u, s, 1006, (1005,), 7, 1))
            assert peer.recv() == m.FlushAck(u, s, 1006, None)
    finally:
        src.close()
        dst.close()
    src_versions, src_read = region_snapshot(source, 2, SRC_U, SRC_S, ALL_BLOCKS)
    dst_versions, dst_read = region_snapshot(dest, 2, DST_U, DST_S, ALL_BLOCKS)
    assert src_versions == dst_versions
    assert (src_versions.gen_numbers[1], src_versions.flush_numbers[1]) == (1, 7)
    assert (src_read.data, src_read.header.blocks) == (dst_read.data, dst_read.header.blocks)


def test_interop_failed_live_repair_reports_and_closes(downstairs: CrucibleDownstairs) -> None:
    """ExtentLiveRepair from an unreachable source: ErrorReport(RepairRequestError), then the
    downstairs ends the connection (the upstairs must start over); the process serves on."""
    with negotiated(downstairs) as peer:
        peer.send(m.ExtentLiveClose(U, S, 1000, (), 2))
        assert peer.recv() == m.ExtentLiveCloseAck(U, S, 1000, (0, 0, False))
        peer.send(m.ExtentLiveRepair(U, S, 1001, (1000,), 2, 0, UNREACHABLE))
        report = peer.recv()
        assert isinstance(report, m.ErrorReport) and report.job_id == 1001
        assert report.error.kind == wire.ErrorKind.RepairRequestError
        peer.expect_closed()
    again, _ = negotiate(downstairs, uuid.UUID(int=7), uuid.UUID(int=8), 2)
    again.close()


@pytest.mark.parametrize("kind", [REAL, "ours"])
def test_interop_live_close_on_a_read_only_downstairs(tmp_path: Path, kind: str) -> None:
    """Read-only: ExtentLiveClose is served (it is not on the real one's list of writes) and the
    extent is then repair-ready; ExtentLiveReopen closes the connection, so the extent stays
    closed. The next upstairs' ExtentVersionsPlease then ABORTS the real one ("attempting to
    get closed extent"); ours answers with the closed extent's last versions and serves on
    (its reconciliation ExtentClose closes the connection, as the real one's would)."""
    with start_downstairs(tmp_path, kind, ("--mode", "ro")) as ds:
        with negotiated(ds, read_only=True) as peer:
            peer.send(m.ExtentLiveClose(U, S, 1000, (), 1))
            assert peer.recv() == m.ExtentLiveCloseAck(U, S, 1000, (0, 0, False))
            assert repair_get(ds, "/extent/1/repair-ready").body == b"true"
            peer.send(m.ExtentLiveReopen(U, S, 1001, (1000,), 1))
            peer.expect_closed()
        if kind == "real":
            with pytest.raises(AssertionError, match="closed the connection"):
                negotiate(ds, uuid.UUID(int=7), uuid.UUID(int=8), 1, read_only=True)
            assert ds.proc is not None and ds.proc.wait(timeout=REPLY_TIMEOUT_S) != 0
            return
        peer, versions = negotiate(ds, uuid.UUID(int=7), uuid.UUID(int=8), 1, read_only=True)
        try:
            assert versions == m.ExtentVersions(
                (0,) * EXTENT_COUNT, (0,) * EXTENT_COUNT, (False,) * EXTENT_COUNT
            )
            peer.send(m.ExtentClose(1, 2))
            peer.expect_closed()
        finally:
            peer.close()


# -- I/O and repair jobs on an extent in the wrong state -------------------------------------------
@needs_binary
def test_real_downstairs_aborts_on_io_to_a_closed_extent(tmp_path: Path) -> None:
    """Pinned: a read of a closed extent panics ("attempting to get closed extent") and the
    process aborts. Ours answers with IoError (below)."""
    with start_downstairs(tmp_path, "real") as ds:
        with negotiated(ds) as peer:
            peer.send(m.ExtentLiveClose(U, S, 1000, (), 1))
            assert peer.recv() == m.ExtentLiveCloseAck(U, S, 1000, (0, 0, False))
            peer.send(m.ReadRequest(U, S, 1001, (1000,), EXTENT_SIZE, 1))
            peer.expect_closed()
        assert ds.proc is not None and ds.proc.wait(timeout=REPLY_TIMEOUT_S) != 0
        assert "attempting to get closed extent 1" in ds.log_path.read_text(errors="replace")


@needs_binary
def test_real_downstairs_aborts_on_a_flush_while_a_dirty_extent_is_closed(tmp_path: Path) -> None:
    """Pinned: the closed extent is still a flush candidate ("can't flush closed extent"); the
    process aborts. Ours skips it and flushes it after the reopen (below)."""
    with start_downstairs(tmp_path, "real") as ds:
        with negotiated(ds) as peer:
            assert exchange(peer, write(1000, EXTENT_SIZE, _pattern(1, 1))) == m.WriteAck(U, S, 1000, None)
            peer.send(m.ExtentLiveClose(U, S, 1001, (1000,), 1))
            assert peer.recv() == m.ExtentLiveCloseAck(U, S, 1001, (0, 0, True))
            peer.send(m.Flush(U, S, 1002, (1001,), 3, 1))
            peer.expect_closed()
        assert ds.proc is not None and ds.proc.wait(timeout=REPLY_TIMEOUT_S) != 0
        assert "can't flush closed extent" in ds.log_path.read_text(errors="replace")


def test_ours_answers_io_to_a_closed_extent_with_an_error(ours: CrucibleDownstairs) -> None:
    data = _pattern(5, 2)
    with negotiated(ours) as peer:
        assert exchange(peer, write(1000, EXTENT_SIZE - 1, data)) == m.WriteAck(U, S, 1000, None)
        peer.send(m.ExtentLiveClose(U, S, 1001, (1000,), 1))
        assert peer.recv() == m.ExtentLiveCloseAck(U, S, 1001, (0, 0, True))
        peer.send(m.ReadRequest(U, S, 1002, (1001,), EXTENT_SIZE - 1, 2))  # spans extents 0 and 1
        read = peer.recv()
        assert isinstance(read, m.ReadResponse) and isinstance(read.header.blocks, wire.CrucibleError)
        assert read.header.blocks.kind == wire.ErrorKind.IoError
        reply = exchange(peer, write(1003, EXTENT_SIZE, data[:BLOCK_SIZE], (1001,)))
        assert isinstance(reply, m.WriteAck) and isinstance(reply.result, wire.CrucibleError)
        # a flush skips the closed (dirty) extent; after the reopen it is flushed
        assert exchange(peer, m.Flush(U, S, 1004, (1001,), 3, 1)) == m.FlushAck(U, S, 1004, None)
        peer.send(m.ExtentLiveReopen(U, S, 1005, (1004,), 1))
        assert peer.recv() == m.ExtentLiveAckId(U, S, 1005, None)
        peer.send(m.ReadRequest(U, S, 1006, (1005,), EXTENT_SIZE - 1, 2))
        read = peer.recv()
        assert isinstance(read, m.ReadResponse) and read.data == data
        assert exchange(peer, m.Flush(U, S, 1007, (1006,), 4, 1)) == m.FlushAck(U, S, 1007, None)
    versions, _ = region_snapshot(ours, 2, DST_U, DST_S, 1)
    assert versions.flush_numbers[:2] == (3, 4) and versions.dirty_bits[:2] == (False, False)


WRONG_STATE = [
    pytest.param([m.ExtentClose(1, 0), m.ExtentClose(2, 0)], wire.ErrorKind.GenericError, id="close-twice"),
    pytest.param([m.ExtentReopen(1, 0)], wire.ErrorKind.GenericError, id="reopen-open"),
    pytest.param([m.ExtentRepair(1, 0, 0, UNREACHABLE, (1,))], wire.ErrorKind.GenericError, id="repair-open"),
    pytest.param(
        [m.ExtentClose(1, 0), m.ExtentFlush(2, 0, 0, 1, 1)],
        wire.ErrorKind.GenericError,
        id="flush-closed",
    ),
    pytest.param([m.ExtentClose(1, EXTENT_COUNT)], wire.ErrorKind.InvalidExtent, id="close-past-the-end"),
    pytest.param(
        [m.ExtentFlush(1, 0xFFFFFFFF, 0, 1, 1)], wire.ErrorKind.InvalidExtent, id="flush-past-the-end"
    ),
    pytest.param([m.ExtentReopen(1, EXTENT_COUNT)], wire.ErrorKind.InvalidExtent, id="reopen-past-the-end"),
]


@pytest.mark.parametrize(("steps", "kind"), WRONG_STATE)
def test_ours_answers_reconciliation_in_the_wrong_state_with_extent_error(
    ours: CrucibleDownstairs, steps: list[wire.Message], kind: wire.ErrorKind
) -> None:
    """The real one panics (an assert or an index out of range) and aborts on each of these."""
    with negotiated(ours) as peer:
        for msg in steps[:-1]:
            assert isinstance(exchange(peer, msg), m.RepairAckId)
        last = steps[-1]
        reply = exchange(peer, last)
        assert isinstance(reply, m.ExtentError), reply
        assert (reply.repair_id, reply.extent_id) == (last.repair_id, last.extent_id)  # type: ignore[union-attr]
        assert reply.error.kind == kind
        peer.send(m.Ruok())
        assert peer.recv() == m.Imok()


@needs_binary
@pytest.mark.parametrize("steps", [p.values[0] for p in WRONG_STATE], ids=[str(p.id) for p in WRONG_STATE])
def test_real_downstairs_aborts_on_reconciliation_in_the_wrong_state(
    tmp_path: Path, steps: list[wire.Message]
) -> None:
    """Pinned: each case ours answers with ExtentError (above) panics the real one (an assert
    or an index out of range) and the process aborts."""
    with start_downstairs(tmp_path, "real") as ds:
        with negotiated(ds) as peer:
            for msg in steps[:-1]:
                assert isinstance(exchange(peer, msg), m.RepairAckId)
            peer.send(steps[-1])
            peer.expect_closed()
        assert ds.proc is not None and ds.proc.wait(timeout=REPLY_TIMEOUT_S) != 0
        assert "panicked" in ds.log_path.read_text(errors="replace")


def test_ours_answers_live_repair_jobs_in_the_wrong_state_with_their_ack(ours: CrucibleDownstairs) -> None:
    with negotiated(ours) as peer:
        peer.send(m.ExtentLiveReopen(U, S, 1000, (), 0))  # open already
        reply = peer.recv()
        assert isinstance(reply, m.ExtentLiveAckId) and isinstance(reply.result, wire.CrucibleError)
        peer.send(m.ExtentLiveClose(U, S, 1001, (), EXTENT_COUNT))
        close = peer.recv()
        assert isinstance(close, m.ExtentLiveCloseAck) and close.result == wire.CrucibleError(
            wire.ErrorKind.InvalidExtent
        )
        peer.send(m.ExtentLiveNoOp(U, S, 1002, (1001,)))  # a failed job is not done: this waits
        peer.send(m.Ruok())
        assert peer.recv() == m.Imok()


# -- crash recovery of the scratch directories -------------------------------------------------------
@pytest.mark.parametrize("kind", [REAL, "ours"])
def test_interop_open_finishes_or_drops_an_interrupted_repair(tmp_path: Path, kind: str) -> None:
    """A region left mid-repair (as after a crash): extent 1 has NNN.replace holding a complete
    download (the replacement is finished on open), extent 2 a partial NNN.copy and extent 3
    an NNN.completed (both removed, the extents unchanged)."""
    donor = start_downstairs(tmp_path, "ours")
    with donor:
        _seed(donor, (SRC_U, SRC_S), 2, flush=True)
        donor.stop()
        new_extent_1 = extent_path(donor.region_dir, 1).read_bytes()
    root = Path(tempfile.mkdtemp(prefix=f"{kind}-crash-", dir=tmp_path))
    with KINDS[kind](root) as ds:
        ds.create(ORACLE_REGION)
        old = {eid: extent_path(ds.region_dir, eid).read_bytes() for eid in range(EXTENT_COUNT)}
        replace = repair_dir(ds.region_dir, 1, "replace")
        replace.mkdir()
        (replace / "001").write_bytes(new_extent_1)
        copy = repair_dir(ds.region_dir, 2, "copy")
        copy.mkdir()
        (copy / "002").write_bytes(b"partial")
        completed = repair_dir(ds.region_dir, 3, "completed")
        completed.mkdir()
        (completed / "003").write_bytes(new_extent_1)
        ds.start()
        for stage_dir in (replace, copy, completed):
            assert not stage_dir.exists()
        assert extent_path(ds.region_dir, 1).read_bytes() == new_extent_1
        for eid in (0, 2, 3):
            assert extent_path(ds.region_dir, eid).read_bytes() == old[eid]
        versions, read = region_snapshot(ds, 1, U, S, ALL_BLOCKS)
        assert (versions.gen_numbers[1], versions.flush_numbers[1], versions.dirty_bits[1]) == (1, 5, True)
        assert read.data[(EXTENT_SIZE + 3) * BLOCK_SIZE : (EXTENT_SIZE + 4) * BLOCK_SIZE] == _pattern(2, 1)


# -- hostile requests to our repair server -----------------------------------------------------------
TRAVERSALS = [
    "/newextent/..%2F..%2Fregion.json/data",
    "/newextent/0/..%2F..%2Fregion.json",
    "/newextent/0/data%00",
    "/newextent/0/data%2F..%2F..%2Fregion.json",
    "/newextent/%2e%2e/data",
    "/extent/0/files/../../region.json",
    "/../../region.json",
    "/newextent/0/%",
    "/newextent/0/%zz",
    "/newextent/0/%ff",
    "/extent/1e3/files",
    "/extent/0x1/files",
    "/extent/%20/files",
    "/newextent/" + "9" * 5000 + "/data",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_ours_refuses_path_tricks(ours: CrucibleDownstairs, path: str) -> None:
    answer = repair_get(ours, path)
    assert answer.status in (400, 404), answer
    assert b"extent_count" not in answer.body and len(answer.body) < 8192
    assert repair_get(ours, "/work").status == 200


def _raw_exchange(ds: CrucibleDownstairs, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection to the repair port; everything received until close."""
    with socket.create_connection(("127.0.0.1", ds.port + 4000), timeout=REPLY_TIMEOUT_S) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"\x00\x01\x02\xff\r\n\r\n", id="binary"),
        pytest.param(b"GET /work\r\n\r\n", id="no-version"),
        pytest.param(b"GET /work HTTP/2.0\r\n\r\n", id="http2"),
        pytest.param(b"GET  /work HTTP/1.1\r\n\r\n", id="two-spaces"),
        pytest.param(b"GET work HTTP/1.1\r\n\r\n", id="relative"),
        pytest.param(b"GET /work HTTP/1.1\r\nno-colon\r\n\r\n", id="bad-header"),
        pytest.param(b"GET /work HTTP/1.1\r\n" + b"x: y\r\n" * 100 + b"\r\n", id="100-headers"),
        pytest.param(
            b"GET /work HTTP/1.1\r\nx: " + b"y" * (MAX_REQUEST_HEAD + 10) + b"\r\n\r\n", id="huge-header"
        ),
        pytest.param(b"GET /" + b"a" * (MAX_REQUEST_HEAD + 10) + b" HTTP/1.1\r\n\r\n", id="huge-path"),
    ],
)
def test_ours_answers_malformed_requests_with_400(ours: CrucibleDownstairs, request_bytes: bytes) -> None:
    reply = _raw_exchange(ours, request_bytes)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), reply[:200]
    assert repair_get(ours, "/work").status == 200


def test_ours_answers_a_post_with_a_huge_body_without_reading_it(ours: CrucibleDownstairs) -> None:
    reply = _raw_exchange(ours, b"POST /work HTTP/1.1\r\ncontent-length: 1000000000\r\n\r\n" + b"x" * 1000)
    assert reply.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")


def test_ours_drops_a_slow_client_and_serves_others(tmp_path: Path) -> None:
    """A client that never finishes its request head is closed after the deadline (here
    --handshake-timeout 0.5, which the repair server shares); others are served meanwhile."""
    with start_downstairs(tmp_path, "ours", ("--handshake-timeout", "0.5")) as ds:
        with socket.create_connection(("127.0.0.1", ds.port + 4000), timeout=REPLY_TIMEOUT_S) as slow:
            slow.sendall(b"GET /wo")
            assert repair_get(ds, "/work").status == 200
            started = time.monotonic()
            assert slow.recv(1) == b""  # closed, without an answer
            assert time.monotonic() - started < REPLY_TIMEOUT_S
        ds.wait_for_log("repair_request_timeout")


def test_ours_caps_repair_connections(ours: CrucibleDownstairs) -> None:
    idle = [
        socket.create_connection(("127.0.0.1", ours.port + 4000), timeout=REPLY_TIMEOUT_S)
        for _ in range(MAX_REPAIR_CONNECTIONS)
    ]
    try:
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while True:  # until one more is refused (the idle ones are admitted in accept order)
            with socket.create_connection(("127.0.0.1", ours.port + 4000), timeout=REPLY_TIMEOUT_S) as extra:
                if extra.recv(1) == b"":
                    break
            assert time.monotonic() < deadline
        ours.wait_for_log("connection_refused")
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while True:  # served again once the idle ones are gone
        try:
            if repair_get(ours, "/work").status == 200:
                break
        except (ConnectionError, http.client.HTTPException):
            pass
        assert time.monotonic() < deadline


# -- a source of another geometry --------------------------------------------------------------------
def test_interop_reopen_of_a_file_of_the_wrong_size(downstairs: CrucibleDownstairs) -> None:
    """An extent file that no longer has its geometry's size fails ExtentReopen with a
    GenericError (the open's error as text) and stays closed; restored, it reopens."""
    path = extent_path(downstairs.region_dir, 2)
    good = path.read_bytes()
    with negotiated(downstairs) as peer:
        assert exchange(peer, m.ExtentClose(1, 2)) == m.RepairAckId(1)
        path.write_bytes(good + bytes(512))
        reply = exchange(peer, m.ExtentReopen(2, 2))
        assert isinstance(reply, m.ExtentError) and reply.error.kind == wire.ErrorKind.GenericError
        # the texts differ: the real one reads the version tag at the file's end first
        assert "IO Error" in str(reply.error.detail) or "IoError" in str(reply.error.detail)
        assert repair_get(downstairs, "/extent/2/repair-ready").body == b"true"  # still closed
        path.write_bytes(good)
        assert exchange(peer, m.ExtentReopen(3, 2)) == m.RepairAckId(3)


@pytest.mark.parametrize("source_blocks", [EXTENT_SIZE * 2, EXTENT_SIZE // 2])
@pytest.mark.parametrize("dest_kind", [REAL, "ours"])
def test_repair_from_a_source_of_another_geometry(tmp_path: Path, dest_kind: str, source_blocks: int) -> None:
    """The downloaded file is bounded by the destination's geometry: ours refuses a file of
    another size (RepairStreamError) and keeps its extent. The real one takes any size, and
    the extent then fails to reopen (its file size is checked on open)."""
    root = Path(tempfile.mkdtemp(prefix="odd-source-", dir=tmp_path))
    with OurDownstairs(root) as source, start_downstairs(tmp_path, dest_kind) as dest:
        source.create(ORACLE_REGION, extent_size=source_blocks)
        source.start()
        src, _ = negotiate(source, SRC_U, SRC_S, 1)
        dst, _ = negotiate(dest, DST_U, DST_S, 1)
        before = extent_path(dest.region_dir, 1).read_bytes()
        try:
            assert exchange(src, m.ExtentClose(1, 1)) == m.RepairAckId(1)
            assert exchange(dst, m.ExtentClose(1, 1)) == m.RepairAckId(1)
            repaired = exchange(dst, m.ExtentRepair(2, 1, 0, source.repair_addr, (1,)))
            reopened = exchange(dst, m.ExtentReopen(3, 1))
        finally:
            src.close()
            dst.close()
        if dest_kind == "ours":
            assert isinstance(repaired, m.ExtentError)
            assert repaired.error.kind == wire.ErrorKind.RepairStreamError
            assert reopened == m.RepairAckId(3)
            assert extent_path(dest.region_dir, 1).read_bytes() == before
        else:
            assert repaired == m.RepairAckId(2)
            assert isinstance(reopened, m.ExtentError), reopened
            assert reopened.error.kind == wire.ErrorKind.GenericError  # "IO Error: ... file size"
            assert "does not match expected" in str(reopened.error.detail)
            assert len(extent_path(dest.region_dir, 1).read_bytes()) != len(before)


# -- the download does not stall the downstairs ------------------------------------------------------
class _StallingSource:
    """A repair server (a thread on 127.0.0.1) for extent 1 whose file download sends half the
    file, then waits for ``release`` before the rest: the destination is mid-download. One
    request per connection, said in every response (the real one's client pools connections)."""

    def __init__(self, payload: bytes, files: bytes = b'["001"]') -> None:
        self.payload = payload
        self.files = files
        self.release = threading.Event()
        self.midway = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                path = head.split(b" ")[1] if b" " in head else b""
                if path == b"/extent/1/files":
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                        % (len(self.files), self.files)
                    )
                elif path == b"/extent/1/repair-ready":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 4\r\n\r\ntrue")
                elif path == b"/newextent/1/data":
                    half = len(self.payload) // 2
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n"
                    )
                    conn.sendall(b"%x\r\n%s\r\n" % (half, self.payload[:half]))
                    self.midway.set()
                    self.release.wait(REPLY_TIMEOUT_S)
                    rest = self.payload[half:]
                    conn.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
                else:
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")

    def close(self) -> None:
        self.release.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
        self.sock.close()
        self.thread.join(REPLY_TIMEOUT_S)


def test_ours_keeps_serving_while_a_download_stalls(tmp_path: Path) -> None:
    """Mid-download (the source stalls after half the file, chunked as the real one sends it),
    our destination's event loop still answers its repair server; once the rest arrives the
    repair completes with the source's bytes."""
    with start_downstairs(tmp_path, "ours") as donor:
        _seed(donor, (SRC_U, SRC_S), 4, flush=True)
        payload = extent_path(donor.region_dir, 1).read_bytes()
    source = _StallingSource(payload)
    try:
        with start_downstairs(tmp_path, "ours") as dest:
            with negotiated(dest, DST_U, DST_S, 1) as peer:
                assert exchange(peer, m.ExtentClose(1, 1)) == m.RepairAckId(1)
                peer.send(m.ExtentRepair(2, 1, 0, wire.SocketAddr.parse("127.0.0.1", source.port), (1,)))
                assert source.midway.wait(REPLY_TIMEOUT_S)
                started = time.monotonic()
                assert repair_get(dest, "/extent/1/repair-ready").body == b"true"
                assert repair_get(dest, "/work").status == 200
                assert time.monotonic() - started < 2.0
                source.release.set()
                assert peer.recv() == m.RepairAckId(2)
                assert exchange(peer, m.ExtentReopen(3, 1)) == m.RepairAckId(3)
            assert extent_path(dest.region_dir, 1).read_bytes() == payload
    finally:
        source.close()


# -- encrypted regions -----------------------------------------------------------------------------
@pytest.mark.parametrize("kinds", PAIRS)
def test_interop_reconciliation_of_an_encrypted_extent(tmp_path: Path, kinds: tuple[str, str]) -> None:
    """The encryption contexts (nonce, tag) travel with the extent file."""
    made = []
    for kind in kinds:
        root = Path(tempfile.mkdtemp(prefix=f"{kind}-enc-", dir=tmp_path))
        ds = KINDS[kind](root)
        made.append(ds)
        ds.create(ORACLE_REGION, encrypted=True)
        ds.start()
    source, dest = made
    try:
        ciphertext = _pattern(6, 1)
        enc = wire.EncryptionContext(bytes(range(12)), bytes(range(16, 32)))
        ctx = wire.BlockContext(encrypted_block_hash(enc.nonce, enc.tag, ciphertext), enc)
        src, _ = negotiate(source, SRC_U, SRC_S, 1, encrypted=True)
        dst, _ = negotiate(dest, DST_U, DST_S, 1, encrypted=True)
        try:
            header = wire.WriteHeader(SRC_U, SRC_S, 1000, (), 3 * EXTENT_SIZE + 2, (ctx,))
            assert exchange(src, m.Write(header, ciphertext)) == m.WriteAck(SRC_U, SRC_S, 1000, None)
            assert exchange(src, m.ExtentFlush(0, 3, 0, 2, 1)) == m.RepairAckId(0)
            for peer in (src, dst):
                assert exchange(peer, m.ExtentClose(1, 3)) == m.RepairAckId(1)
            assert exchange(dst, m.ExtentRepair(2, 3, 0, source.repair_addr, (1,))) == m.RepairAckId(2)
            for peer in (src, dst):
                assert exchange(peer, m.ExtentReopen(3, 3)) == m.RepairAckId(3)
            dst.send(m.ReadRequest(DST_U, DST_S, 1001, (), 3 * EXTENT_SIZE + 1, 2))
            read = dst.recv()
            assert read == m.ReadResponse(
                wire.ReadResponseHeader(
                    DST_U, DST_S, 1001, (wire.ReadBlockEmpty(), wire.ReadBlockEncrypted(enc))
                ),
                bytes(BLOCK_SIZE) + ciphertext,
            )
        finally:
            src.close()
            dst.close()
    finally:
        for ds in made:
            ds.__exit__(None, None, None)


@pytest.mark.parametrize("files", [b'["001","001.db"]', b"[]", b'["002"]', b"[1]", b'{"a":1}'])
@pytest.mark.parametrize("kind", [REAL, "ours"])
def test_interop_a_source_listing_other_files(tmp_path: Path, kind: str, files: bytes) -> None:
    """Anything but exactly ["001"] from /extent/1/files is RepairFilesInvalid (a JSON body that
    is not a list of strings: RepairRequestError, the real one's client fails to decode it)."""
    source = _StallingSource(b"", files)
    source.release.set()
    try:
        with start_downstairs(tmp_path, kind) as dest, negotiated(dest) as peer:
            assert exchange(peer, m.ExtentClose(1, 1)) == m.RepairAckId(1)
            reply = exchange(
                peer, m.ExtentRepair(2, 1, 0, wire.SocketAddr.parse("127.0.0.1", source.port), (1,))
            )
            assert isinstance(reply, m.ExtentError), reply
            listed = files.startswith(b'["') or files == b"[]"  # a list of strings
            kinds = wire.ErrorKind
            assert reply.error.kind == (kinds.RepairFilesInvalid if listed else kinds.RepairRequestError)
    finally:
        source.close()


@pytest.mark.parametrize("kind", [REAL, "ours"])
def test_interop_killed_mid_download_restarts_with_the_old_extent(tmp_path: Path, kind: str) -> None:
    """kill -9 while NNN.copy holds half a download: the restarted downstairs drops it and
    serves the extent as it was (then a new repair succeeds)."""
    with start_downstairs(tmp_path, "ours") as donor:
        _seed(donor, (SRC_U, SRC_S), 8, flush=True)
        payload = extent_path(donor.region_dir, 1).read_bytes()
    source = _StallingSource(payload)
    try:
        with start_downstairs(tmp_path, kind) as dest:
            before = extent_path(dest.region_dir, 1).read_bytes()
            with negotiated(dest) as peer:
                assert exchange(peer, m.ExtentClose(1, 1)) == m.RepairAckId(1)
                peer.send(m.ExtentRepair(2, 1, 0, wire.SocketAddr.parse("127.0.0.1", source.port), (1,)))
                assert source.midway.wait(REPLY_TIMEOUT_S)
                copy = repair_dir(dest.region_dir, 1, "copy")
                deadline = time.monotonic() + REPLY_TIMEOUT_S
                while not (copy / "001").is_file() or (copy / "001").stat().st_size == 0:
                    assert time.monotonic() < deadline, "no partial download appeared"
                    time.sleep(0.01)  # poll interval of a deadline-bounded wait
                dest.stop()  # kill -9
            source.release.set()
            assert copy.is_dir()
            dest.start()
            assert not copy.exists()
            assert extent_path(dest.region_dir, 1).read_bytes() == before
            _, read = region_snapshot(dest, 2, U, S, ALL_BLOCKS)
            assert _extent_blocks(read, 1)[0] == bytes(EXTENT_SIZE * BLOCK_SIZE)
    finally:
        source.close()
