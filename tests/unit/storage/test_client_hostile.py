"""The upstairs' connection against a hostile downstairs (a scripted fake on loopback).

A reply the upstairs cannot trust (a declared payload over the limit, a header that is not
acceptable JSON, deep nesting, a reply that does not fit its job) faults THAT downstairs: the
job fails, the client records why and reconnects; nothing escapes to the event loop's
exception handler, and no buffer is sized by what a hostile head declares.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import struct
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sut.storage.client import ClientState, DownstairsClient, RetryPolicy, SessionInfo
from sut.storage.errors import StorageError
from sut.storage.protocol import MAX_FRAME_BYTES, PROTOCOL_VERSION, Message, encode, read_message

BS, EXTENT, COUNT = 512, 16, 4
POLICY = RetryPolicy(connect_timeout_s=2.0, reconnect_delay_s=0.05, io_timeout_s=5.0, keepalive_s=0.5)
SESSION = SessionInfo("up", "sess", 3, False, False, BS, EXTENT, COUNT)


def frame(header: bytes, payload: bytes = b"", *, declared: int | None = None) -> bytes:
    n = len(payload) if declared is None else declared
    return struct.pack(">II", 4 + len(header) + n, len(header)) + header + payload


def nested(depth: int) -> bytes:
    return (
        b'{"type":"ReadResponse","job_id":1,"error":null,"written":"1","x":'
        + b"[" * depth
        + b"]" * depth
        + b"}"
    )


Reply = Callable[[Message], bytes]  # the hostile answer to the first job (given that job)


def read_response(job: Message, **fields: Any) -> bytes:
    body = {"type": "ReadResponse", "job_id": job["job_id"], "error": None, "written": "1", **fields}
    return frame(json.dumps(body).encode(), b"\x07" * BS)


ACTIVE_CASES: list[tuple[str, Reply, str]] = [
    (
        "huge-declared-payload",
        lambda job: frame(
            json.dumps(
                {"type": "ReadResponse", "job_id": job["job_id"], "error": None, "written": "1"}
            ).encode(),
            declared=MAX_FRAME_BYTES - 200,
        ),
        r"exceeds",
    ),
    ("garbage-header", lambda job: frame(b"{definitely not json"), r"not valid JSON"),
    ("deep-json", lambda job: frame(nested(30_000)), r"nesting deeper"),
    (
        "huge-integer",
        lambda job: frame(b'{"type":"WriteAck","job_id":' + b"9" * 5000 + b',"error":null}'),
        r"digits",
    ),
    (
        "job-id-not-an-integer",
        lambda job: frame(b'{"type":"WriteAck","job_id":"one","error":null}'),
        r"job_id",
    ),
    (
        "short-read-payload",
        lambda job: frame(
            json.dumps(
                {"type": "ReadResponse", "job_id": job["job_id"], "error": None, "written": "1"}
            ).encode(),
            b"x" * 100,
        ),
        r"ReadResponse",
    ),
    ("written-map-mismatch", lambda job: read_response(job, written="1111"), r"written"),
]


class FakeDownstairs:
    """Negotiates like a downstairs (unless ``hostile_negotiation``), then answers the first job
    with ``reply``; counts its connections."""

    def __init__(
        self,
        reply: Reply | None = None,
        hostile_negotiation: bytes | None = None,
        versions: dict[str, Any] | None = None,
    ) -> None:
        self.reply = reply
        self.hostile_negotiation = hostile_negotiation
        self.versions = versions or {"gen": [1] * COUNT, "flush": [1] * COUNT, "dirty": [False] * COUNT}
        self.connections = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            hello = await read_message(reader)
            assert hello is not None and hello.kind == "HereIAm"
            if self.hostile_negotiation is not None:
                writer.write(self.hostile_negotiation)
                await writer.drain()
                await reader.read()
                return
            writer.write(encode(Message("YesItsMe", {"version": PROTOCOL_VERSION})))
            promote = await read_message(reader)
            assert promote is not None
            writer.write(encode(Message("YouAreNowActive", dict(promote.fields))))
            await read_message(reader)
            writer.write(
                encode(
                    Message(
                        "RegionInfo",
                        {
                            "block_size": BS,
                            "extent_size": EXTENT,
                            "extent_count": COUNT,
                            "uuid": "u",
                            "encrypted": False,
                        },
                    )
                )
            )
            await read_message(reader)
            writer.write(encode(Message("ExtentVersions", self.versions)))
            await writer.drain()
            while True:
                job = await read_message(reader)
                if job is None:
                    return
                if job.kind == "Ruok":
                    writer.write(encode(Message("Imok")))
                elif self.reply is not None:
                    writer.write(self.reply(job))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # noqa: BLE001 - a fake that cannot parse the client just hangs up
            pass
        finally:
            writer.close()


async def with_client(fake: FakeDownstairs, body: Callable[[DownstairsClient], Awaitable[None]]) -> list[Any]:
    """Run ``body`` against a client of ``fake``; returns what reached the loop's exception handler."""
    loop = asyncio.get_running_loop()
    leaked: list[Any] = []
    loop.set_exception_handler(lambda _loop, context: leaked.append(context))
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    client = DownstairsClient(
        f"127.0.0.1:{fake.port}", SESSION, POLICY, lambda _c: None, logging.getLogger("t")
    )
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


def run(coro: Awaitable[list[Any]]) -> list[Any]:
    async def bounded() -> list[Any]:
        return await asyncio.wait_for(coro, 60)

    return asyncio.run(bounded())


@pytest.mark.parametrize(("name", "reply", "reason"), ACTIVE_CASES, ids=[c[0] for c in ACTIVE_CASES])
def test_a_hostile_reply_faults_that_downstairs(name: str, reply: Reply, reason: str) -> None:
    fake = FakeDownstairs(reply)
    seen: dict[str, Any] = {}

    async def body(client: DownstairsClient) -> None:
        await poll(lambda: client.state is ClientState.WAIT_QUORUM, "negotiation", client.status)
        client.set_state(ClientState.ACTIVE)
        tracemalloc.start()
        try:
            future = client.submit("Read", {"block": 0, "count": 1})
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
    assert re.search(reason, str(seen["status"]["last_error"])), seen["status"]
    assert seen["peak"] < 8 << 20, f"{name}: {seen['peak']} bytes allocated while faulting"


NEGOTIATION_CASES = [
    (
        "huge-declared-payload",
        frame(b'{"type":"YesItsMe","version":2}', declared=MAX_FRAME_BYTES - 40),
        r"exceeds",
    ),
    ("deep-json", frame(b'{"type":"YesItsMe","version":' + b"[" * 30_000 + b"]" * 30_000 + b"}"), r"nesting"),
    ("garbage", b"\x00\x00\x00\x09\xff\xff\xff\xff\xff\xff\xff\xff\xff", r"."),
]


@pytest.mark.parametrize(("name", "data", "reason"), NEGOTIATION_CASES, ids=[c[0] for c in NEGOTIATION_CASES])
def test_a_hostile_negotiation_fails_that_attempt_only(name: str, data: bytes, reason: str) -> None:
    fake = FakeDownstairs(hostile_negotiation=data)
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
    assert seen["status"]["state"] != "disabled", seen["status"]  # it keeps trying, as Crucible does
    assert re.search(reason, str(seen["status"]["last_error"])), seen["status"]
    assert seen["peak"] < 8 << 20, f"{name}: {seen['peak']} bytes allocated"


def test_extent_versions_that_do_not_fit_the_region_fail_negotiation() -> None:
    fake = FakeDownstairs(versions={"gen": [1], "flush": "x", "dirty": [False] * COUNT})
    seen: dict[str, Any] = {}

    async def body(client: DownstairsClient) -> None:
        await poll(lambda: client.failed_attempts >= 1, "a failed attempt", client.status)
        seen["status"] = client.status()

    leaked = run(with_client(fake, body))
    assert not leaked, leaked
    assert "ExtentVersions" in str(seen["status"]["last_error"]), seen["status"]
