"""Hostile input on the downstairs wire: a real downstairs process against raw socket peers.

Each case asserts its clear outcome (an error reply, or the connection closed with a JSON log
line naming the problem), that nothing but JSON reached the downstairs' stderr (no
traceback), that the region files are byte-for-byte unchanged by the hostile part, and that
the downstairs then still serves a well-behaved upstairs (the real upstairs connection,
:class:`~sut.storage.client.DownstairsClient`: write, read back, flush).
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

from sut.storage.client import ClientState, DownstairsClient, RetryPolicy, SessionInfo
from sut.storage.protocol import MAX_FRAME_BYTES, PROTOCOL_VERSION, Message, encode, read_message

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
EXTENT_BYTES = BLOCK_SIZE * EXTENT_SIZE
RSS_BUDGET = 50 * 1024 * 1024  # what 12 hostile connections may add to a downstairs' memory


# -- raw peers ------------------------------------------------------------------------------
def frame(header: bytes, payload: bytes = b"", *, declared: int | None = None) -> bytes:
    """A JSON frame with any header; ``declared`` payload bytes claimed by the prefix."""
    n = len(payload) if declared is None else declared
    return struct.pack(">II", 4 + len(header) + n, len(header)) + header + payload


def ids(gen: int) -> dict[str, Any]:
    return {"upstairs_id": str(uuid.uuid4()), "session_id": f"hostile-{gen}", "gen": gen}


def hello(read_only: bool = False) -> bytes:
    fields = {"version": PROTOCOL_VERSION, "read_only": read_only, "encrypted": False, **ids(0)}
    return encode(Message("HereIAm", fields))


async def connect(ds: DownstairsProc) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", ds.port)


async def promote(
    ds: DownstairsProc, read_only: bool = False
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection that negotiated properly and is now active."""
    reader, writer = await connect(ds)
    writer.write(hello(read_only))
    await writer.drain()
    msg = await asyncio.wait_for(read_message(reader), 10)
    assert msg is not None and msg.kind == "YesItsMe", msg
    writer.write(encode(Message("PromoteToActive", ids(next(GENS)))))
    await writer.drain()
    msg = await asyncio.wait_for(read_message(reader), 10)
    assert msg is not None and msg.kind == "YouAreNowActive", msg
    return reader, writer


async def closed_by_peer(reader: asyncio.StreamReader, timeout_s: float = 10.0) -> bytes:
    """Wait for the downstairs to hang up; what it sent before (b"" normally)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout_s)
    except ConnectionResetError:
        return b""


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.transport.abort()


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
    assert ds.proc is not None
    out = {}
    for line in Path(f"/proc/{ds.proc.pid}/status").read_text().splitlines():
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
    """The real upstairs connection negotiates, writes, reads it back and flushes."""
    gen = next(GENS)
    session = SessionInfo(
        str(uuid.uuid4()), str(uuid.uuid4()), gen, read_only, False, BLOCK_SIZE, EXTENT_SIZE, EXTENT_COUNT
    )
    client = DownstairsClient(ds.target, session, FAST, lambda _c: None, logging.getLogger("hostile-wire"))
    client.start()
    try:
        await poll_until(
            lambda: client.state is ClientState.WAIT_QUORUM,
            f"a well-behaved upstairs to negotiate with {ds.target}",
            last=lambda: client.status(),
        )
        client.set_state(ClientState.ACTIVE)
        block = (gen * 8) % (EXTENT_SIZE * EXTENT_COUNT - 8)
        if not read_only:
            data = bytes([gen % 251]) * (8 * BLOCK_SIZE)
            await asyncio.wait_for(client.call("Write", {"block": block}, data), 10)
        reply = await asyncio.wait_for(client.call("Read", {"block": block, "count": 8}), 10)
        if not read_only:
            assert reply.payload == data and reply["written"] == "1" * 8, reply
            await asyncio.wait_for(client.call("Flush", {"flush_number": gen, "gen": gen}), 10)
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
        assert self.ds.proc is not None and self.ds.proc.poll() is None, "the downstairs died"
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
    """12 connections each send a 72-byte frame head that declares an 80 MiB payload (and never
    send it): the frame cap before negotiation refuses them; nothing is allocated for them."""
    header = b'{"type":"HereIAm","pad":"' + b"x" * 37 + b'"}'
    assert len(header) == 64
    head = frame(header, declared=MAX_FRAME_BYTES - 4 - len(header))
    assert len(head) == 72

    async def main() -> None:
        hostile = Hostile(ds)
        base = proc_status(ds)["VmRSS"]
        conns = [await connect(ds) for _ in range(12)]
        try:
            for _r, w in conns:
                w.write(head)
                await w.drain()
            results = await asyncio.gather(
                *(closed_by_peer(r, 10) for r, _w in conns), return_exceptions=True
            )
            status = proc_status(ds)
            grown = max(status["VmRSS"], status["VmHWM"]) - base
            print(rss_line(base, status))
            assert grown < RSS_BUDGET, f"12 declared 80 MiB payloads grew the downstairs by {grown >> 20} MiB"
            assert all(r == b"" for r in results), f"not every connection was closed: {results}"
        finally:
            close_all([w for _r, w in conns])
        await wait_event(ds, hostile.since, "protocol_error", r"exceeds", count=12)
        await hostile.done()

    run_bounded(main(), 90)


def test_declared_payloads_after_negotiation_cost_only_what_arrives(factory: DownstairsFactory) -> None:
    """A read-only downstairs serves any number of upstairs; 12 negotiated sessions each
    declare a 30 MiB payload and send 64 KiB of it: the downstairs holds what arrived."""
    ro = factory.create(flags=("--mode", "ro"))
    header = json.dumps({"type": "Write", "job_id": 1, "block": 0}).encode()

    async def main() -> None:
        hostile = Hostile(ro)
        base = proc_status(ro)["VmRSS"]
        conns = [await promote(ro, read_only=True) for _ in range(12)]
        try:
            for _r, w in conns:
                w.write(frame(header, bytes(64 * 1024), declared=30 * 1024 * 1024))
                await w.drain()
            await poll_until(
                lambda: all(w.transport.get_write_buffer_size() == 0 for _r, w in conns),
                "our bytes to leave",
            )
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
            close_all([w for _r, w in conns])
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


# -- header parsing ----------------------------------------------------------------------------
def nested(depth: int) -> bytes:
    return b'{"type":"HereIAm","x":' + b"[" * depth + b"]" * depth + b"}"


HEADERS = [
    pytest.param(nested(30_000), r"nesting deeper", id="deep-json-30k"),
    pytest.param(nested(100_000), r"exceeds|nesting deeper", id="deep-json-100k"),
    pytest.param(b'{"type":"HereIAm","version":' + b"7" * 5000 + b"}", r"digits", id="5000-digit-integer"),
    pytest.param(b'{"type":"HereIAm","version":-' + b"9" * 5000 + b"}", r"digits", id="negative-5000-digit"),
    pytest.param(b'{"type":"HereIAm","version":1e99999}', r"finite|out of range", id="float-overflow"),
    pytest.param(b'{"type":"HereIAm","version":NaN}', r"NaN", id="nan"),
    pytest.param(b'{"type":"HereIAm","version":"\xff\xfe"}', r"UTF-8|JSON", id="not-utf8"),
]


@pytest.mark.parametrize(("header", "reason"), HEADERS)
def test_hostile_headers_are_refused_with_a_log_line(ds: DownstairsProc, header: bytes, reason: str) -> None:
    async def main() -> None:
        hostile = Hostile(ds)
        reader, writer = await connect(ds)
        try:
            writer.write(frame(header))
            await writer.drain()
            assert await closed_by_peer(reader) == b""
        finally:
            writer.transport.abort()
        await wait_event(ds, hostile.since, "protocol_error", reason)
        await hostile.done()

    run_bounded(main(), 60)


def test_hostile_header_after_negotiation_closes_only_that_connection(ds: DownstairsProc) -> None:
    async def main() -> None:
        hostile = Hostile(ds)
        reader, writer = await promote(ds)
        try:
            writer.write(frame(b'{"type":"Read","job_id":1,"block":0,"count":' + b"1" * 5000 + b"}"))
            await writer.drain()
            assert await closed_by_peer(reader) == b""
        finally:
            writer.transport.abort()
        await wait_event(ds, hostile.since, "protocol_error", r"digits")
        await hostile.done()

    run_bounded(main(), 60)


# -- bounds of extent ids, blocks and counts -----------------------------------------------------
_BIG = 10**18
BAD_JOBS = [
    pytest.param(Message("ExtentFetch", {"job_id": 11, "eid": -1}), "ExtentData", id="fetch-eid-negative"),
    pytest.param(
        Message("ExtentFetch", {"job_id": 12, "eid": EXTENT_COUNT}), "ExtentData", id="fetch-eid-count"
    ),
    pytest.param(Message("ExtentFetch", {"job_id": 13, "eid": _BIG}), "ExtentData", id="fetch-eid-huge"),
    pytest.param(Message("ExtentFetch", {"job_id": 14, "eid": "3"}), "ExtentData", id="fetch-eid-string"),
    pytest.param(
        Message(
            "ExtentPut",
            {"job_id": 15, "eid": -1, "gen": 1, "flush": 1, "written": "ff" * (EXTENT_SIZE // 8)},
            bytes(EXTENT_BYTES),
        ),
        "ExtentPutAck",
        id="put-eid-negative",
    ),
    pytest.param(
        Message(
            "ExtentPut",
            {"job_id": 16, "eid": _BIG, "gen": 1, "flush": 1, "written": "ff" * (EXTENT_SIZE // 8)},
            bytes(EXTENT_BYTES),
        ),
        "ExtentPutAck",
        id="put-eid-huge",
    ),
    pytest.param(
        Message(
            "ExtentPut", {"job_id": 17, "eid": 0, "gen": -5, "flush": 1, "written": "zz"}, bytes(EXTENT_BYTES)
        ),
        "ExtentPutAck",
        id="put-bad-fields",
    ),
    pytest.param(
        Message("Read", {"job_id": 18, "block": -1, "count": 1}), "ReadResponse", id="read-block-negative"
    ),
    pytest.param(
        Message("Read", {"job_id": 19, "block": 0, "count": -8}), "ReadResponse", id="read-count-negative"
    ),
    pytest.param(
        Message("Read", {"job_id": 20, "block": _BIG, "count": 1}), "ReadResponse", id="read-block-huge"
    ),
    pytest.param(
        Message("Read", {"job_id": 21, "block": 0, "count": EXTENT_SIZE * EXTENT_COUNT + 1}),
        "ReadResponse",
        id="read-past-the-end",
    ),
    pytest.param(
        Message("Read", {"job_id": 22, "block": 1.5, "count": 1}), "ReadResponse", id="read-block-float"
    ),
    pytest.param(
        Message("Write", {"job_id": 23, "block": -1}, bytes(BLOCK_SIZE)),
        "WriteAck",
        id="write-block-negative",
    ),
    pytest.param(
        Message("Write", {"job_id": 24, "block": EXTENT_SIZE * EXTENT_COUNT}, bytes(BLOCK_SIZE)),
        "WriteAck",
        id="write-past-the-end",
    ),
    pytest.param(
        Message("Write", {"job_id": 25, "block": 0}, bytes(100)), "WriteAck", id="write-partial-block"
    ),
    pytest.param(
        Message("Flush", {"job_id": 26, "flush_number": 1, "gen": 1, "extent_limit": -1}),
        "FlushAck",
        id="flush-limit",
    ),
    pytest.param(
        Message("Flush", {"job_id": 27, "flush_number": "x", "gen": 1}), "FlushAck", id="flush-number"
    ),
]


@pytest.mark.parametrize(("job", "reply_kind"), BAD_JOBS)
def test_out_of_range_jobs_get_an_error_reply_and_the_connection_serves_on(
    ds: DownstairsProc, job: Message, reply_kind: str
) -> None:
    async def main() -> None:
        hostile = Hostile(ds)
        reader, writer = await promote(ds)
        try:
            writer.write(encode(job))
            writer.write(encode(Message("Ruok")))
            await writer.drain()
            reply = await asyncio.wait_for(read_message(reader), 10)
            assert reply is not None, f"{job.kind} {job.fields}: connection closed without a reply"
            kind, fields, data_bytes = reply.kind, dict(reply.fields), len(reply.payload)
            assert kind == reply_kind and fields["job_id"] == job["job_id"], (kind, fields)
            error = fields.get("error")
            assert error, f"{job.kind} {job.fields} was answered without an error: {kind} {fields}"
            assert data_bytes == 0, f"an error reply carries no data, got {data_bytes} bytes"
            alive = await asyncio.wait_for(read_message(reader), 10)
            assert alive is not None and alive.kind == "Imok", f"the connection stopped serving: {alive}"
        finally:
            writer.transport.abort()
        await hostile.done()

    run_bounded(main(), 60)


# -- garbage ---------------------------------------------------------------------------------
_rng = random.Random(12)
GARBAGE = [
    pytest.param(bytes(8), r"smaller than", id="zero-frame"),
    pytest.param(b"\xff" * 8, r"exceeds|unknown binary", id="all-ones"),
    pytest.param(
        struct.pack(">II", 12, 0x8000_0000 | 99) + bytes(8), r"unknown binary message code", id="bad-code"
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", r"exceeds|does not fit", id="http"),
    pytest.param(bytes(_rng.randrange(256) for _ in range(4096)), r".", id="random-4k"),
    pytest.param(frame(b"\x00" * 100), r"JSON", id="nul-header"),
]


@pytest.mark.parametrize(("data", "reason"), GARBAGE)
def test_garbage_closes_the_connection_with_a_log_line(ds: DownstairsProc, data: bytes, reason: str) -> None:
    async def main() -> None:
        hostile = Hostile(ds)
        reader, writer = await connect(ds)
        try:
            writer.write(data)
            await writer.drain()
            assert await closed_by_peer(reader, 15) == b""
        finally:
            writer.transport.abort()
        await wait_event(ds, hostile.since, "protocol_error", reason)
        await hostile.done()

    run_bounded(main(), 60)


# -- slow handshakes -----------------------------------------------------------------------------
HANDSHAKE_S = 1.0


async def silent(_reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
    pass


async def half_a_frame(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(hello()[:20])
    await writer.drain()


async def stalls_before_promote(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(hello())
    await writer.drain()
    msg = await asyncio.wait_for(read_message(reader), 10)
    assert msg is not None and msg.kind == "YesItsMe", msg


async def trickles(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # one byte per 100 ms: alive, but never done within the deadline
    data = hello()
    for i in range(len(data) - 1):
        if writer.is_closing():
            return
        writer.write(data[i : i + 1])
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        await asyncio.sleep(0.1)  # the pace of the trickle, not a synchronisation


SLOW = [silent, half_a_frame, stalls_before_promote]


@pytest.fixture(scope="module")
def quick(factory: DownstairsFactory) -> DownstairsProc:
    return factory.create(flags=("--handshake-timeout", str(HANDSHAKE_S)))


@pytest.mark.parametrize("act", [*SLOW, trickles], ids=lambda f: f.__name__)
def test_a_slow_handshake_is_closed_at_the_deadline(quick: DownstairsProc, act: Any) -> None:
    async def main() -> None:
        hostile = Hostile(quick)
        reader, writer = await connect(quick)
        started = time.monotonic()
        trickle: asyncio.Task[None] | None = None
        try:
            if act is trickles:
                trickle = asyncio.create_task(act(reader, writer))
            else:
                await act(reader, writer)
            await closed_by_peer(reader, 10 * HANDSHAKE_S + 10)
            took = time.monotonic() - started
        finally:
            if trickle is not None:
                trickle.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await trickle
            writer.transport.abort()
        # (the server starts the clock at accept, a moment before our connect returns)
        assert took >= HANDSHAKE_S / 2, f"closed after {took:.2f} s, before the deadline"
        await wait_event(quick, hostile.since, "protocol_error", r"handshake")
        await hostile.done()

    run_bounded(main(), 60)


# -- connection count ----------------------------------------------------------------------------
def test_connections_over_the_cap_are_closed_at_once(ds: DownstairsProc) -> None:
    """The default cap is 64 concurrent connections; the 65th and later are closed with a log
    line while the first 64 are still open; once those go, new connections are served."""

    async def main() -> None:
        hostile = Hostile(ds)
        held = [await connect(ds) for _ in range(64)]
        try:
            extra = [await connect(ds) for _ in range(6)]
            try:
                results = await asyncio.gather(
                    *(closed_by_peer(r, 5) for r, _w in extra), return_exceptions=True
                )
                assert all(r == b"" for r in results), f"connections over the cap were kept: {results}"
            finally:
                close_all([w for _r, w in extra])
            await wait_event(ds, hostile.since, "connection_refused", r"64", count=6)
            # the first 64 are still open (established on the downstairs' side)
            assert established(ds) == 64, f"{established(ds)} connections open, expected the first 64"
        finally:
            close_all([w for _r, w in held])
        await hostile.done()

    run_bounded(main(), 90)


def test_max_connections_flag(factory: DownstairsFactory) -> None:
    capped = factory.create(flags=("--max-connections", "3"))

    async def main() -> None:
        hostile = Hostile(capped)
        held = [await connect(capped) for _ in range(3)]
        try:
            reader, writer = await connect(capped)
            try:
                assert await closed_by_peer(reader, 5) == b""
            finally:
                writer.transport.abort()
            await wait_event(capped, hostile.since, "connection_refused", r"3")
        finally:
            close_all([w for _r, w in held])
        # the held ones are gone: the slots are free again
        await hostile.done()

    run_bounded(main(), 60)


@pytest.mark.parametrize(
    "upstairs_id",
    [
        pytest.param("u" * 60_000, id="60k-id"),
        pytest.param(["a"] * 3, id="list-id"),
        pytest.param("", id="empty"),
    ],
)
def test_promote_with_a_hostile_id_is_refused(ds: DownstairsProc, upstairs_id: object) -> None:
    """Ids are logged and echoed: one of 60 000 characters must not become a 60 KB log line."""

    async def main() -> None:
        hostile = Hostile(ds)
        reader, writer = await connect(ds)
        try:
            writer.write(hello())
            await writer.drain()
            msg = await asyncio.wait_for(read_message(reader), 10)
            assert msg is not None and msg.kind == "YesItsMe", msg
            fields = {**ids(next(GENS)), "upstairs_id": upstairs_id}
            writer.write(frame(json.dumps({"type": "PromoteToActive", **fields}).encode()))
            await writer.drain()
            assert await closed_by_peer(reader) == b""
        finally:
            writer.transport.abort()
        await wait_event(ds, hostile.since, "protocol_error", r"upstairs_id must be a string")
        longest = max(len(json.dumps(e)) for e in ds.events(hostile.since))
        assert longest < 2000, f"a log line of {longest} characters"
        await hostile.done()

    run_bounded(main(), 60)
