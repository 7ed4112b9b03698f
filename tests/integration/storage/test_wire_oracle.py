"""Our Crucible codec (sut.storage.wire) against a REAL crucible-downstairs: the oracle.

Every test starts the real binary (built from oxidecomputer/crucible at the commit that
crucible-wire.md describes) on loopback, talks to it over a raw socket with our codec only, and
checks its answers, byte for byte where they are deterministic. The frames it sent are pinned
as golden bytes in tests/unit/storage/test_wire.py (``ORACLE_FRAMES``), so the unit tests
check them without the binary and these tests notice if the binary ever disagrees.

The binary is looked up at ``$PHD_DOWNSTAIRS_BINARY``, else ``<repo>/../shared/crucible/
crucible-downstairs`` (``crucible_ds.py``, shared with the conformance tests of our own
downstairs, test_downstairs_conformance.py); without it the tests skip. Never send it a
Write with a wrong block hash: it never answers and logs in a tight loop (crucible-wire.md).
"""

from __future__ import annotations

import dataclasses
import signal
import struct
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sut.storage import wire
from sut.storage.wire import messages as m
from sut.storage.wire.blockhash import block_hash, unencrypted_contexts, verify_unencrypted
from tests.integration.storage.crucible_ds import (
    BLOCK_SIZE,
    EXTENT_COUNT,
    EXTENT_SIZE,
    PRE_NEGOTIATION_CASES,
    RealDownstairs,
    hello,
    needs_binary,
    negotiate,
    negotiated,
    refit,
)
from tests.unit.storage.test_wire import (
    ORACLE_FRAMES,
    ORACLE_REGION,
    ORACLE_SESSION,
    ORACLE_UPSTAIRS,
    SENT_FRAMES,
    oracle_pattern,
)

pytestmark = [pytest.mark.integration]


@pytest.fixture
def real_downstairs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RealDownstairs]:
    """A fresh region and its running real downstairs; ``run`` flags by indirect parametrize."""
    root = Path(tempfile.mkdtemp(prefix="real-ds-", dir=tmp_path))
    with RealDownstairs(root, flags=tuple(getattr(request, "param", ()))) as ds:
        ds.create(ORACLE_REGION)
        ds.start()
        yield ds


def _repair_addr(ds: RealDownstairs) -> wire.SocketAddr:
    return ds.repair_addr


def _answers_as_ours(real_downstairs: RealDownstairs, msg: m.HereIAm) -> bytes:
    """Send ``msg`` to a fresh connection: the real reply must be exactly what
    ``answer_here_i_am`` (ours, for a read-write plain region) gives, and a refusal must close
    the connection. Returns the reply frame."""
    ours = wire.answer_here_i_am(
        msg, repair_addr=_repair_addr(real_downstairs), read_only=False, encrypted=False
    )
    peer = real_downstairs.connect()
    try:
        peer.send(msg)
        frame = peer.recv_frame()
        assert frame is not None
        assert wire.decode(frame) == ours
        assert frame == wire.encode(ours)
        if isinstance(ours, m.VersionMismatch):
            assert frame == ORACLE_FRAMES["VersionMismatch"]
        if not isinstance(ours, m.YesItsMe):
            peer.expect_closed()
        return frame
    finally:
        peer.close()



# -- negotiation -----------------------------------------------------------------------------
@needs_binary
def test_real_downstairs_answers_here_i_am_with_yes_its_me(real_downstairs: RealDownstairs) -> None:
    peer = real_downstairs.connect()
    try:
        sent = peer.send(hello())
        assert sent == SENT_FRAMES["HereIAm"]  # the frame crucible-wire.md was checked with
        frame = peer.recv_frame()
        assert frame is not None
        reply = wire.decode(frame)
        assert reply == m.YesItsMe(13, _repair_addr(real_downstairs))
        assert frame == wire.encode(reply)
        # the captured golden frame differs from this one only in the repair port
        assert frame[:-2] == ORACLE_FRAMES["YesItsMe"][:-2]
    finally:
        peer.close()


@pytest.mark.parametrize(
    ("version", "alternates"),
    [
        (12, ()),  # older, no alternates
        (14, ()),  # newer, no alternates
        (12, (11, 10)),  # alternates without 13
        (14, (13,)),  # newer, but 13 among the alternates: accepted
        (7, (12, 13, 14)),
        (13, (99,)),
    ],
)
@needs_binary
def test_real_downstairs_version_negotiation_matches_ours(
    real_downstairs: RealDownstairs, version: int, alternates: tuple[int, ...]
) -> None:
    frame = _answers_as_ours(real_downstairs, hello(version=version, alternate_versions=alternates))
    if frame == ORACLE_FRAMES["VersionMismatch"]:
        return  # closed after answering, checked there
    assert wire.decode(frame) == m.YesItsMe(13, _repair_addr(real_downstairs))


@pytest.mark.parametrize(("read_only", "encrypted"), [(True, False), (False, True), (True, True)])
@needs_binary
def test_real_downstairs_mode_mismatch_matches_ours(
    real_downstairs: RealDownstairs, read_only: bool, encrypted: bool
) -> None:
    frame = _answers_as_ours(real_downstairs, hello(read_only=read_only, encrypted=encrypted))
    assert isinstance(wire.decode(frame), m.ReadOnlyMismatch | m.EncryptedMismatch)


@needs_binary
def test_real_downstairs_interop_negotiation_and_region_info(real_downstairs: RealDownstairs) -> None:
    peer = real_downstairs.connect()
    try:
        peer.send(m.Ruok())
        assert peer.recv_frame() == ORACLE_FRAMES["Imok"]
        peer.send(hello())
        assert isinstance(peer.recv(), m.YesItsMe)
        peer.send(m.PromoteToActive(ORACLE_UPSTAIRS, ORACLE_SESSION, 1))
        frame = peer.recv_frame()
        assert frame == ORACLE_FRAMES["YouAreNowActive"]
        assert wire.decode(frame) == m.YouAreNowActive(ORACLE_UPSTAIRS, ORACLE_SESSION, 1)
        peer.send(m.RegionInfoPlease())
        frame = peer.recv_frame()
        assert frame == ORACLE_FRAMES["RegionInfo"]
        info = wire.decode(frame)
        assert isinstance(info, m.RegionInfo)
        region = info.region_def
        assert region.block_size == BLOCK_SIZE
        assert region.extent_size == wire.ExtentSize(EXTENT_SIZE, BLOCK_SIZE.bit_length() - 1)
        assert region.extent_count == EXTENT_COUNT
        assert region.uuid == ORACLE_REGION
        assert region.encrypted is False
        peer.send(m.ExtentVersionsPlease())
        frame = peer.recv_frame()
        assert frame == ORACLE_FRAMES["ExtentVersions"]
        assert wire.decode(frame) == m.ExtentVersions(
            (0,) * EXTENT_COUNT, (0,) * EXTENT_COUNT, (False,) * EXTENT_COUNT
        )
    finally:
        peer.close()


# -- I/O -------------------------------------------------------------------------------------
@needs_binary
def test_real_downstairs_interop_write_flush_read(real_downstairs: RealDownstairs) -> None:
    data = oracle_pattern(3)
    with negotiated(real_downstairs) as peer:
        write = m.Write(
            wire.WriteHeader(
                ORACLE_UPSTAIRS, ORACLE_SESSION, 1000, (), 5, unencrypted_contexts(data, BLOCK_SIZE)
            ),
            data,
        )
        assert peer.send(write) == SENT_FRAMES["Write"]
        frame = peer.recv_frame()
        assert frame == ORACLE_FRAMES["WriteAck"]
        assert wire.decode(frame) == m.WriteAck(ORACLE_UPSTAIRS, ORACLE_SESSION, 1000, None)

        peer.send(m.Flush(ORACLE_UPSTAIRS, ORACLE_SESSION, 1001, (1000,), 1, 1))
        frame = peer.recv_frame()
        assert frame == ORACLE_FRAMES["FlushAck"]
        assert wire.decode(frame) == m.FlushAck(ORACLE_UPSTAIRS, ORACLE_SESSION, 1001, None)

        peer.send(m.ReadRequest(ORACLE_UPSTAIRS, ORACLE_SESSION, 1002, (1001,), 5, 3))
        frame = peer.recv_frame()
        assert frame == ORACLE_FRAMES["ReadResponse"]
        read = wire.decode(frame)
        assert isinstance(read, m.ReadResponse)
        assert read.header.job_id == 1002
        assert read.data == data
        assert read.header.blocks == tuple(
            wire.ReadBlockUnencrypted(block_hash(data[i : i + BLOCK_SIZE]))
            for i in range(0, len(data), BLOCK_SIZE)
        )
        assert not isinstance(read.header.blocks, wire.CrucibleError)
        assert verify_unencrypted(read.header.blocks, read.data, BLOCK_SIZE) == []

        # never-written blocks (one of them in another extent): Empty contexts, zeros
        peer.send(m.ReadRequest(ORACLE_UPSTAIRS, ORACLE_SESSION, 1003, (1002,), EXTENT_SIZE - 1, 2))
        frame = peer.recv_frame()
        assert frame == ORACLE_FRAMES["ReadResponseEmpty"]
        empty = wire.decode(frame)
        assert isinstance(empty, m.ReadResponse)
        assert empty.header.blocks == (wire.ReadBlockEmpty(), wire.ReadBlockEmpty())
        assert empty.data == bytes(2 * BLOCK_SIZE)

        # the flush stamped extent 0 (the one written) with gen 1, flush 1
        peer.send(m.Barrier(ORACLE_UPSTAIRS, ORACLE_SESSION, 1004, (1003,)))
        frame = peer.recv_frame()
        assert frame == ORACLE_FRAMES["BarrierAck"]
        assert wire.decode(frame) == m.BarrierAck(ORACLE_UPSTAIRS, ORACLE_SESSION, 1004, None)


@needs_binary
def test_real_downstairs_interop_write_unwritten_skips_written_blocks(
    real_downstairs: RealDownstairs,
) -> None:
    first, second = oracle_pattern(2), bytes(range(256)) * 4
    with negotiated(real_downstairs) as peer:
        peer.send(
            m.Write(
                wire.WriteHeader(
                    ORACLE_UPSTAIRS,
                    ORACLE_SESSION,
                    1000,
                    (),
                    10,
                    unencrypted_contexts(first[:BLOCK_SIZE], BLOCK_SIZE),
                ),
                first[:BLOCK_SIZE],
            )
        )
        assert wire.decode(peer.recv_frame() or b"") == m.WriteAck(
            ORACLE_UPSTAIRS, ORACLE_SESSION, 1000, None
        )
        # blocks 10 (written above: kept) and 11 (never written: takes the new data)
        header = wire.WriteHeader(
            ORACLE_UPSTAIRS, ORACLE_SESSION, 1001, (1000,), 10, unencrypted_contexts(second, BLOCK_SIZE)
        )
        peer.send(m.WriteUnwritten(header, second))
        frame = peer.recv_frame()
        assert frame is not None
        assert wire.decode(frame) == m.WriteUnwrittenAck(ORACLE_UPSTAIRS, ORACLE_SESSION, 1001, None)
        peer.send(m.ReadRequest(ORACLE_UPSTAIRS, ORACLE_SESSION, 1002, (1001,), 10, 2))
        read = peer.recv()
        assert isinstance(read, m.ReadResponse)
        assert read.data == first[:BLOCK_SIZE] + second[BLOCK_SIZE:]


@needs_binary
def test_real_downstairs_interop_io_before_negotiation_is_ignored(real_downstairs: RealDownstairs) -> None:
    """I/O before the negotiation: the real downstairs logs "Ignored message received during
    negotiation", keeps the connection, and negotiates normally afterwards."""
    peer = real_downstairs.connect()
    try:
        peer.send(m.ReadRequest(ORACLE_UPSTAIRS, ORACLE_SESSION, 1, (), 0, 1))
        peer.send(hello())
        assert peer.recv() == m.YesItsMe(13, _repair_addr(real_downstairs))
        real_downstairs.wait_for_log("Ignored message received during negotiation")
    finally:
        peer.close()


# -- malformed frames: what the real downstairs does, and what our decoder says ----------------
@pytest.mark.parametrize("case", sorted(PRE_NEGOTIATION_CASES))
@needs_binary
def test_real_downstairs_on_malformed_frames_before_negotiation(
    real_downstairs: RealDownstairs, case: str
) -> None:
    """Our decoder refuses every one of these; the real downstairs' reaction is pinned (its
    abort on a short length prefix is a bug of that build, recorded here, not a model)."""
    frame, reaction = PRE_NEGOTIATION_CASES[case]
    with pytest.raises(wire.BincodeError):
        wire.decode(frame)
    peer = real_downstairs.connect()
    try:
        peer.sock.sendall(frame)
        reply = peer.recv_frame()
        assert real_downstairs.proc is not None
        if reaction == "answers":
            assert reply is not None and isinstance(wire.decode(reply), m.YesItsMe)
        else:
            assert reply is None  # closed without a word
        exit_code = _exit_code(real_downstairs.proc)
        if reaction == "dies":
            assert exit_code == -signal.SIGABRT, f"exit {exit_code}; log:\n{real_downstairs.log_tail()}"
        else:
            assert exit_code is None, f"exit {exit_code}; log:\n{real_downstairs.log_tail()}"
    finally:
        peer.close()


def _exit_code(proc: subprocess.Popen[bytes], timeout_s: float = 2.0) -> int | None:
    """The exit code if the process ends within ``timeout_s`` (an abort is not instant)."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


@needs_binary
def test_real_downstairs_on_a_write_whose_data_count_is_wrong(real_downstairs: RealDownstairs) -> None:
    """Bytes between the data count and the data: the real one skips them (it takes the LAST
    count bytes of the frame as the data); a count beyond the frame aborts it. We refuse both."""
    data = oracle_pattern(2)
    contexts = unencrypted_contexts(data, BLOCK_SIZE)
    head, _ = wire.encode_parts(
        m.Write(wire.WriteHeader(ORACLE_UPSTAIRS, ORACLE_SESSION, 1000, (), 5, contexts), data)
    )
    junk = refit(head + b"JUNK" + data)
    with pytest.raises(wire.BincodeError, match="data count"):
        wire.decode(junk)
    with negotiated(real_downstairs) as peer:
        peer.sock.sendall(junk)
        assert peer.recv() == m.WriteAck(ORACLE_UPSTAIRS, ORACLE_SESSION, 1000, None)
        peer.send(m.ReadRequest(ORACLE_UPSTAIRS, ORACLE_SESSION, 1001, (1000,), 5, 2))
        read = peer.recv()
        assert isinstance(read, m.ReadResponse) and read.data == data

        head, _ = wire.encode_parts(
            m.Write(wire.WriteHeader(ORACLE_UPSTAIRS, ORACLE_SESSION, 1002, (1001,), 5, contexts), data)
        )
        over = bytearray(head + data)
        struct.pack_into("<Q", over, len(head) - 8, 1 << 20)
        with pytest.raises(wire.BincodeError, match="data count"):
            wire.decode(bytes(over))
        peer.sock.sendall(over)
        assert peer.recv_frame() is None
        assert real_downstairs.proc is not None
        assert _exit_code(real_downstairs.proc) == -signal.SIGABRT


# -- more of the protocol -----------------------------------------------------------------------
NEW_UPSTAIRS = uuid.UUID(int=0xABC)
NEW_SESSION = uuid.UUID(int=0xDEF)
U, S = ORACLE_UPSTAIRS, ORACLE_SESSION


@needs_binary
def test_real_downstairs_interop_uuid_mismatch_and_takeover(real_downstairs: RealDownstairs) -> None:
    with negotiated(real_downstairs) as old:
        old.send(m.ReadRequest(uuid.UUID(int=5), S, 1000, (), 0, 1))
        frame = old.recv_frame()
        assert frame == ORACLE_FRAMES["UuidMismatch"]
        assert wire.decode(frame) == m.UuidMismatch(U)
        # a higher generation takes over: the old upstairs is told, then dropped
        new, _ = negotiate(real_downstairs, NEW_UPSTAIRS, NEW_SESSION, 2)
        try:
            frame = old.recv_frame()
            assert frame == ORACLE_FRAMES["YouAreNoLongerActive"]
            assert wire.decode(frame) == m.YouAreNoLongerActive(NEW_UPSTAIRS, NEW_SESSION, 2)
            old.expect_closed()
            # a lower generation is refused by closing, without a message
            low = real_downstairs.connect()
            try:
                low.send(hello(generation=1))
                assert isinstance(low.recv(), m.YesItsMe)
                low.send(m.PromoteToActive(U, S, 1))
                low.expect_closed()
            finally:
                low.close()
        finally:
            new.close()


@needs_binary
def test_real_downstairs_interop_flush_options_live_noop_and_last_flush(
    real_downstairs: RealDownstairs,
) -> None:
    data = oracle_pattern(1)
    with negotiated(real_downstairs) as peer:
        # block 70 is in extent 1: a flush limited to extent 0 leaves it dirty
        peer.send(m.Write(wire.WriteHeader(U, S, 1001, (), 70, unencrypted_contexts(data, BLOCK_SIZE)), data))
        assert peer.recv() == m.WriteAck(U, S, 1001, None)
        peer.send(m.Flush(U, S, 1002, (1001,), 7, 1, None, 0))
        assert peer.recv() == m.FlushAck(U, S, 1002, None)
        peer.send(m.ExtentLiveNoOp(U, S, 1003, (1002,)))
        frame = peer.recv_frame()
        assert frame == ORACLE_FRAMES["ExtentLiveAckId"]
        assert wire.decode(frame) == m.ExtentLiveAckId(U, S, 1003, None)
        peer.send(m.Flush(U, S, 1004, (1003,), 8, 1, wire.SnapshotDetails("snap1"), None))
        assert peer.recv() == m.FlushAck(U, S, 1004, None)
        peer.send(m.ReadRequest(U, S, 1005, (1004,), 0, 0))
        frame = peer.recv_frame()
        assert frame == ORACLE_FRAMES["ReadResponseNone"]
        assert wire.decode(frame) == m.ReadResponse(wire.ReadResponseHeader(U, S, 1005, ()), b"")
    new, versions = negotiate(real_downstairs, NEW_UPSTAIRS, NEW_SESSION, 2)
    new.close()
    assert new.received[-1] == ORACLE_FRAMES["ExtentVersionsAfterFlush"]
    assert versions == m.ExtentVersions((0, 1, 0, 0), (0, 8, 0, 0), (False,) * 4)
    # an upstairs replaying to a returning downstairs: LastFlush has no reply (version 13
    # removed LastFlushAck), I/O is accepted right after it
    back = real_downstairs.connect()
    try:
        back.send(hello(generation=3))
        assert isinstance(back.recv(), m.YesItsMe)
        back.send(m.PromoteToActive(U, S, 3))
        assert back.recv() == m.YouAreNowActive(U, S, 3)
        back.send(m.RegionInfoPlease())
        assert isinstance(back.recv(), m.RegionInfo)
        back.send(m.LastFlush(8))
        back.send(m.ReadRequest(U, S, 2000, (), 70, 1))
        read = back.recv()  # the first frame after LastFlush is the read's answer
        assert isinstance(read, m.ReadResponse) and read.data == data
    finally:
        back.close()


@pytest.mark.parametrize("real_downstairs", [("--write-errors",)], indirect=True)
@needs_binary
def test_real_downstairs_interop_error_report(real_downstairs: RealDownstairs) -> None:
    """With --write-errors a quarter of the writes fail: the downstairs sends ErrorReport (a
    real CrucibleError on the wire), retries the job, and acks it Ok once it succeeds."""
    data = oracle_pattern(1)
    with negotiated(real_downstairs) as peer:
        reports: list[bytes] = []
        for job in range(1000, 1060):  # P(no failure in 60 writes) = 0.75**60 ~ 3e-8
            peer.send(
                m.Write(wire.WriteHeader(U, S, job, (), 3, unencrypted_contexts(data, BLOCK_SIZE)), data)
            )
            while isinstance(reply := peer.recv(), m.ErrorReport):
                assert reply == m.ErrorReport(
                    U, S, job, wire.CrucibleError(wire.ErrorKind.GenericError, "test error")
                )
                reports.append(peer.received[-1])
            assert reply == m.WriteAck(U, S, job, None)
            if reports:
                break
        assert reports, "no write failed in 60"
        first = wire.decode(reports[0])
        assert isinstance(first, m.ErrorReport)
        golden = wire.decode(ORACLE_FRAMES["ErrorReport"])
        assert isinstance(golden, m.ErrorReport)
        # the golden frame (job 1001) with this report's job id is this report's frame
        assert wire.encode(dataclasses.replace(golden, job_id=first.job_id)) == reports[0]


@pytest.mark.parametrize("op", ["read", "write"])
@needs_binary
def test_real_downstairs_aborts_on_io_past_the_region_end(real_downstairs: RealDownstairs, op: str) -> None:
    """Pinned: I/O beyond the region makes the real downstairs panic and abort (our downstairs
    must answer such a job with an error instead)."""
    data = oracle_pattern(1)
    end = EXTENT_SIZE * EXTENT_COUNT
    with negotiated(real_downstairs) as peer:
        if op == "read":
            peer.send(m.ReadRequest(U, S, 1000, (), end - 6, 10))
        else:
            peer.send(
                m.Write(wire.WriteHeader(U, S, 1000, (), end, unencrypted_contexts(data, BLOCK_SIZE)), data)
            )
        assert peer.recv_frame() is None
        assert real_downstairs.proc is not None
        assert _exit_code(real_downstairs.proc) == -signal.SIGABRT
