"""The upstairs' connection (sut.storage.client, Crucible's protocol v13) against a hostile
downstairs: a scripted fake on loopback that speaks through our codec (sut.storage.wire).

A reply the upstairs cannot trust (a frame over the cap, an undecodable frame, another
session's ids, a reply that does not fit its job, a read whose blocks do not match their
hashes, a message no active downstairs sends) FAULTS that downstairs: the job fails, the
client records why and reconnects (the upstairs would live-repair it); nothing escapes to the
event loop's exception handler, and no buffer is sized by what a hostile length prefix
declares. During negotiation the same only fails that attempt; the client keeps retrying, as
Crucible does. A reply to a job this connection does not have is ignored (the job may have
failed meanwhile). The real downstairs is exercised in tests/integration/storage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import struct
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sut.storage import wire
from sut.storage.client import (
    ClientState,
    DownstairsClient,
    FlushOp,
    Op,
    ReadOp,
    RetryPolicy,
    SessionInfo,
    WriteOp,
)
from sut.storage.errors import StorageError
from sut.storage.wire import messages as m
from sut.storage.wire.blockhash import block_hash, unencrypted_contexts

BS, EXTENT, COUNT = 512, 16, 4
U, S = uuid.UUID(int=0x5EED), uuid.UUID(int=0x5E55)
OTHER = uuid.UUID(int=0xBAD)
POLICY = RetryPolicy(connect_timeout_s=2.0, reconnect_delay_s=0.05, io_timeout_s=5.0, keepalive_s=0.5)
SESSION = SessionInfo(U, S, 3, False, False, BS, EXTENT, COUNT)
REGION = wire.RegionDefinition(BS, wire.ExtentSize(EXTENT, 9), COUNT, uuid.UUID(int=7), False, 1, 1)
BLOCK = b"\x07" * BS
JOB = 1000  # the read every active case submits

Reply = Callable[[Any], bytes]  # the hostile answer to a job (given its request)


def read_response(
    req: m.ReadRequest,
    blocks: tuple[wire.ReadBlockContext, ...] | None = None,
    data: bytes = BLOCK,
    ids: tuple[uuid.UUID, uuid.UUID] = (U, S),
) -> bytes:
    """A well-formed ReadResponse frame (contexts default to the true hash of each block)."""
    if blocks is None:
        blocks = tuple(
            wire.ReadBlockUnencrypted(block_hash(data[i : i + BS])) for i in range(0, len(data), BS)
        )
    return wire.encode(m.ReadResponse(wire.ReadResponseHeader(*ids, req.job_id, blocks), data))


def head(length: int, variant: int) -> bytes:
    """A frame's first 8 bytes, claiming ``length`` (the rest never follows)."""
    return struct.pack("<II", length, variant)


def huge_vec_count(job_id: int) -> bytes:
    """An empty ReadResponse whose block-context count says 2^60 (its data count 0 follows)."""
    frame = wire.encode(m.ReadResponse(wire.ReadResponseHeader(U, S, job_id, ()), b""))
    body = frame[:-16] + struct.pack("<QQ", 1 << 60, 0)
    return struct.pack("<I", len(body)) + body[4:]


ACTIVE_CASES: list[tuple[str, Reply, str]] = [
    # a length prefix over Crucible's 100 MiB: refused on its first 4 bytes, nothing allocated
    ("frame-over-the-cap", lambda req: head(wire.MAX_FRAME + 1, 37), r"exceeds the frame cap"),
    ("unknown-variant", lambda req: head(8, 99), r"not one of the 42 variants"),
    # a ReadResponse whose Vec count claims 2^60 contexts: bounded by the bytes present
    ("vec-count-beyond-the-frame", lambda req: huge_vec_count(req.job_id), r"ReadResponse.*count"),
    ("other-session", lambda req: read_response(req, ids=(U, OTHER)), r"for another session"),
    ("other-upstairs", lambda req: read_response(req, ids=(OTHER, S)), r"for another session"),
    (
        "wrong-reply-kind",
        lambda req: wire.encode(m.WriteAck(U, S, req.job_id, None)),
        r"answered with WriteAck",
    ),
    ("two-blocks-for-one", lambda req: read_response(req, data=BLOCK * 2), r"has 2 block contexts"),
    (
        "data-shorter-than-the-block",
        lambda req: read_response(req, (wire.ReadBlockUnencrypted(block_hash(BLOCK[:100])),), BLOCK[:100]),
        r"1 block contexts and 100 bytes",
    ),
    (
        "wrong-hash",
        lambda req: read_response(req, (wire.ReadBlockUnencrypted(block_hash(BLOCK) ^ 1),)),
        r"do not match their hashes",
    ),
    ("empty-but-not-zeros", lambda req: read_response(req, (wire.ReadBlockEmpty(),)), r"do not match"),
    (
        "encrypted-context-on-a-plain-region",
        lambda req: read_response(
            req, (wire.ReadBlockEncrypted(wire.EncryptionContext(bytes(12), bytes(16))),)
        ),
        r"do not match",
    ),
    ("region-info-while-active", lambda req: wire.encode(m.RegionInfo(REGION)), r"unexpected RegionInfo"),
    ("uuid-mismatch", lambda req: wire.encode(m.UuidMismatch(OTHER)), r"our ids are wrong"),
    ("repair-ack-never-asked", lambda req: wire.encode(m.RepairAckId(7)), r"did not ask for"),
]


class FakeDownstairs:
    """Negotiates like a downstairs, except where ``negotiation`` names a request whose answer
    is replaced by raw bytes (then it waits for the client to hang up); once running, answers
    every ReadRequest, Write or Flush with what ``replies`` build, then what ``reply`` builds.
    Counts its connections and records what arrived on each; connection i (from 0) reports
    region ``region_uuids[i]`` (the last one for later connections); ``hang_up_after_job``
    ends the first connection right after its first job's answer."""

    def __init__(
        self,
        reply: Reply | None = None,
        negotiation: dict[type, bytes] | None = None,
        replies: list[Reply] | None = None,
        region_uuids: list[uuid.UUID] | None = None,
        hang_up_after_job: bool = False,
    ) -> None:
        self.reply = reply
        self.replies = replies or []
        self.negotiation = negotiation or {}
        self.region_uuids = region_uuids or [REGION.uuid]
        self.hang_up_after_job = hang_up_after_job
        self.connections = 0
        self.received: list[list[type]] = []
        self.port = 0

    def answer(self, msg: wire.Message) -> bytes:
        if type(msg) in self.negotiation:
            return self.negotiation[type(msg)]
        if isinstance(msg, m.HereIAm):
            return wire.encode(m.YesItsMe(13, wire.SocketAddr.parse("127.0.0.1", 1)))
        if isinstance(msg, m.PromoteToActive):
            return wire.encode(m.YouAreNowActive(msg.upstairs_id, msg.session_id, msg.generation))
        if isinstance(msg, m.RegionInfoPlease):
            region_uuid = self.region_uuids[min(self.connections, len(self.region_uuids)) - 1]
            return wire.encode(m.RegionInfo(dataclasses.replace(REGION, uuid=region_uuid)))
        if isinstance(msg, m.ExtentVersionsPlease):
            return wire.encode(m.ExtentVersions((1,) * COUNT, (1,) * COUNT, (False,) * COUNT))
        if isinstance(msg, m.Ruok):
            return wire.encode(m.Imok())
        if isinstance(msg, m.ReadRequest | m.Write | m.Flush):
            out = b"".join(r(msg) for r in self.replies)
            return out + (self.reply(msg) if self.reply is not None else b"")
        return b""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        received: list[type] = []
        self.received.append(received)
        frames = wire.FrameAssembler(wire.MAX_FRAME)
        try:
            while chunk := await reader.read(1 << 16):
                for msg in frames.feed(chunk):
                    received.append(type(msg))
                    writer.write(self.answer(msg))
                    if type(msg) in self.negotiation:
                        await writer.drain()
                        await reader.read()  # until the client gives up on us
                        return
                    if self.hang_up_after_job and self.connections == 1 and isinstance(msg, m.Write):
                        await writer.drain()
                        return
                await writer.drain()
        except (ConnectionError, wire.BincodeError):
            pass
        finally:
            writer.close()


async def with_client(
    fake: FakeDownstairs,
    body: Callable[[DownstairsClient], Awaitable[None]],
    on_change: Callable[[DownstairsClient], None] = lambda _c: None,
) -> list[Any]:
    """Run ``body`` against a client of ``fake``; returns what reached the loop's exception handler."""
    loop = asyncio.get_running_loop()
    leaked: list[Any] = []
    loop.set_exception_handler(lambda _loop, context: leaked.append(context))
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    client = DownstairsClient(f"127.0.0.1:{fake.port}", 0, SESSION, POLICY, on_change, logging.getLogger("t"))
    client.start()
    try:
        await body(client)
    finally:
        await client.stop()
        server.close()
        await server.wait_closed()
    return leaked


async def poll(
    predicate: Callable[[], bool], what: str, last: Callable[[], object], timeout_s: float = 10
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last saw {last()}")
        await asyncio.sleep(0.02)  # poll interval


async def negotiated(client: DownstairsClient) -> None:
    await poll(lambda: client.state is ClientState.WAIT_QUORUM, "negotiation", client.status)
    client.set_state(ClientState.ACTIVE)


def run(coro: Awaitable[list[Any]]) -> list[Any]:
    async def bounded() -> list[Any]:
        return await asyncio.wait_for(coro, 60)

    return asyncio.run(bounded())


@pytest.mark.parametrize(("name", "reply", "reason"), ACTIVE_CASES, ids=[c[0] for c in ACTIVE_CASES])
def test_a_hostile_reply_faults_that_downstairs(name: str, reply: Reply, reason: str) -> None:
    fake = FakeDownstairs(reply)
    seen: dict[str, Any] = {}

    async def body(client: DownstairsClient) -> None:
        await negotiated(client)
        tracemalloc.start()
        try:
            future = client.submit(JOB, (), ReadOp(0, 1))
            with pytest.raises(StorageError) as info:
                await asyncio.wait_for(future, 10)
            await poll(lambda: client.fault_count >= 1, "the downstairs to be faulted", client.status)
            seen["peak"] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        seen["job_error"] = str(info.value)
        seen["status"] = client.status()
        # it reconnects (and would be live-repaired by the upstairs)
        await poll(lambda: fake.connections >= 2, "a reconnection", client.status)

    leaked = run(with_client(fake, body))
    assert not leaked, f"exceptions reached the event loop: {leaked}"
    status = seen["status"]
    assert status["state"] == "faulted" and status["fault_count"] == 1, status
    assert re.search(reason, str(status["last_error"])), status
    if "hash" in name or "empty" in name or "encrypted" in name:
        assert status["hash_mismatches"] == 1, status
    assert seen["peak"] < 8 << 20, f"{name}: {seen['peak']} bytes allocated while faulting"


def test_a_reply_to_a_job_it_does_not_have_is_ignored() -> None:
    """Acks for jobs never sent (or already failed) are dropped; the real reply still counts."""
    unknown: list[Reply] = [
        lambda req: wire.encode(m.WriteAck(U, S, req.job_id + 77, None)),
        lambda req: wire.encode(m.FlushAck(U, S, 1, None)),
        lambda req: read_response(m.ReadRequest(U, S, req.job_id - 1, (), 0, 1)),
    ]
    fake = FakeDownstairs(read_response, replies=unknown)
    seen: dict[str, Any] = {}

    async def body(client: DownstairsClient) -> None:
        await negotiated(client)
        reply = await asyncio.wait_for(client.submit(JOB, (), ReadOp(0, 1)), 10)
        assert isinstance(reply, m.ReadResponse) and reply.data == BLOCK
        seen["status"] = client.status()

    leaked = run(with_client(fake, body))
    assert not leaked, leaked
    assert seen["status"]["state"] == "active" and seen["status"]["fault_count"] == 0, seen["status"]
    assert fake.connections == 1


IO_ERROR = wire.CrucibleError(wire.ErrorKind.IoError, "disk on fire")
FAILED_JOBS: list[tuple[str, Op, Reply, bool]] = [
    (
        "read",
        ReadOp(0, 1),
        lambda req: wire.encode(m.ReadResponse(wire.ReadResponseHeader(U, S, req.job_id, IO_ERROR), b"")),
        False,
    ),
    (
        "write",
        WriteOp(0, BLOCK, unencrypted_contexts(BLOCK, BS)),
        lambda req: wire.encode(m.WriteAck(U, S, req.header.job_id, IO_ERROR)),
        True,
    ),
    ("flush", FlushOp(1, 3), lambda req: wire.encode(m.FlushAck(U, S, req.job_id, IO_ERROR)), True),
]


@pytest.mark.parametrize(("name", "op", "reply", "faults"), FAILED_JOBS, ids=[c[0] for c in FAILED_JOBS])
def test_a_failed_write_or_flush_faults_that_downstairs_a_failed_read_does_not(
    name: str, op: Op, reply: Reply, faults: bool
) -> None:
    """A job acked with Err: a write or flush may have left this copy different from the
    others, so the downstairs is faulted (status names the job and the error); a failed read
    changed nothing, so only that read fails (the upstairs retries it on another downstairs)."""
    fake = FakeDownstairs(reply)
    seen: dict[str, Any] = {}

    async def body(client: DownstairsClient) -> None:
        await negotiated(client)
        with pytest.raises(StorageError, match="disk on fire"):
            await asyncio.wait_for(client.submit(JOB, (), op), 10)
        if faults:
            await poll(lambda: client.fault_count >= 1, "the downstairs to be faulted", client.status)
            await poll(lambda: fake.connections >= 2, "a reconnection", client.status)
        else:  # the connection still serves: the next read is answered (with the same error)
            with pytest.raises(StorageError, match="disk on fire"):
                await asyncio.wait_for(client.submit(JOB + 1, (), ReadOp(0, 1)), 10)
        seen["status"] = client.status()

    leaked = run(with_client(fake, body))
    assert not leaked, leaked
    status = seen["status"]
    if faults:
        assert status["fault_count"] == 1, status
        assert re.search(
            rf"{type(op).__name__} job {JOB} failed: .*disk on fire", str(status["last_error"])
        ), status
    else:
        assert status["state"] == "active" and status["fault_count"] == 0, status
        assert fake.connections == 1


NEGOTIATION_CASES: list[tuple[str, dict[type, bytes], str]] = [
    # before the downstairs promoted us the cap is 64 KiB: a bigger claim is refused at once
    (
        "yes-its-me-over-the-cap",
        {m.HereIAm: head(wire.NEGOTIATION_FRAME_CAP + 1, 1)},
        r"exceeds the frame cap 65536",
    ),
    ("yes-its-me-claiming-100MiB", {m.HereIAm: head(wire.MAX_FRAME, 1)}, r"exceeds the frame cap"),
    ("garbage", {m.HereIAm: struct.pack("<I", 16) + b"\xff" * 12}, r"variants"),
    ("region-info-for-yes-its-me", {m.HereIAm: wire.encode(m.RegionInfo(REGION))}, r"expected YesItsMe"),
    (
        "uuid-mismatch-for-the-promote",
        {m.PromoteToActive: wire.encode(m.UuidMismatch(OTHER))},
        r"UuidMismatch",
    ),
    # promoted, the cap is what ExtentVersions of this region needs (64 KiB here): 20 000
    # extents' worth is refused by its length prefix
    (
        "extent-versions-over-its-size",
        {
            m.ExtentVersionsPlease: wire.encode(
                m.ExtentVersions((1,) * 20_000, (1,) * 20_000, (False,) * 20_000)
            )
        },
        r"exceeds the frame cap",
    ),
    (
        "extent-versions-of-the-wrong-length",
        {m.ExtentVersionsPlease: wire.encode(m.ExtentVersions((1,), (1,) * COUNT, (False,) * COUNT))},
        r"ExtentVersions describes 1/4/4 extents, the region has 4",
    ),
    (
        "extent-versions-of-another-region",
        {m.ExtentVersionsPlease: wire.encode(m.ExtentVersions((1,) * 9, (1,) * 9, (False,) * 9))},
        r"ExtentVersions describes 9/9/9",
    ),
]


@pytest.mark.parametrize(
    ("name", "answers", "reason"), NEGOTIATION_CASES, ids=[c[0] for c in NEGOTIATION_CASES]
)
def test_a_hostile_negotiation_fails_that_attempt_only(
    name: str, answers: dict[type, bytes], reason: str
) -> None:
    fake = FakeDownstairs(negotiation=answers)
    seen: dict[str, Any] = {}

    async def body(client: DownstairsClient) -> None:
        tracemalloc.start()
        try:
            await poll(lambda: client.failed_attempts >= 2, "two failed attempts", client.status)
            seen["peak"] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        seen["status"] = client.status()

    leaked = run(with_client(fake, body))
    assert not leaked, f"exceptions reached the event loop: {leaked}"
    status = seen["status"]
    assert status["state"] != "disabled", status  # it keeps trying, as Crucible does
    assert status["fault_count"] == 0, status  # nothing was serving yet: nothing to repair
    assert re.search(reason, str(status["last_error"])), status
    assert fake.connections >= 2
    assert seen["peak"] < 8 << 20, f"{name}: {seen['peak']} bytes allocated"


def _promoted_as(**change: object) -> Callable[[m.PromoteToActive], bytes]:
    def answer(promote: m.PromoteToActive) -> bytes:
        fields = {"upstairs_id": promote.upstairs_id, "session_id": promote.session_id}
        fields["generation"] = promote.generation  # type: ignore[assignment]
        fields.update(change)  # type: ignore[arg-type]
        return wire.encode(m.YouAreNowActive(**fields))  # type: ignore[arg-type]

    return answer


FOREIGN_CASES: list[tuple[str, type, Callable[[Any], bytes], str]] = [
    (
        "yes-its-me-version-12",
        m.HereIAm,
        lambda _hello: wire.encode(m.YesItsMe(12, wire.SocketAddr.parse("127.0.0.1", 1))),
        r"(?i)version",
    ),
    ("now-active-other-upstairs", m.PromoteToActive, _promoted_as(upstairs_id=OTHER), r"YouAreNowActive"),
    ("now-active-other-session", m.PromoteToActive, _promoted_as(session_id=OTHER), r"YouAreNowActive"),
    ("now-active-other-generation", m.PromoteToActive, _promoted_as(generation=9), r"YouAreNowActive"),
]


@pytest.mark.parametrize(
    ("name", "request_type", "answer", "reason"), FOREIGN_CASES, ids=[c[0] for c in FOREIGN_CASES]
)
def test_a_negotiation_answer_for_someone_else_is_refused(
    name: str, request_type: type, answer: Callable[[Any], bytes], reason: str
) -> None:
    """Crucible's upstairs (upstairs/src/client.rs, ``continue_negotiation``) refuses a YesItsMe
    whose version is not 13 (IncompatibleVersion) and a YouAreNowActive whose upstairs id,
    session id or generation is not its own (UpstairsIdMismatch / SessionIdMismatch /
    GenerationNumberTooLow): a downstairs that promoted someone else has not promoted us. The
    attempt fails (or the client gives up on that downstairs); it never reaches wait_quorum."""
    fake = FakeDownstairs()
    plain = fake.answer
    fake.answer = lambda msg: answer(msg) if isinstance(msg, request_type) else plain(msg)  # type: ignore[method-assign]
    seen: dict[str, Any] = {}
    states: list[str] = []

    async def body(client: DownstairsClient) -> None:
        await poll(
            lambda: (
                client.failed_attempts >= 1 or client.state in (ClientState.DISABLED, ClientState.WAIT_QUORUM)
            ),
            "the attempt to end",
            client.status,
            timeout_s=5,
        )
        seen["status"] = client.status()

    leaked = run(with_client(fake, body, on_change=lambda c: states.append(c.state.value)))
    assert not leaked, leaked
    assert "wait_quorum" not in states, f"{name}: negotiated with it anyway ({states})"
    assert re.search(reason, str(seen["status"]["last_error"])), seen["status"]


def test_a_downstairs_back_with_another_region_is_not_replayed_onto() -> None:
    """Crucible's upstairs remembers each downstairs' region UUID (client.rs, RegionInfo): one
    that comes back with another region while active is not the copy it left - Crucible
    panics rather than go on. The backlog of an offline downstairs (writes since its last
    flush) may only be replayed (``LastFlush`` + the jobs) onto the SAME region; replayed onto
    another it would leave a copy that holds only those writes, taken for a good one."""
    other_region = uuid.UUID(int=0x0DD)
    fake = FakeDownstairs(
        lambda req: wire.encode(m.WriteAck(U, S, req.header.job_id, None)),
        region_uuids=[REGION.uuid, other_region],
        hang_up_after_job=True,
    )
    seen: dict[str, Any] = {}

    async def body(client: DownstairsClient) -> None:
        await negotiated(client)
        await asyncio.wait_for(client.submit(JOB, (), WriteOp(0, BLOCK, unencrypted_contexts(BLOCK, BS))), 10)
        # the downstairs hung up after the ack: offline, the write kept for a replay
        await poll(lambda: fake.connections >= 2, "a reconnection", client.status)
        await poll(
            lambda: (
                (
                    len(fake.received) >= 2
                    and (m.LastFlush in fake.received[1] or m.ExtentVersionsPlease in fake.received[1])
                )
                or client.state is ClientState.DISABLED
                or client.failed_attempts >= 2
            ),
            "the second negotiation to end",
            client.status,
        )
        seen["status"] = client.status()

    leaked = run(with_client(fake, body))
    assert not leaked, leaked
    assert m.Write in fake.received[0]
    assert m.LastFlush not in fake.received[1], (
        f"replayed onto region {other_region} the backlog kept for region {REGION.uuid}: {fake.received[1]}, "
        f"status {seen['status']}"
    )
