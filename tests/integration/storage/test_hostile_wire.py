"""Hostile input on the downstairs wire: a real downstairs process (ours, Crucible's protocol
v13) against raw socket peers that build their frames with our codec (sut.storage.wire), or
by hand where the codec refuses to build them.

Each case asserts its clear outcome (an error reply, or the connection closed with a JSON log
line naming the problem), that nothing but JSON reached the downstairs' stderr (no
traceback), that the region files are byte-for-byte unchanged by the hostile part, and that
the downstairs then still serves a well-behaved upstairs (the real upstairs connection,
:class:`~sut.storage.client.DownstairsClient`: write, read back with its hash checked, flush).

Proven elsewhere, so not repeated here (test_downstairs_conformance.py, ``ours``): every
malformed frame of the oracle's list before negotiation closes the connection (bool 2, a UUID
of 15 bytes, a Vec count of 2^60, variant 42, a length prefix over 100 MiB or below 8, a
trailing byte); I/O past the region's end, a bad block hash and a Flush with extent_limit
past the region get their ack with an error and the connection serves on; a Write whose data
is not one block per context closes; ``--handshake-timeout`` on a silent connection and
``--max-connections``. Live-repair and reconciliation jobs on extents past the region or in
the wrong state: test_downstairs_repair.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import random
import re
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sut.storage import wire
from sut.storage.client import (
    ClientState,
    DownstairsClient,
    FlushOp,
    ReadOp,
    RetryPolicy,
    SessionInfo,
    WriteOp,
)
from sut.storage.wire import messages as m
from sut.storage.wire.blockhash import block_hash, unencrypted_contexts

from .conftest import (
    BLOCK_SIZE,
    EXTENT_COUNT,
    EXTENT_SIZE,
    DownstairsFactory,
    DownstairsProc,
    poll_until,
    run_bounded,
)

pytestmark = pytest.mark.integration

FAST = RetryPolicy(connect_timeout_s=2.0, reconnect_delay_s=0.2)
GENS = itertools.count(1)  # every session of this module promotes at a higher generation
TOTAL_BLOCKS = EXTENT_SIZE * EXTENT_COUNT
RSS_BUDGET = 50 * 1024 * 1024  # what 12 hostile connections may add to a downstairs' memory
U64_MAX = (1 << 64) - 1


# -- raw peers ------------------------------------------------------------------------------
class Raw:
    """One raw connection: send frames, receive whole frames (our codec's assembler)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.assembler = wire.FrameAssembler(wire.MAX_FRAME)
        self.pending: list[wire.Message] = []
        self.upstairs_id, self.session_id = uuid.uuid4(), uuid.uuid4()

    async def send(self, data: bytes | wire.Message) -> None:
        self.writer.write(data if isinstance(data, bytes) else wire.encode(data))
        await self.writer.drain()

    async def recv(self, timeout_s: float = 10) -> wire.Message | None:
        """The next message; None once the downstairs closed the connection."""
        while not self.pending:
            try:
                chunk = await asyncio.wait_for(self.reader.read(1 << 16), timeout_s)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self.pending += self.assembler.feed(chunk)
        return self.pending.pop(0)

    def hello(self, read_only: bool = False, gen: int = 0) -> m.HereIAm:
        return m.HereIAm(wire.MESSAGE_VERSION, self.upstairs_id, self.session_id, gen, read_only, False, ())

    def abort(self) -> None:
        self.writer.transport.abort()


async def connect(ds: DownstairsProc) -> Raw:
    return Raw(*await asyncio.open_connection("127.0.0.1", ds.port))


async def promote(ds: DownstairsProc, read_only: bool = False) -> Raw:
    """A raw connection that negotiated properly (HereIAm .. ExtentVersions) and is active."""
    raw = await connect(ds)
    gen = next(GENS)
    u, s = raw.upstairs_id, raw.session_id
    for msg, want in (
        (raw.hello(read_only, gen), m.YesItsMe),
        (m.PromoteToActive(u, s, gen), m.YouAreNowActive),
        (m.RegionInfoPlease(), m.RegionInfo),
        (m.ExtentVersionsPlease(), m.ExtentVersions),
    ):
        await raw.send(msg)
        got = await raw.recv()
        assert isinstance(got, want), f"{type(msg).__name__}: expected {want.__name__}, got {got}"
    return raw


async def closed_by_peer(reader: asyncio.StreamReader, timeout_s: float = 10.0) -> bytes:
    """Wait for the downstairs to hang up; what it sent before (b"" normally)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout_s)
    except ConnectionResetError:
        return b""


def close_all(raws: list[Raw]) -> None:
    for raw in raws:
        raw.abort()


# -- what the downstairs shows ----------------------------------------------------------------
def region_hash(ds: DownstairsProc) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in ds.data_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(ds.data_dir)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def rss_line(base: int, status: dict[str, int]) -> str:
    mib = 1 << 20
    now, peak = status["VmRSS"] // mib, status["VmHWM"] // mib
    return f"\nRSS before {base // mib} MiB, now {now} MiB, peak {peak} MiB"


def proc_status(ds: DownstairsProc) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of the downstairs process, in bytes."""
    assert ds.process is not None
    out = {}
    for line in Path(f"/proc/{ds.process.pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


async def wait_event(
    ds: DownstairsProc, since: int, event: str, reason: str, count: int = 1
) -> list[dict[str, Any]]:
    """Poll the log until ``count`` lines of ``event`` whose text matches ``reason`` appeared."""

    def found() -> list[dict[str, Any]]:
        return [e for e in ds.events(since) if e.get("event") == event and re.search(reason, json.dumps(e))]

    await poll_until(
        lambda: len(found()) >= count,
        f"{count} {event!r} log line(s) matching {reason!r}",
        timeout_s=20,
        last=lambda: ds.events(since)[-4:],
    )
    return found()


def assert_json_only(ds: DownstairsProc, since: int) -> None:
    not_json = [e["raw"] for e in ds.events(since) if e["event"] == "NOT-JSON"]
    assert not not_json, "the downstairs wrote lines that are not JSON (a traceback?):\n" + "\n".join(
        not_json[:20]
    )


async def upstairs_works(ds: DownstairsProc, *, read_only: bool = False) -> None:
    """The real upstairs connection negotiates, writes, reads it back (hashes checked) and flushes."""
    gen = next(GENS)
    session = SessionInfo(
        uuid.uuid4(), uuid.uuid4(), gen, read_only, False, BLOCK_SIZE, EXTENT_SIZE, EXTENT_COUNT
    )
    client = DownstairsClient(ds.target, 0, session, FAST, lambda _c: None, logging.getLogger("hostile-wire"))
    client.start()
    try:
        await poll_until(
            lambda: client.state is ClientState.WAIT_QUORUM,
            f"a well-behaved upstairs to negotiate with {ds.target}",
            last=lambda: client.status(),
        )
        client.set_state(ClientState.ACTIVE)
        block = (gen * 8) % (TOTAL_BLOCKS - 8)
        data = bytes([gen % 251]) * (8 * BLOCK_SIZE)
        if not read_only:
            op = WriteOp(block, data, unencrypted_contexts(data, BLOCK_SIZE))
            await asyncio.wait_for(client.submit(1000, (), op), 10)
        reply = await asyncio.wait_for(client.submit(1001, (1000,), ReadOp(block, 8)), 10)
        assert isinstance(reply, m.ReadResponse), reply
        if not read_only:
            want = tuple(wire.ReadBlockUnencrypted(block_hash(data[:BLOCK_SIZE])) for _ in range(8))
            assert reply.data == data and reply.header.blocks == want, reply.header
            await asyncio.wait_for(client.submit(1002, (1000, 1001), FlushOp(gen, gen)), 10)
        assert client.state is ClientState.ACTIVE, client.status()
    finally:
        await client.stop()


class Hostile:
    """Brackets a hostile part: remembers the log offset and the region's hash before it."""

    def __init__(self, ds: DownstairsProc) -> None:
        self.ds = ds
        self.since = ds.log_offset()
        self.before = region_hash(ds)

    async def done(self, *, read_only: bool = False) -> None:
        assert_json_only(self.ds, self.since)
        assert region_hash(self.ds) == self.before, "the hostile peer changed the region files"
        assert self.ds.process is not None and self.ds.process.alive(), "the downstairs died"
        await upstairs_works(self.ds, read_only=read_only)
        assert_json_only(self.ds, self.since)


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DownstairsFactory]:
    made = DownstairsFactory(tmp_path_factory.mktemp("hostile"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def ds(factory: DownstairsFactory) -> DownstairsProc:
    """One downstairs with default flags for every case that needs no special flag."""
    made = factory.create()
    run_bounded(upstairs_works(made), 60)  # something on disk, so "unchanged" means something
    return made


# -- memory ----------------------------------------------------------------------------------
def test_declared_payloads_before_negotiation_do_not_cost_memory(ds: DownstairsProc) -> None:
    """12 connections each send an 8-byte frame head that declares a 100 MiB frame (Crucible's
    largest) and never send the rest: the 64 KiB cap before negotiation refuses them on their
    length prefix; nothing is allocated for them."""
    head = struct.pack("<II", wire.MAX_FRAME, 30)  # a Write of 100 MiB

    async def main() -> None:
        hostile = Hostile(ds)
        base = proc_status(ds)["VmRSS"]
        conns = [await connect(ds) for _ in range(12)]
        try:
            for raw in conns:
                await raw.send(head)
            results = await asyncio.gather(
                *(closed_by_peer(raw.reader, 10) for raw in conns), return_exceptions=True
            )
            status = proc_status(ds)
            grown = max(status["VmRSS"], status["VmHWM"]) - base
            print(rss_line(base, status))
            assert grown < RSS_BUDGET, f"12 declared 100 MiB frames grew the downstairs by {grown >> 20} MiB"
            assert all(r == b"" for r in results), f"not every connection was closed: {results}"
        finally:
            close_all(conns)
        await wait_event(ds, hostile.since, "protocol_error", r"exceeds the frame cap 65536", count=12)
        await hostile.done()

    run_bounded(main(), 90)


def test_declared_payloads_after_negotiation_cost_only_what_arrives(factory: DownstairsFactory) -> None:
    """A read-only downstairs serves any number of upstairs; 12 negotiated sessions (cap now
    100 MiB) each send a Write head declaring 30 MiB of data and 64 KiB of it: the downstairs
    holds what arrived, its buffers grow with the bytes, not with the declared count."""
    ro = factory.create(flags=("--mode", "ro"))
    declared = 30 * 1024 * 1024

    async def main() -> None:
        hostile = Hostile(ro)
        base = proc_status(ro)["VmRSS"]
        conns = [await promote(ro, read_only=True) for _ in range(12)]
        try:
            for raw in conns:
                header = wire.WriteHeader(
                    raw.upstairs_id, raw.session_id, 1000, (), 0, (wire.BlockContext(0),)
                )
                encoded, _ = wire.encode_parts(m.Write(header, b""))
                frame_head = bytearray(encoded)
                struct.pack_into("<I", frame_head, 0, len(frame_head) + declared)
                struct.pack_into("<Q", frame_head, len(frame_head) - 8, declared)
                await raw.send(bytes(frame_head) + bytes(64 * 1024))
            # the downstairs has read every head (and sized its buffers) once less than one
            # recv() of each connection is left in the kernel (SO_RCVLOWAT may keep the rest)
            await poll_until(
                lambda: recv_queues_below(ro, 64 * 1024) == 12,
                "the downstairs to read each head",
                last=lambda: recv_queues_below(ro, 64 * 1024),
            )
            status = proc_status(ro)
            grown = max(status["VmRSS"], status["VmHWM"]) - base
            print(rss_line(base, status))
            assert grown < RSS_BUDGET, f"12 declared 30 MiB payloads grew the downstairs by {grown >> 20} MiB"
        finally:
            close_all(conns)
        await hostile.done(read_only=True)

    run_bounded(main(), 90)


def established(ds: DownstairsProc) -> int:
    """Established TCP connections on ``ds``'s listening port (its side; /proc/net/tcp)."""
    return recv_queues_below(ds, 1 << 62)


def recv_queues_below(ds: DownstairsProc, limit: int) -> int:
    """How many established TCP connections to ``ds``'s port have fewer than ``limit`` unread
    bytes in the kernel (/proc/net/tcp rx_queue)."""
    port = f"{ds.port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if local.endswith(":" + port) and state == "01" and int(queues.split(":")[1], 16) < limit:
            count += 1
    return count


# -- frames that do not decode, once negotiated -----------------------------------------------------
def _patched(msg: wire.Message, offset: int, old: bytes, new: bytes) -> bytes:
    """``msg``'s frame with the bytes at ``offset`` (which must be ``old``) replaced by ``new``
    (the length prefix follows the size change)."""
    frame = wire.encode(msg)
    assert frame[offset : offset + len(old)] == old, f"{type(msg).__name__}: layout changed"
    body = frame[:offset] + new + frame[offset + len(old) :]
    return struct.pack("<I", len(body)) + body[4:]


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


# Offsets: length 0, variant 4, upstairs id 8 (u64 16 + 16 bytes), session id 32, job id 56,
# dependencies 64 (count); ReadRequest: start 72, count 80; Flush: flush 72, gen 80, snapshot
# Option tag 88, its String length 89; Write: start 72, contexts count 80.
def _flush_with_snapshot(u: uuid.UUID, s: uuid.UUID) -> m.Flush:
    return m.Flush(u, s, 1000, (), 1, 1, wire.SnapshotDetails("x"), None)


def _read(u: uuid.UUID, s: uuid.UUID) -> m.ReadRequest:
    return m.ReadRequest(u, s, 1000, (), 0, 1)


def _write(u: uuid.UUID, s: uuid.UUID) -> m.Write:
    data = bytes(BLOCK_SIZE)
    return m.Write(wire.WriteHeader(u, s, 1000, (), 0, unencrypted_contexts(data, BLOCK_SIZE)), data)


UNDECODABLE = [
    pytest.param(
        lambda u, s: _patched(_read(u, s), 64, _u64(0), _u64(1 << 61)),
        r"count \d+ needs",
        id="deps-count-2^61",
    ),
    pytest.param(
        lambda u, s: _patched(_flush_with_snapshot(u, s), 89, _u64(1), _u64(1 << 62)),
        r"count \d+ needs|exceeds",
        id="snapshot-name-2^62",
    ),
    pytest.param(
        lambda u, s: _patched(_flush_with_snapshot(u, s), 88, b"\x01", b"\x07"),
        r"Option",
        id="option-tag-7",
    ),
    pytest.param(
        lambda u, s: _patched(_write(u, s), 80, _u64(1), _u64(1 << 40)),
        r"count \d+ needs",
        id="contexts-2^40",
    ),
    pytest.param(
        lambda u, s: _patched(_read(u, s), 8, _u64(16), _u64(60_000) + bytes(60_000 - 16)),
        r"UUID is 16 bytes, not 60000",
        id="uuid-of-60000-bytes",
    ),
    pytest.param(lambda u, s: struct.pack("<II", 8, 41), r"Unknown", id="unknown-variant-41-empty"),
]


@pytest.mark.parametrize(("build", "reason"), UNDECODABLE)
def test_an_undecodable_frame_after_negotiation_closes_only_that_connection(
    ds: DownstairsProc, build: Any, reason: str
) -> None:
    async def main() -> None:
        hostile = Hostile(ds)
        raw = await promote(ds)
        try:
            await raw.send(build(raw.upstairs_id, raw.session_id))
            assert await closed_by_peer(raw.reader) == b""
        finally:
            raw.abort()
        await wait_event(ds, hostile.since, "protocol_error", reason)
        longest = max(len(json.dumps(e)) for e in ds.events(hostile.since))
        assert longest < 2000, f"a log line of {longest} characters"
        await hostile.done()

    run_bounded(main(), 60)


# -- jobs out of range: an error reply, and the connection serves on -----------------------------
def _io_cases() -> list[Any]:
    def write(start: int, blocks: int, unwritten: bool = False) -> Any:
        def build(u: uuid.UUID, s: uuid.UUID) -> wire.Message:
            data = b"\x66" * (blocks * BLOCK_SIZE)
            header = wire.WriteHeader(u, s, 1000, (), start, unencrypted_contexts(data, BLOCK_SIZE))
            return (m.WriteUnwritten if unwritten else m.Write)(header, data)

        return build

    E = wire.ErrorKind
    return [
        pytest.param(write(TOTAL_BLOCKS - 1, 2), m.WriteAck, E.OffsetInvalid, id="write-straddling-the-end"),
        pytest.param(write(U64_MAX, 1), m.WriteAck, E.OffsetInvalid, id="write-at-u64-max"),
        pytest.param(
            write(TOTAL_BLOCKS - 1, 2, unwritten=True),
            m.WriteUnwrittenAck,
            E.OffsetInvalid,
            id="write-unwritten-straddling-the-end",
        ),
        pytest.param(
            lambda u, s: m.ReadRequest(u, s, 1000, (), U64_MAX, 1),
            m.ReadResponse,
            E.OffsetInvalid,
            id="read-at-u64-max",
        ),
        pytest.param(
            lambda u, s: m.ReadRequest(u, s, 1000, (), 1, U64_MAX),
            m.ReadResponse,
            (E.OffsetInvalid, E.InvalidNumberOfBlocks),
            id="read-count-u64-max",
        ),
        pytest.param(
            lambda u, s: m.Flush(u, s, 1000, (), 1, 1, None, 0xFFFF_FFFF),
            m.FlushAck,
            E.InvalidExtent,
            id="flush-extent-limit-u32-max",
        ),
        pytest.param(
            lambda u, s: m.ExtentLiveClose(u, s, 1000, (), 0xFFFF_FFFF),
            m.ExtentLiveCloseAck,
            E.InvalidExtent,
            id="live-close-eid-u32-max",
        ),
        pytest.param(
            lambda u, s: m.ExtentLiveReopen(u, s, 1000, (), EXTENT_COUNT),
            m.ExtentLiveAckId,
            E.InvalidExtent,
            id="live-reopen-eid-count",
        ),
    ]


@pytest.mark.parametrize(("build", "reply_kind", "error"), _io_cases())
def test_out_of_range_jobs_get_an_error_reply_and_the_connection_serves_on(
    ds: DownstairsProc, build: Any, reply_kind: type, error: Any
) -> None:
    async def main() -> None:
        hostile = Hostile(ds)
        raw = await promote(ds)
        try:
            await raw.send(build(raw.upstairs_id, raw.session_id))
            await raw.send(m.Ruok())
            reply = await raw.recv()
            assert isinstance(reply, reply_kind), f"expected {reply_kind.__name__}, got {reply}"
            result: object
            if isinstance(reply, m.ReadResponse):
                job_id, result, data = reply.header.job_id, reply.header.blocks, reply.data
            else:
                job_id, result, data = reply.job_id, reply.result, b""  # type: ignore[union-attr]
            assert job_id == 1000, reply
            assert isinstance(result, wire.CrucibleError), f"answered without an error: {reply}"
            assert result.kind in (error if isinstance(error, tuple) else (error,)), result
            assert data == b"", f"an error reply carries no data, got {len(data)} bytes"
            assert await raw.recv() == m.Imok(), "the connection stopped serving"
        finally:
            raw.abort()
        await hostile.done()

    run_bounded(main(), 60)


# -- garbage ---------------------------------------------------------------------------------
_rng = random.Random(12)
GARBAGE = [
    pytest.param(b"\xff" * 8, r"exceeds the frame cap", id="all-ones"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", r"exceeds the frame cap", id="http"),
    pytest.param(bytes.fromhex("160301020001") + bytes(64), r"exceeds the frame cap", id="tls-hello"),
    pytest.param(bytes(_rng.randrange(256) for _ in range(4096)), r".", id="random-4k"),
    pytest.param(struct.pack("<II", 100, 0) + bytes(92), r"HereIAm", id="zero-filled-here-i-am"),
]


@pytest.mark.parametrize(("data", "reason"), GARBAGE)
def test_garbage_closes_the_connection_with_a_log_line(ds: DownstairsProc, data: bytes, reason: str) -> None:
    async def main() -> None:
        hostile = Hostile(ds)
        raw = await connect(ds)
        try:
            await raw.send(data)
            assert await closed_by_peer(raw.reader, 15) == b""
        finally:
            raw.abort()
        await wait_event(ds, hostile.since, "protocol_error", reason)
        await hostile.done()

    run_bounded(main(), 60)


# -- slow handshakes -----------------------------------------------------------------------------
HANDSHAKE_S = 1.0


async def silent(_raw: Raw) -> None:
    pass


async def half_a_frame(raw: Raw) -> None:
    await raw.send(wire.encode(raw.hello())[:20])


async def stalls_before_promote(raw: Raw) -> None:
    await raw.send(raw.hello())
    assert isinstance(await raw.recv(), m.YesItsMe)


async def trickles(raw: Raw) -> None:
    # one byte per 100 ms: alive, but never done within the deadline
    data = wire.encode(raw.hello())
    for i in range(len(data) - 1):
        if raw.writer.is_closing():
            return
        raw.writer.write(data[i : i + 1])
        with contextlib.suppress(ConnectionError):
            await raw.writer.drain()
        await asyncio.sleep(0.1)  # the pace of the trickle, not a synchronisation


@pytest.fixture(scope="module")
def quick(factory: DownstairsFactory) -> DownstairsProc:
    return factory.create(flags=("--handshake-timeout", str(HANDSHAKE_S)))


@pytest.mark.parametrize(
    "act", [silent, half_a_frame, stalls_before_promote, trickles], ids=lambda f: f.__name__
)
def test_a_slow_handshake_is_closed_at_the_deadline(quick: DownstairsProc, act: Any) -> None:
    async def main() -> None:
        hostile = Hostile(quick)
        raw = await connect(quick)
        started = time.monotonic()
        trickle: asyncio.Task[None] | None = None
        try:
            if act is trickles:
                trickle = asyncio.create_task(act(raw))
            else:
                await act(raw)
            await closed_by_peer(raw.reader, 10 * HANDSHAKE_S + 10)
            took = time.monotonic() - started
        finally:
            if trickle is not None:
                trickle.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await trickle
            raw.abort()
        # (the server starts the clock at accept, a moment before our connect returns)
        assert took >= HANDSHAKE_S / 2, f"closed after {took:.2f} s, before the deadline"
        await wait_event(quick, hostile.since, "protocol_error", r"handshake not completed")
        await hostile.done()

    run_bounded(main(), 60)


def test_an_active_session_is_not_held_to_the_handshake_deadline(quick: DownstairsProc) -> None:
    """The deadline ends at YouAreNowActive: a promoted connection idle for longer serves on."""

    async def main() -> None:
        hostile = Hostile(quick)
        raw = await promote(quick)
        try:
            idle_until = time.monotonic() + 2 * HANDSHAKE_S
            while time.monotonic() < idle_until:  # idle, polling that it stays open
                assert not raw.reader.at_eof()
                await asyncio.sleep(0.1)  # the poll interval of a deadline-bounded wait
            await raw.send(m.Ruok())
            assert await raw.recv() == m.Imok()
        finally:
            raw.abort()
        await hostile.done()

    run_bounded(main(), 60)


# -- connection count ----------------------------------------------------------------------------
def test_connections_over_the_cap_are_closed_at_once(ds: DownstairsProc) -> None:
    """The default cap is 64 concurrent connections; the 65th and later are closed with a log
    line while the first 64 are still open; once those go, new connections are served.
    (``--max-connections N``: test_downstairs_conformance.py::
    test_ours_handshake_deadline_and_connection_cap.)"""

    async def main() -> None:
        hostile = Hostile(ds)
        held = [await connect(ds) for _ in range(64)]
        try:
            extra = [await connect(ds) for _ in range(6)]
            try:
                results = await asyncio.gather(
                    *(closed_by_peer(raw.reader, 5) for raw in extra), return_exceptions=True
                )
                assert all(r == b"" for r in results), f"connections over the cap were kept: {results}"
            finally:
                close_all(extra)
            await wait_event(ds, hostile.since, "connection_refused", r"64", count=6)
            # the first 64 are still open (established on the downstairs' side)
            assert established(ds) == 64, f"{established(ds)} connections open, expected the first 64"
        finally:
            close_all(held)
        await hostile.done()

    run_bounded(main(), 90)


# -- hostile ids ---------------------------------------------------------------------------------
def _with_uuid_length(msg: wire.Message, offset: int, length: int, body: bytes) -> bytes:
    return _patched(msg, offset, _u64(16), _u64(length) + body)


HOSTILE_IDS = [
    pytest.param(
        "here-i-am",
        lambda raw: _with_uuid_length(raw.hello(), 12, 60_000, bytes(60_000 - 16)),
        id="here-i-am-60k-id",
    ),
    pytest.param(
        "promote",
        lambda raw: _with_uuid_length(
            m.PromoteToActive(raw.upstairs_id, raw.session_id, 1), 8, 60_000, bytes(60_000 - 16)
        ),
        id="promote-60k-id",
    ),
    pytest.param(
        "promote",
        lambda raw: _with_uuid_length(
            m.PromoteToActive(raw.upstairs_id, raw.session_id, 1), 32, 1 << 40, b""
        ),
        id="promote-id-of-2^40-bytes",
    ),
    pytest.param(
        "promote",
        lambda raw: _with_uuid_length(m.PromoteToActive(raw.upstairs_id, raw.session_id, 1), 8, 0, b""),
        id="promote-empty-id",
    ),
]


@pytest.mark.parametrize(("when", "build"), HOSTILE_IDS)
def test_a_hostile_id_is_refused(ds: DownstairsProc, when: str, build: Any) -> None:
    """Ids are logged and echoed: one of 60 000 bytes must not become a 60 KB log line (and a
    UUID is 16 bytes on Crucible's wire: any other length is a malformed frame)."""

    async def main() -> None:
        hostile = Hostile(ds)
        raw = await connect(ds)
        try:
            if when == "promote":
                await raw.send(raw.hello(gen=next(GENS)))
                assert isinstance(await raw.recv(), m.YesItsMe)
            await raw.send(build(raw))
            assert await closed_by_peer(raw.reader) == b""
        finally:
            raw.abort()
        await wait_event(ds, hostile.since, "protocol_error", r"UUID is 16 bytes")
        longest = max(len(json.dumps(e)) for e in ds.events(hostile.since))
        assert longest < 2000, f"a log line of {longest} characters"
        await hostile.done()

    run_bounded(main(), 60)
