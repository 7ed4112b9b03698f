"""Our raw extent files (sut.storage.extent_raw) against the REAL crucible-downstairs.

Both directions: a region the real binary created and wrote opens with ours and reads the
same; a region ours created and wrote is served by the real binary (read back over the wire
with our codec) with the same data, the same Unencrypted hashes and the same ExtentVersions.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sut.storage import wire
from sut.storage.extent_raw import RawRegion
from sut.storage.wire import messages as m
from sut.storage.wire.blockhash import unencrypted_contexts
from sut.storage.wire.fields import ReadBlockContext, WriteHeader
from tests.integration.storage.crucible_ds import (
    BLOCK_SIZE,
    EXTENT_COUNT,
    EXTENT_SIZE,
    OurDownstairs,
    Peer,
    RealDownstairs,
    needs_binary,
    negotiate,
    negotiated,
)
from tests.unit.storage.test_wire import ORACLE_REGION, ORACLE_SESSION, ORACLE_UPSTAIRS, oracle_pattern

pytestmark = [pytest.mark.integration]

U, S = ORACLE_UPSTAIRS, ORACLE_SESSION
TOTAL = EXTENT_SIZE * EXTENT_COUNT
# (start block, block count, flushed afterwards?): extent 0, extents 0+1, extent 3 left dirty
WRITES = [(5, 3, True), (EXTENT_SIZE - 2, 4, True), (3 * EXTENT_SIZE + 7, 2, False)]


@pytest.fixture
def real(tmp_path: Path) -> Iterator[RealDownstairs]:
    with RealDownstairs(tmp_path / "real") as ds:
        ds.root.mkdir()
        yield ds


def read_all(peer: Peer, job: int) -> tuple[bytes, tuple[ReadBlockContext, ...]]:
    peer.send(m.ReadRequest(U, S, job, (), 0, TOTAL))
    reply = peer.recv()
    assert isinstance(reply, m.ReadResponse)
    assert not isinstance(reply.header.blocks, wire.CrucibleError), reply.header.blocks
    return bytes(reply.data), reply.header.blocks


@needs_binary
def test_real_downstairs_interop_region_it_wrote_opens_with_ours(real: RealDownstairs) -> None:
    real.create(ORACLE_REGION)
    real.start()
    peer, _ = negotiate(real)
    job = 1000
    try:
        for n, (start, count, flush) in enumerate(WRITES):
            data = oracle_pattern(count + n)[n * BLOCK_SIZE :]
            peer.send(
                m.Write(WriteHeader(U, S, job, (), start, unencrypted_contexts(data, BLOCK_SIZE)), data)
            )
            assert peer.recv() == m.WriteAck(U, S, job, None)
            job += 1
            if flush:
                peer.send(m.Flush(U, S, job, (job - 1,), 10 + n, 1))
                assert peer.recv() == m.FlushAck(U, S, job, None)
                job += 1
        # write block 5 again: it moves back to slot A, unflushed
        data = oracle_pattern(1)[::-1]
        peer.send(m.Write(WriteHeader(U, S, job, (), 5, unencrypted_contexts(data, BLOCK_SIZE)), data))
        assert peer.recv() == m.WriteAck(U, S, job, None)
        their_data, their_contexts = read_all(peer, job + 1)
    finally:
        peer.close()
    versions_peer, versions = negotiate(real, uuid.UUID(int=7), uuid.UUID(int=8), 2)
    versions_peer.close()
    real.stop()  # killed with dirty extents: ours must recover their active slots
    with RawRegion.open(real.region_dir) as ours:
        assert ours.versions() == (versions.gen_numbers, versions.flush_numbers, versions.dirty_bits)
        assert versions.dirty_bits == (True, False, False, True)
        data_, contexts = ours.read(0, TOTAL)
        assert data_ == their_data
        assert tuple(contexts) == their_contexts


@needs_binary
def test_real_downstairs_interop_serves_a_region_ours_wrote(real: RealDownstairs) -> None:
    with RawRegion.create(
        real.region_dir,
        ORACLE_REGION,
        block_size=BLOCK_SIZE,
        extent_size=EXTENT_SIZE,
        extent_count=EXTENT_COUNT,
    ) as ours:
        for n, (start, count, flush) in enumerate(WRITES):
            data = oracle_pattern(count + n)[n * BLOCK_SIZE :]
            ours.write(start, data, unencrypted_contexts(data, BLOCK_SIZE))
            if flush:
                ours.flush(10 + n, 1)
        data = oracle_pattern(1)[::-1]
        ours.write(5, data, unencrypted_contexts(data, BLOCK_SIZE))
        data = oracle_pattern(2)
        ours.write(40, data, unencrypted_contexts(data, BLOCK_SIZE), only_unwritten=True)
        our_data, our_contexts = ours.read(0, TOTAL)
        our_versions = ours.versions()
    assert our_versions[2] == (True, False, False, True)
    real.start()
    peer, versions = negotiate(real)
    try:
        assert (versions.gen_numbers, versions.flush_numbers, versions.dirty_bits) == our_versions
        their_data, their_contexts = read_all(peer, 1000)
        assert their_data == our_data
        assert their_contexts == tuple(our_contexts)
        # and it keeps working on our files: flush, then the versions it reports
        peer.send(m.Flush(U, S, 1001, (1000,), 20, 3))
        assert peer.recv() == m.FlushAck(U, S, 1001, None)
    finally:
        peer.close()
    again, versions = negotiate(real, uuid.UUID(int=7), uuid.UUID(int=8), 4)
    again.close()
    assert versions == m.ExtentVersions((3, 1, 0, 3), (20, 11, 0, 20), (False,) * 4)
    real.stop()
    with RawRegion.open(real.region_dir) as reopened:
        assert reopened.versions() == ((3, 1, 0, 3), (20, 11, 0, 20), (False,) * 4)
        assert reopened.read(0, TOTAL)[0] == our_data


@pytest.mark.parametrize("encrypted", [False, True])
@needs_binary
def test_real_downstairs_interop_create_is_byte_identical(tmp_path: Path, encrypted: bool) -> None:
    """``crucible-downstairs create`` and ``python -m sut.storage.downstairs create`` write
    the same files, byte for byte (region.json included, and its mode)."""
    trees = []
    for cls in (RealDownstairs, OurDownstairs):
        ds = cls(tmp_path / cls.__name__)
        ds.root.mkdir()
        ds.create(ORACLE_REGION, extent_size=10, extent_count=0x1003, encrypted=encrypted)
        files = sorted(p for p in ds.region_dir.rglob("*") if p.is_file())
        trees.append(
            {str(p.relative_to(ds.region_dir)): (p.read_bytes(), p.stat().st_mode & 0o777) for p in files}
        )
    assert len(trees[0]) == 0x1003 + 1
    assert "00/001/002" in trees[0]  # extent 0x1002: the second directory level
    assert trees[0] == trees[1]


@needs_binary
def test_real_downstairs_interop_ours_serves_what_it_wrote(real: RealDownstairs) -> None:
    """The real one writes (and is killed with dirty extents); then OUR downstairs process
    serves the same directory: same ExtentVersions, same data and contexts over the wire."""
    real.create(ORACLE_REGION)
    real.start()
    with negotiated(real) as peer:
        for n, (start, count, flush) in enumerate(WRITES):
            data = oracle_pattern(count + n)[n * BLOCK_SIZE :]
            peer.send(
                m.Write(
                    WriteHeader(U, S, 1000 + 2 * n, (), start, unencrypted_contexts(data, BLOCK_SIZE)), data
                )
            )
            assert peer.recv() == m.WriteAck(U, S, 1000 + 2 * n, None)
            if flush:
                peer.send(m.Flush(U, S, 1001 + 2 * n, (1000 + 2 * n,), 10 + n, 1))
                assert peer.recv() == m.FlushAck(U, S, 1001 + 2 * n, None)
        their = read_all(peer, 1100)
    probe, their_versions = negotiate(real, uuid.UUID(int=7), uuid.UUID(int=8), 2)
    probe.close()
    real.stop()
    ours = OurDownstairs(real.root)
    try:
        ours.start()
        peer, versions = negotiate(ours, uuid.UUID(int=9), uuid.UUID(int=10), 3)
        try:
            assert versions == their_versions
            assert versions.dirty_bits == (False, False, False, True)
            assert read_all_as(peer, uuid.UUID(int=9), uuid.UUID(int=10), 1) == their
        finally:
            peer.close()
    finally:
        ours.stop()


def read_all_as(
    peer: Peer, upstairs: uuid.UUID, session: uuid.UUID, job: int
) -> tuple[bytes, tuple[ReadBlockContext, ...]]:
    peer.send(m.ReadRequest(upstairs, session, job, (), 0, TOTAL))
    reply = peer.recv()
    assert isinstance(reply, m.ReadResponse)
    assert not isinstance(reply.header.blocks, wire.CrucibleError), reply.header.blocks
    return bytes(reply.data), reply.header.blocks


@needs_binary
def test_real_downstairs_interop_serves_what_ours_left_after_kill_9(tmp_path: Path) -> None:
    """Our process is killed (-9) after acked but unflushed writes over flushed ones: ours
    restarted and the real binary both serve the same data and dirty versions from its files."""
    ours = OurDownstairs(tmp_path / "ours")
    ours.root.mkdir()
    with ours:
        ours.create(ORACLE_REGION)
        ours.start()
        with negotiated(ours) as peer:
            for n, (start, count, flush) in enumerate(WRITES):
                data = oracle_pattern(count + n)[n * BLOCK_SIZE :]
                peer.send(
                    m.Write(
                        WriteHeader(U, S, 1000 + 2 * n, (), start, unencrypted_contexts(data, BLOCK_SIZE)),
                        data,
                    )
                )
                assert peer.recv() == m.WriteAck(U, S, 1000 + 2 * n, None)
                if flush:
                    peer.send(m.Flush(U, S, 1001 + 2 * n, (1000 + 2 * n,), 10 + n, 1))
                    assert peer.recv() == m.FlushAck(U, S, 1001 + 2 * n, None)
            again = oracle_pattern(2)[::-1]  # over flushed blocks: their slots flip, unflushed
            peer.send(m.Write(WriteHeader(U, S, 1010, (), 6, unencrypted_contexts(again, BLOCK_SIZE)), again))
            assert peer.recv() == m.WriteAck(U, S, 1010, None)
            before = read_all(peer, 1011)
        ours.stop()  # SIGKILL
        ours.start()
        peer, versions = negotiate(ours, uuid.UUID(int=7), uuid.UUID(int=8), 2)
        try:
            assert versions.dirty_bits == (True, False, False, True)
            assert read_all_as(peer, uuid.UUID(int=7), uuid.UUID(int=8), 1) == before
        finally:
            peer.close()
        ours.stop()
        real = RealDownstairs(ours.root)
        try:
            real.start()
            peer, real_versions = negotiate(real, uuid.UUID(int=9), uuid.UUID(int=10), 3)
            try:
                assert real_versions == versions
                assert read_all_as(peer, uuid.UUID(int=9), uuid.UUID(int=10), 1) == before
            finally:
                peer.close()
        finally:
            real.stop()
