"""Our Crucible-protocol downstairs (sut.storage.downstairs) against the REAL one: same replies.

Every ``test_interop_*`` runs twice, once against the real ``crucible-downstairs`` (skipped
without the binary) and once against ``python -m sut.storage.downstairs``, both created by
their own ``create`` command, and asserts the same answers - byte for byte where the oracle
captured golden frames (tests/unit/storage/test_wire.py ``ORACLE_FRAMES``). The ``test_ours_*``
tests pin where ours deliberately differs: where the real one aborts or spins, ours answers
with an error and serves on.
"""

from __future__ import annotations

import socket
import struct
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sut.storage import wire
from sut.storage.extent_raw import RawRegion
from sut.storage.wire import messages as m
from sut.storage.wire.blockhash import (
    block_hash,
    encrypted_block_hash,
    unencrypted_contexts,
    verify_unencrypted,
)
from tests.integration.storage.crucible_ds import (
    BLOCK_SIZE,
    EXTENT_COUNT,
    EXTENT_SIZE,
    KINDS,
    PRE_NEGOTIATION_CASES,
    CrucibleDownstairs,
    Peer,
    hello,
    needs_binary,
    negotiate,
    negotiated,
    refit,
    start_downstairs,
)
from tests.unit.storage.test_wire import (
    ORACLE_FRAMES,
    ORACLE_REGION,
    ORACLE_SESSION,
    ORACLE_UPSTAIRS,
    oracle_pattern,
)

pytestmark = [pytest.mark.integration]

U, S = ORACLE_UPSTAIRS, ORACLE_SESSION
NEW_U, NEW_S = uuid.UUID(int=0xABC), uuid.UUID(int=0xDEF)


@pytest.fixture(params=[pytest.param("real", marks=needs_binary), "ours"])
def downstairs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[CrucibleDownstairs]:
    """The real downstairs or ours, over a fresh region of the oracle's geometry."""
    with start_downstairs(tmp_path, request.param) as ds:
        yield ds


@pytest.fixture
def ours(tmp_path: Path) -> Iterator[CrucibleDownstairs]:
    with start_downstairs(tmp_path, "ours") as ds:
        yield ds


def write(job: int, start: int, data: bytes, deps: tuple[int, ...] = ()) -> m.Write:
    return m.Write(wire.WriteHeader(U, S, job, deps, start, unencrypted_contexts(data, BLOCK_SIZE)), data)


# -- negotiation -------------------------------------------------------------------------------
def test_interop_here_i_am_ruok_region_info_and_versions(downstairs: CrucibleDownstairs) -> None:
    peer = downstairs.connect()
    try:
        peer.send(m.Ruok())
        assert peer.recv_frame() == ORACLE_FRAMES["Imok"]
        peer.send(hello())
        assert peer.recv() == m.YesItsMe(13, downstairs.repair_addr)
        peer.send(m.Ruok())
        assert peer.recv_frame() == ORACLE_FRAMES["Imok"]
        peer.send(m.PromoteToActive(U, S, 1))
        assert peer.recv_frame() == ORACLE_FRAMES["YouAreNowActive"]
        peer.send(m.RegionInfoPlease())
        assert peer.recv_frame() == ORACLE_FRAMES["RegionInfo"]
        peer.send(m.ExtentVersionsPlease())
        assert peer.recv_frame() == ORACLE_FRAMES["ExtentVersions"]
        peer.send(m.Ruok())
        assert peer.recv_frame() == ORACLE_FRAMES["Imok"]
    finally:
        peer.close()


@pytest.mark.parametrize(
    ("version", "alternates", "read_only", "encrypted"),
    [
        (12, (), False, False),
        (14, (), False, False),
        (12, (11, 10), False, False),
        (14, (13,), False, False),
        (7, (12, 13, 14), False, False),
        (13, (99,), False, False),
        (13, (), True, False),
        (13, (), False, True),
        (13, (), True, True),
        (12, (), True, True),  # the version is checked first
    ],
)
def test_interop_here_i_am_answers(
    downstairs: CrucibleDownstairs,
    version: int,
    alternates: tuple[int, ...],
    read_only: bool,
    encrypted: bool,
) -> None:
    msg = hello(version=version, alternate_versions=alternates, read_only=read_only, encrypted=encrypted)
    expected = wire.answer_here_i_am(
        msg, repair_addr=downstairs.repair_addr, read_only=False, encrypted=False
    )
    peer = downstairs.connect()
    try:
        peer.send(msg)
        frame = peer.recv_frame()
        assert frame == wire.encode(expected)
        if not isinstance(expected, m.YesItsMe):
            peer.expect_closed()
    finally:
        peer.close()


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param([m.PromoteToActive(U, S, 1)], id="promote-first"),
        pytest.param([hello(), m.RegionInfoPlease()], id="region-info-before-promote"),
        pytest.param(
            [hello(), m.PromoteToActive(U, S, 1), m.ExtentVersionsPlease()], id="versions-before-info"
        ),
        pytest.param([hello(), m.PromoteToActive(U, S, 1), m.LastFlush(3)], id="last-flush-before-info"),
        pytest.param([hello(), hello()], id="here-i-am-twice"),
    ],
)
def test_interop_negotiation_out_of_order_closes(
    downstairs: CrucibleDownstairs, steps: list[wire.Message]
) -> None:
    peer = downstairs.connect()
    try:
        for msg in steps[:-1]:
            peer.send(msg)
            assert not isinstance(peer.recv(), m.VersionMismatch)
        peer.send(steps[-1])
        peer.expect_closed()
    finally:
        peer.close()


def test_interop_promote_with_other_ids_is_uuid_mismatch(downstairs: CrucibleDownstairs) -> None:
    peer = downstairs.connect()
    try:
        peer.send(hello())
        assert isinstance(peer.recv(), m.YesItsMe)
        peer.send(m.PromoteToActive(NEW_U, S, 1))
        assert peer.recv() == m.UuidMismatch(U)
        peer.expect_closed()
    finally:
        peer.close()


def test_interop_io_before_negotiation_is_ignored(downstairs: CrucibleDownstairs) -> None:
    peer = downstairs.connect()
    try:
        peer.send(m.ReadRequest(U, S, 1, (), 0, 1))
        peer.send(write(2, 0, oracle_pattern(1)))
        peer.send(hello())
        assert peer.recv() == m.YesItsMe(13, downstairs.repair_addr)
    finally:
        peer.close()


# -- I/O ---------------------------------------------------------------------------------------
def test_interop_write_flush_read_barrier(downstairs: CrucibleDownstairs) -> None:
    data = oracle_pattern(3)
    with negotiated(downstairs) as peer:
        peer.send(write(1000, 5, data))
        assert peer.recv_frame() == ORACLE_FRAMES["WriteAck"]
        peer.send(m.Flush(U, S, 1001, (1000,), 1, 1))
        assert peer.recv_frame() == ORACLE_FRAMES["FlushAck"]
        peer.send(m.ReadRequest(U, S, 1002, (1001,), 5, 3))
        frame = peer.recv_frame()
        assert frame == ORACLE_FRAMES["ReadResponse"]
        read = wire.decode(frame)
        assert isinstance(read, m.ReadResponse) and not isinstance(read.header.blocks, wire.CrucibleError)
        assert verify_unencrypted(read.header.blocks, read.data, BLOCK_SIZE) == []
        peer.send(m.ReadRequest(U, S, 1003, (1002,), EXTENT_SIZE - 1, 2))
        assert peer.recv_frame() == ORACLE_FRAMES["ReadResponseEmpty"]
        peer.send(m.Barrier(U, S, 1004, (1003,)))
        assert peer.recv_frame() == ORACLE_FRAMES["BarrierAck"]


def test_interop_write_unwritten_skips_written_blocks(downstairs: CrucibleDownstairs) -> None:
    first, second = oracle_pattern(1), bytes(range(256)) * 4
    with negotiated(downstairs) as peer:
        peer.send(write(1000, 10, first))
        assert peer.recv() == m.WriteAck(U, S, 1000, None)
        header = wire.WriteHeader(U, S, 1001, (1000,), 10, unencrypted_contexts(second, BLOCK_SIZE))
        peer.send(m.WriteUnwritten(header, second))
        assert peer.recv() == m.WriteUnwrittenAck(U, S, 1001, None)
        peer.send(m.ReadRequest(U, S, 1002, (1001,), 10, 2))
        read = peer.recv()
        assert isinstance(read, m.ReadResponse)
        assert read.data == first + second[BLOCK_SIZE:]
        assert read.header.blocks == (
            wire.ReadBlockUnencrypted(block_hash(first)),
            wire.ReadBlockUnencrypted(block_hash(second[BLOCK_SIZE:])),
        )


def test_interop_jobs_run_by_dependencies_not_arrival(downstairs: CrucibleDownstairs) -> None:
    """A read that depends on a later-sent write waits for it; an independent read does not."""
    data = oracle_pattern(2)
    with negotiated(downstairs) as peer:
        peer.send(m.ReadRequest(U, S, 1002, (1001,), 20, 2))  # waits for 1001
        peer.send(m.ReadRequest(U, S, 1000, (), 30, 1))  # ready: answered first
        first = peer.recv()
        assert isinstance(first, m.ReadResponse) and first.header.job_id == 1000
        peer.send(write(1001, 20, data, (1000,)))
        assert peer.recv() == m.WriteAck(U, S, 1001, None)
        read = peer.recv()
        assert isinstance(read, m.ReadResponse) and read.header.job_id == 1002
        assert read.data == data


def test_interop_uuid_mismatch_takeover_and_lower_generation(downstairs: CrucibleDownstairs) -> None:
    with negotiated(downstairs) as old:
        old.send(m.ReadRequest(uuid.UUID(int=5), S, 1000, (), 0, 1))
        assert old.recv_frame() == ORACLE_FRAMES["UuidMismatch"]
        old.send(m.ReadRequest(U, uuid.UUID(int=6), 1001, (), 0, 1))
        assert old.recv() == m.UuidMismatch(S)
        old.send(m.Ruok())
        assert old.recv() == m.Imok()  # still served
        new, _ = negotiate(downstairs, NEW_U, NEW_S, 2)
        try:
            assert old.recv_frame() == ORACLE_FRAMES["YouAreNoLongerActive"]
            old.expect_closed()
            low = downstairs.connect()
            try:
                low.send(hello(generation=1))
                assert isinstance(low.recv(), m.YesItsMe)
                low.send(m.PromoteToActive(U, S, 1))
                low.expect_closed()
            finally:
                low.close()
            same_gen = downstairs.connect()
            try:
                same_gen.send(hello(generation=2))
                assert isinstance(same_gen.recv(), m.YesItsMe)
                same_gen.send(m.PromoteToActive(U, S, 2))
                same_gen.expect_closed()
            finally:
                same_gen.close()
            new.send(m.Ruok())
            assert new.recv() == m.Imok()  # the active one is untouched
        finally:
            new.close()


def test_interop_flush_options_live_noop_and_last_flush(downstairs: CrucibleDownstairs) -> None:
    data = oracle_pattern(1)
    with negotiated(downstairs) as peer:
        peer.send(write(1001, 70, data))
        assert peer.recv() == m.WriteAck(U, S, 1001, None)
        peer.send(m.Flush(U, S, 1002, (1001,), 7, 1, None, 0))
        assert peer.recv() == m.FlushAck(U, S, 1002, None)
        peer.send(m.ExtentLiveNoOp(U, S, 1003, (1002,)))
        assert peer.recv_frame() == ORACLE_FRAMES["ExtentLiveAckId"]
        peer.send(m.Flush(U, S, 1004, (1003,), 8, 1, wire.SnapshotDetails("snap1"), None))
        assert peer.recv() == m.FlushAck(U, S, 1004, None)
        peer.send(m.ReadRequest(U, S, 1005, (1004,), 0, 0))
        assert peer.recv_frame() == ORACLE_FRAMES["ReadResponseNone"]
    new, _ = negotiate(downstairs, NEW_U, NEW_S, 2)
    new.close()
    assert new.received[-1] == ORACLE_FRAMES["ExtentVersionsAfterFlush"]
    back = downstairs.connect()
    try:
        back.send(hello(generation=3))
        assert isinstance(back.recv(), m.YesItsMe)
        back.send(m.PromoteToActive(U, S, 3))
        assert back.recv() == m.YouAreNowActive(U, S, 3)
        back.send(m.RegionInfoPlease())
        assert isinstance(back.recv(), m.RegionInfo)
        back.send(m.LastFlush(8))
        back.send(m.ReadRequest(U, S, 2000, (8,), 70, 1))  # job 8 counts as done
        read = back.recv()
        assert isinstance(read, m.ReadResponse) and read.data == data
    finally:
        back.close()


def _job(op: str, job: int) -> wire.Message:
    if op == "write":
        return write(job, 3, oracle_pattern(1))
    if op == "read":
        return m.ReadRequest(U, S, job, (), 3, 1)
    return m.Flush(U, S, job, (), job, 1)


@pytest.mark.parametrize("op", ["write", "read", "flush"])
@pytest.mark.parametrize("kind", [pytest.param("real", marks=needs_binary), "ours"])
def test_interop_error_report_then_retried_ack(tmp_path: Path, kind: str, op: str) -> None:
    """--write/read/flush-errors: a quarter of the attempts fail with ErrorReport(GenericError
    "test error"); the job is retried until it succeeds and then acked normally."""
    with start_downstairs(tmp_path, kind, (f"--{op}-errors",)) as ds, negotiated(ds) as peer:
        reports = 0
        for job in range(1000, 1060):  # P(no failure in 60 jobs) = 0.75**60 ~ 3e-8
            peer.send(_job(op, job))
            while isinstance(reply := peer.recv(), m.ErrorReport):
                assert reply == m.ErrorReport(
                    U, S, job, wire.CrucibleError(wire.ErrorKind.GenericError, "test error")
                )
                reports += 1
            assert _job_id_of(reply) == job
            assert getattr(reply, "result", None) is None
            if isinstance(reply, m.ReadResponse):
                assert not isinstance(reply.header.blocks, wire.CrucibleError)
            if reports:
                break
        assert reports, "no job failed in 60"


def _job_id_of(reply: wire.Message) -> int:
    if isinstance(reply, m.ReadResponse):
        return reply.header.job_id
    return int(getattr(reply, "job_id", -1))


@needs_binary
def test_interop_same_data_same_versions_on_both(tmp_path: Path) -> None:
    """One session of writes and flushes against each; afterwards ExtentVersions and a read of
    the whole region are identical (then each serves the other's region files the same)."""
    results = []
    dirs = []
    for kind in ("real", "ours"):
        with start_downstairs(tmp_path, kind) as ds:
            with negotiated(ds) as peer:
                for n, start in enumerate((0, EXTENT_SIZE - 3, 2 * EXTENT_SIZE + 9)):
                    data = oracle_pattern(n + 2)
                    peer.send(write(1000 + 2 * n, start, data))
                    assert peer.recv() == m.WriteAck(U, S, 1000 + 2 * n, None)
                    if n < 2:
                        peer.send(m.Flush(U, S, 1001 + 2 * n, (1000 + 2 * n,), 5 + n, 1))
                        assert peer.recv() == m.FlushAck(U, S, 1001 + 2 * n, None)
                peer.send(m.ReadRequest(U, S, 1100, (), 0, EXTENT_SIZE * EXTENT_COUNT))
                read = peer.recv()
            again, versions = negotiate(ds, NEW_U, NEW_S, 2)
            again.close()
            results.append((read, versions))
            ds.stop()
            with RawRegion.open(ds.region_dir) as region:
                dirs.append((region.read(0, EXTENT_SIZE * EXTENT_COUNT), region.versions()))
    assert results[0] == results[1]
    assert results[0][1].dirty_bits == (False, False, True, False)
    assert dirs[0] == dirs[1]


@pytest.mark.parametrize("data_blocks", [1, 3])
def test_interop_write_with_a_context_count_unlike_its_blocks_closes(
    downstairs: CrucibleDownstairs, data_blocks: int
) -> None:
    """Checked when the Write arrives, before its dependencies: the connection ends."""
    data = oracle_pattern(2)
    contexts = unencrypted_contexts(data, BLOCK_SIZE)
    with negotiated(downstairs) as peer:
        body = oracle_pattern(data_blocks)
        peer.send(m.Write(wire.WriteHeader(U, S, 1000, (999,), 4, contexts), body))
        peer.expect_closed()
    again, _ = negotiate(downstairs, NEW_U, NEW_S, 2)  # the process serves on
    again.close()


# -- where ours differs on purpose ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("start", "count"), [(EXTENT_SIZE * EXTENT_COUNT - 6, 10), (1 << 62, 1), (0, 1 << 40)]
)
def test_ours_answers_io_past_the_end_with_an_error(ours: CrucibleDownstairs, start: int, count: int) -> None:
    """The real downstairs aborts on these (test_wire_oracle pins it); ours answers and serves on."""
    data = oracle_pattern(1)
    with negotiated(ours) as peer:
        peer.send(m.ReadRequest(U, S, 1000, (), start, count))
        read = peer.recv()
        assert isinstance(read, m.ReadResponse)
        assert isinstance(read.header.blocks, wire.CrucibleError) and read.data == b""
        assert read.header.blocks.kind in (wire.ErrorKind.OffsetInvalid, wire.ErrorKind.InvalidNumberOfBlocks)
        peer.send(write(1001, max(start, EXTENT_SIZE * EXTENT_COUNT), data))  # one block, past the end
        assert peer.recv() == m.WriteAck(U, S, 1001, wire.CrucibleError(wire.ErrorKind.OffsetInvalid))
        peer.send(write(1002, 0, data))
        assert peer.recv() == m.WriteAck(U, S, 1002, None)


def test_ours_answers_a_bad_hash_with_an_error(ours: CrucibleDownstairs) -> None:
    """The real one retries a bad hash forever; ours acks with HashMismatch, writes nothing."""
    data = oracle_pattern(2)
    with negotiated(ours) as peer:
        contexts = (wire.BlockContext(block_hash(data[:BLOCK_SIZE])), wire.BlockContext(12345))
        peer.send(m.Write(wire.WriteHeader(U, S, 1000, (), 4, contexts), data))
        assert peer.recv() == m.WriteAck(U, S, 1000, wire.CrucibleError(wire.ErrorKind.HashMismatch))
        peer.send(m.ReadRequest(U, S, 1002, (), 4, 2))
        read = peer.recv()
        assert isinstance(read, m.ReadResponse)
        assert read.header.blocks == (wire.ReadBlockEmpty(), wire.ReadBlockEmpty())
        # the failed write is not done: a job depending on it waits (Crucible's rule)
        peer.send(m.ReadRequest(U, S, 1003, (1000,), 4, 1))
        peer.send(m.Ruok())
        assert peer.recv() == m.Imok()


def test_ours_caps_frames_before_activation(ours: CrucibleDownstairs) -> None:
    peer = ours.connect()
    try:
        peer.sock.sendall(struct.pack("<II", wire.NEGOTIATION_FRAME_CAP + 1, 0))
        peer.expect_closed()
    finally:
        peer.close()
    peer, _ = negotiate(ours)  # the process serves on
    peer.close()
    assert "protocol_error" in ours.log_path.read_text()


def test_ours_handshake_deadline_and_connection_cap(tmp_path: Path) -> None:
    with start_downstairs(tmp_path, "ours", ("--handshake-timeout", "0.5", "--max-connections", "2")) as ds:
        silent = ds.connect()
        try:
            silent.expect_closed()  # no HereIAm within 0.5 s
        finally:
            silent.close()
        a, _ = negotiate(ds)
        b = ds.connect()
        c = socket.create_connection(("127.0.0.1", ds.port), timeout=10)
        try:
            assert c.recv(1) == b""  # the third is closed at once
            a.send(m.Ruok())
            assert a.recv() == m.Imok()
        finally:
            a.close()
            b.close()
            c.close()
        ds.wait_for_log("connection_refused")


# -- read-only and encrypted regions -------------------------------------------------------------
@pytest.mark.parametrize("kind", [pytest.param("real", marks=needs_binary), "ours"])
def test_interop_read_only_mode(tmp_path: Path, kind: str) -> None:
    """--mode ro: a read-write HereIAm is ReadOnlyMismatch; several upstairs may be active at
    once, a second session of the same upstairs replaces the first; a write closes."""
    with start_downstairs(tmp_path, kind, ("--mode", "ro")) as ds:
        rw = ds.connect()
        try:
            rw.send(hello())
            assert rw.recv_frame() == wire.encode(m.ReadOnlyMismatch(True))
            rw.expect_closed()
        finally:
            rw.close()
        a, versions = negotiate(ds, read_only=True)
        assert versions == m.ExtentVersions((0,) * EXTENT_COUNT, (0,) * EXTENT_COUNT, (False,) * EXTENT_COUNT)
        b, _ = negotiate(ds, NEW_U, NEW_S, 1, read_only=True)
        try:
            a.send(m.ReadRequest(U, S, 1000, (), 0, 1))
            assert a.recv() == m.ReadResponse(
                wire.ReadResponseHeader(U, S, 1000, (wire.ReadBlockEmpty(),)), bytes(512)
            )
            b.send(m.Flush(NEW_U, NEW_S, 1000, (), 1, 1))
            assert b.recv() == m.FlushAck(NEW_U, NEW_S, 1000, None)
            with negotiated(ds, U, uuid.UUID(int=99), 1, read_only=True) as a2:
                assert a.recv() == m.YouAreNoLongerActive(U, uuid.UUID(int=99), 1)
                a.expect_closed()
                b.send(
                    m.Write(
                        wire.WriteHeader(NEW_U, NEW_S, 1001, (), 0, unencrypted_contexts(bytes(512), 512)),
                        bytes(512),
                    )
                )
                b.expect_closed()
                a2.send(m.Ruok())
                assert a2.recv() == m.Imok()
        finally:
            a.close()
            b.close()


@pytest.mark.parametrize("kind", [pytest.param("real", marks=needs_binary), "ours"])
def test_interop_encrypted_region(tmp_path: Path, kind: str) -> None:
    root = Path(tempfile.mkdtemp(prefix=f"{kind}-enc-", dir=tmp_path))
    with KINDS[kind](root) as ds:
        ds.create(ORACLE_REGION, encrypted=True)
        ds.start()
        plain = ds.connect()
        try:
            plain.send(hello())
            assert plain.recv_frame() == wire.encode(m.EncryptedMismatch(True))
            plain.expect_closed()
        finally:
            plain.close()
        with negotiated(ds, encrypted=True) as peer:
            peer.send(m.RegionInfoPlease())  # after negotiation: not a job, the connection ends
            peer.expect_closed()
        with negotiated(ds, NEW_U, NEW_S, 2, encrypted=True) as peer:
            ciphertext = oracle_pattern(1)
            enc = wire.EncryptionContext(bytes(range(12)), bytes(range(16, 32)))
            ctx = wire.BlockContext(encrypted_block_hash(enc.nonce, enc.tag, ciphertext), enc)
            peer.send(m.Write(wire.WriteHeader(NEW_U, NEW_S, 1000, (), 9, (ctx,)), ciphertext))
            assert peer.recv() == m.WriteAck(NEW_U, NEW_S, 1000, None)
            peer.send(m.ReadRequest(NEW_U, NEW_S, 1001, (1000,), 8, 2))
            read = peer.recv()
            assert read == m.ReadResponse(
                wire.ReadResponseHeader(
                    NEW_U, NEW_S, 1001, (wire.ReadBlockEmpty(), wire.ReadBlockEncrypted(enc))
                ),
                bytes(512) + ciphertext,
            )


@needs_binary
def test_real_downstairs_spins_on_a_failing_flush(tmp_path: Path) -> None:
    """Pinned: a Flush whose extent_limit is beyond the region fails (InvalidExtent) and the
    real downstairs retries it in a loop that never yields: no reply at all, not even its
    ErrorReport, and Ruok goes unanswered too. Ours acks it with the error (test below)."""
    with start_downstairs(tmp_path, "real") as ds, negotiated(ds) as peer:
        peer.send(m.Flush(U, S, 1000, (), 1, 1, None, EXTENT_COUNT + 1))
        peer.send(m.Ruok())
        peer.sock.settimeout(2.0)
        with pytest.raises(TimeoutError):
            peer.sock.recv(1)
        assert ds.proc is not None and ds.proc.poll() is None  # alive, busy


def test_ours_acks_a_failing_flush_with_its_error(ours: CrucibleDownstairs) -> None:
    with negotiated(ours) as peer:
        peer.send(m.Flush(U, S, 1000, (), 1, 1, None, EXTENT_COUNT + 1))
        assert peer.recv() == m.FlushAck(U, S, 1000, wire.CrucibleError(wire.ErrorKind.InvalidExtent))
        peer.send(m.Flush(U, S, 1001, (), 1, 1, None, EXTENT_COUNT))  # == extent_count is allowed
        assert peer.recv() == m.FlushAck(U, S, 1001, None)


def test_interop_identical_reconnect_and_the_two_generations(downstairs: CrucibleDownstairs) -> None:
    """The same (upstairs, session, generation) again replaces the first connection. When
    HereIAm and PromoteToActive carry different generations, the HereIAm's is the one compared
    with the active upstairs (and named in YouAreNoLongerActive); the Promote's is echoed and
    kept for later comparisons."""
    other = uuid.UUID(int=77)
    first, _ = negotiate(downstairs, generation=3)
    second = downstairs.connect()
    third = downstairs.connect()
    try:
        second.send(hello(generation=3))
        assert isinstance(second.recv(), m.YesItsMe)
        second.send(m.PromoteToActive(U, S, 3))
        assert second.recv() == m.YouAreNowActive(U, S, 3)
        assert first.recv() == m.YouAreNoLongerActive(U, S, 3)
        first.expect_closed()
        low_hello = downstairs.connect()
        try:
            low_hello.send(hello(upstairs_id=other, session_id=other, generation=1))
            assert isinstance(low_hello.recv(), m.YesItsMe)
            low_hello.send(m.PromoteToActive(other, other, 9))
            low_hello.expect_closed()  # 1 < 3, whatever the Promote says
        finally:
            low_hello.close()
        third.send(hello(upstairs_id=NEW_U, session_id=NEW_S, generation=4))
        assert isinstance(third.recv(), m.YesItsMe)
        third.send(m.PromoteToActive(NEW_U, NEW_S, 5))
        assert third.recv() == m.YouAreNowActive(NEW_U, NEW_S, 5)
        assert second.recv() == m.YouAreNoLongerActive(NEW_U, NEW_S, 4)
        second.expect_closed()
        fourth = downstairs.connect()
        try:
            fourth.send(hello(upstairs_id=other, session_id=other, generation=4))
            assert isinstance(fourth.recv(), m.YesItsMe)
            fourth.send(m.PromoteToActive(other, other, 4))
            fourth.expect_closed()  # 4 < the 5 kept
        finally:
            fourth.close()
    finally:
        first.close()
        second.close()
        third.close()


def _refused_same_upstairs_then_takeover(ds: CrucibleDownstairs) -> tuple[Peer, Peer]:
    """Active upstairs U at generation 3; U again at generation 1 is refused; then a NEW
    upstairs at generation 4 is promoted. Returns (the first, the new) connections."""
    active, _ = negotiate(ds, generation=3)
    low = ds.connect()
    try:
        low.send(hello(generation=1))
        assert isinstance(low.recv(), m.YesItsMe)
        low.send(m.PromoteToActive(U, S, 1))
        low.expect_closed()
    finally:
        low.close()
    new, _ = negotiate(ds, NEW_U, NEW_S, 4)
    return active, new


@needs_binary
def test_real_downstairs_refused_promote_of_the_active_upstairs_id_unregisters_it(tmp_path: Path) -> None:
    """Pinned (a bug of the real one, not copied): closing the refused connection removes the
    ACTIVE entry of its upstairs id, so the next upstairs becomes active without a takeover;
    the old connection is never told and keeps getting its writes acked: two writers."""
    with start_downstairs(tmp_path, "real") as ds:
        old, new = _refused_same_upstairs_then_takeover(ds)
        try:
            data = oracle_pattern(1)
            old.send(write(1000, 0, data))
            assert old.recv() == m.WriteAck(U, S, 1000, None)  # no YouAreNoLongerActive first
            ds.wait_for_log("was previously active, clearing")
        finally:
            old.close()
            new.close()


def test_ours_refused_promote_leaves_the_active_upstairs_alone(ours: CrucibleDownstairs) -> None:
    old, new = _refused_same_upstairs_then_takeover(ours)
    try:
        assert old.recv() == m.YouAreNoLongerActive(NEW_U, NEW_S, 4)
        old.expect_closed()
    finally:
        old.close()
        new.close()


@pytest.mark.parametrize("case", sorted(PRE_NEGOTIATION_CASES))
def test_ours_closes_on_every_malformed_frame_before_negotiation(ours: CrucibleDownstairs, case: str) -> None:
    """Where the real one answers (trailing byte) or aborts (length prefix 0..3, see
    test_wire_oracle), ours closes that connection with a protocol_error line and serves on."""
    frame, _real_reaction = PRE_NEGOTIATION_CASES[case]
    peer = ours.connect()
    try:
        peer.sock.sendall(frame)
        peer.expect_closed()
    finally:
        peer.close()
    assert ours.proc is not None and ours.proc.poll() is None
    again, _ = negotiate(ours)
    again.close()
    ours.wait_for_log('"protocol_error"')


def test_ours_closes_on_a_write_with_junk_before_its_data(ours: CrucibleDownstairs) -> None:
    """The real one takes the LAST count bytes as the data and acks; ours refuses the frame."""
    data = oracle_pattern(2)
    head, _ = wire.encode_parts(write(1000, 5, data))
    with negotiated(ours) as peer:
        peer.sock.sendall(refit(head + b"JUNK" + data))
        peer.expect_closed()
    with negotiated(ours, NEW_U, NEW_S, 2) as again:
        again.send(m.ReadRequest(NEW_U, NEW_S, 1, (), 5, 2))
        read = again.recv()
        assert isinstance(read, m.ReadResponse) and read.data == bytes(2 * BLOCK_SIZE)  # nothing written
