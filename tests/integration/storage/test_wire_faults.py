"""Wire hardening: a real downstairs process against misbehaving raw socket peers, and the
upstairs against downstairs started with the error-injection flags.

Every bad peer must lose THAT connection, leave a JSON log line naming the reason, and the
downstairs must go on serving a well-behaved upstairs (checked with real NBD I/O after each).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from sut.storage.backend import CrucibleBackend, RetryPolicy
from sut.storage.protocol import (
    MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    Message,
    encode,
    read_message,
)

from .conftest import (
    BLOCK_SIZE,
    EXTENT_COUNT,
    EXTENT_SIZE,
    DownstairsFactory,
    DownstairsProc,
    assert_regions_identical,
    make_vcr,
    poll_until,
    qemu_io,
    read_image,
    run_bounded,
)

pytestmark = pytest.mark.integration

FAST = RetryPolicy(connect_timeout_s=1.0, reconnect_delay_s=0.2)
REGION_BYTES = BLOCK_SIZE * EXTENT_SIZE * EXTENT_COUNT
VOLUME_ID = "2b7c1d9e-3f4a-4b5c-8d6e-7f8091a2b3c4"
RAW_IDS = {"upstairs_id": "a0a1a2a3-b4b5-4c6c-8d7d-e8e9eaebeced", "session_id": "raw-peer"}


# -- raw peers -----------------------------------------------------------------------------
def frame(header: bytes, payload: bytes = b"") -> bytes:
    """A frame with an arbitrary (possibly invalid) header, bypassing the codec's checks."""
    return struct.pack(">II", 4 + len(header) + len(payload), len(header)) + header + payload


def hello(gen: int = 0) -> bytes:
    return encode(
        Message(
            "HereIAm",
            {"version": PROTOCOL_VERSION, "gen": gen, "read_only": False, "encrypted": False, **RAW_IDS},
        )
    )


async def negotiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gen: object = 0) -> None:
    """HereIAm + PromoteToActive; ``gen`` may be invalid on purpose."""
    writer.write(hello())
    await writer.drain()
    msg = await asyncio.wait_for(read_message(reader), 10)
    assert msg is not None and msg.kind == "YesItsMe", msg
    writer.write(frame(json.dumps({"type": "PromoteToActive", "gen": gen, **RAW_IDS}).encode()))
    await writer.drain()


Peer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def sends(data: bytes) -> Peer:
    async def peer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return peer


async def truncated_then_close(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(struct.pack(">II", 1000, 20) + b"x" * 30)  # 38 of 1004 bytes
    await writer.drain()
    writer.close()


async def second_promote(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await negotiate(reader, writer)
    msg = await asyncio.wait_for(read_message(reader), 10)
    assert msg is not None and msg.kind == "YouAreNowActive", msg
    writer.write(encode(Message("PromoteToActive", {"gen": 0, **RAW_IDS})))
    await writer.drain()


async def promote_with_text_gen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await negotiate(reader, writer, gen="seven")


@dataclass(frozen=True)
class BadPeer:
    name: str
    act: Peer
    reason: str  # regex the downstairs' protocol_error reason must match
    closes_itself: bool = False


BAD_PEERS = [
    BadPeer("frame-too-long", sends(struct.pack(">II", MAX_FRAME_BYTES + 1, 16)), r"exceeds the maximum"),
    BadPeer("header-not-json", sends(frame(b"{this is not json")), r"header is not valid JSON"),
    BadPeer("header-not-an-object", sends(frame(b"[1, 2, 3]")), r"must be a JSON object"),
    BadPeer("header-longer-than-frame", sends(struct.pack(">II", 10, 100) + bytes(6)), r"does not fit"),
    BadPeer(
        "header-over-limit",
        sends(struct.pack(">II", MAX_HEADER_BYTES + 8, MAX_HEADER_BYTES + 1)),
        r"does not fit",
    ),
    BadPeer("unknown-message-type", sends(frame(b'{"type": "Bogus"}')), r"unknown message type 'Bogus'"),
    BadPeer("missing-field", sends(frame(b'{"type": "HereIAm", "version": 1}')), r"missing field"),
    BadPeer("truncated-then-close", truncated_then_close, r"closed mid-frame", closes_itself=True),
    BadPeer(
        "io-before-negotiation",
        sends(encode(Message("Write", {"job_id": 1, "block": 0}, bytes(BLOCK_SIZE)))),
        r"expected HereIAm, got Write",
    ),
    BadPeer("second-promote", second_promote, r"unexpected message PromoteToActive on an active connection"),
    BadPeer("promote-gen-not-integer", promote_with_text_gen, r"PromoteToActive\.gen must be an integer"),
]


async def no_session(ds: DownstairsProc) -> None:
    """Wait until no upstairs is active on ``ds``: a raw peer that promotes itself must not
    race with (or take over) the session of an upstairs that is just closing."""
    await poll_until(
        lambda: not ds.session_open(), f"{ds.target} to have no active session", last=lambda: ds.events()[-3:]
    )


async def misbehave(ds: DownstairsProc, peer: BadPeer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", ds.port)
    try:
        await peer.act(reader, writer)
        if not peer.closes_itself:
            # the downstairs must hang up on us (EOF or reset), not wait for more
            try:
                rest = await asyncio.wait_for(reader.read(), 10)
            except ConnectionResetError:
                rest = b""
            assert rest == b"", f"{peer.name}: the downstairs answered {rest[:80]!r} instead of closing"
    finally:
        writer.close()


async def wait_protocol_error(ds: DownstairsProc, since: int, reason: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        for event in ds.events(since):
            if event.get("event") == "protocol_error" and re.search(reason, str(event.get("reason"))):
                return event
        return None

    await poll_until(
        lambda: found() is not None,
        f"a protocol_error log line matching {reason!r}",
        last=lambda: ds.events(since),
    )
    not_json = [e["raw"] for e in ds.events(since) if e["event"] == "NOT-JSON"]
    assert not not_json, f"the downstairs logged lines that are not JSON: {not_json[:5]}"
    event = found()
    assert event is not None
    return event


# -- one set of downstairs for the whole module, a fresh upstairs per check ----------------------
@dataclass
class Trio:
    dss: list[DownstairsProc]
    gens: Iterator[int]

    @property
    def targets(self) -> list[str]:
        return [d.target for d in self.dss]

    async def io_works(self, sock: Path, byte: int) -> None:
        """A well-behaved upstairs (next generation) activates on all three and does I/O."""
        backend = CrucibleBackend(
            "w", make_vcr(self.targets, gen=next(self.gens), volume_id=VOLUME_ID), sock, retry=FAST
        )
        try:
            await backend.start_export()
            await asyncio.wait_for(backend.activate(), 30)
            await qemu_io(sock, f"write -P {byte} 0 64k", "flush", f"read -P {byte} 0 64k", timeout_s=30)
        finally:
            await backend.close()


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trio]:
    factory = DownstairsFactory(tmp_path_factory.mktemp("wire"))
    try:
        yield Trio([factory.create() for _ in range(3)], itertools.count(1))
    finally:
        factory.close()


@pytest.mark.parametrize("peer", BAD_PEERS, ids=[p.name for p in BAD_PEERS])
def test_bad_peer_is_dropped_logged_and_service_continues(trio: Trio, peer: BadPeer, tmp_path: Path) -> None:
    ds = trio.dss[0]

    async def main() -> None:
        since = ds.log_offset()
        await no_session(ds)
        await misbehave(ds, peer)
        event = await wait_protocol_error(ds, since, peer.reason)
        assert event["component"] == "downstairs" and "peer" in event
        await no_session(ds)  # a peer that got promoted was deactivated with its connection
        await trio.io_works(tmp_path / "w.nbd", byte=0x40 + BAD_PEERS.index(peer))
        assert ds.proc is not None and ds.proc.poll() is None

    run_bounded(main(), 60)


def test_bad_peers_do_not_disturb_an_active_upstairs(trio: Trio, tmp_path: Path) -> None:
    """Garbage connections to every downstairs while an upstairs does I/O: its sessions stay
    up (no reconnect) and the data is right."""
    sock = tmp_path / "a.nbd"
    harmless = [p for p in BAD_PEERS if p.name not in ("second-promote", "promote-gen-not-integer")]

    async def main() -> None:
        backend = CrucibleBackend(
            "a", make_vcr(trio.targets, gen=next(trio.gens), volume_id=VOLUME_ID), sock, retry=FAST
        )
        try:
            await backend.start_export()
            await asyncio.wait_for(backend.activate(), 30)
            io = asyncio.create_task(
                qemu_io(
                    sock,
                    *[f"write -P {0x10 + i} {i}M 1M" for i in range(4)],
                    "flush",
                    *[f"read -P {0x10 + i} {i}M 1M" for i in range(4)],
                )
            )
            for ds in trio.dss:
                await asyncio.gather(*(misbehave(ds, p) for p in harmless))
            await io
            status = downstairs_status(backend)
            assert [d["state"] for d in status] == ["active"] * 3, status
            assert [d["connect_attempts"] for d in status] == [1, 1, 1], status
        finally:
            await backend.close()

    run_bounded(main(), 60)


# -- error injection flags ---------------------------------------------------------------------
def downstairs_status(backend: CrucibleBackend) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], backend.status()["downstairs"])


def faulty_status(backend: CrucibleBackend) -> dict[str, Any]:
    return downstairs_status(backend)[0]


@pytest.mark.parametrize("flag", ["--write-errors", "--read-errors", "--flush-errors", "--lossy"])
def test_one_faulty_downstairs_is_survived_with_correct_data(
    flag: str, downstairs: DownstairsFactory, tmp_path: Path
) -> None:
    """The first downstairs fails 5 % of its operations (or delays them): every NBD request
    still succeeds with the right data. A failed write or flush faults the downstairs (its
    copy may now differ: it reconnects and is repaired); a failed read is only retried on
    another downstairs (the copy is still right, so it stays a member)."""
    dss = [downstairs.create(flags=(flag,)), downstairs.create(), downstairs.create()]
    sock = tmp_path / "f.nbd"
    slot = 32 * 1024
    slots = REGION_BYTES // slot
    pattern = [0] * slots
    injected = flag != "--lossy"
    faults = flag in ("--write-errors", "--flush-errors")
    what = flag.removeprefix("--").removesuffix("-errors")
    seen: dict[str, Any] = {"batches": 0}

    async def batch(backend: CrucibleBackend, n: int) -> None:
        commands = []
        for i in range(8):
            s = (n * 8 + i) % slots
            new = (pattern[s] % 250) + 1
            commands += [f"write -q -P {new} {s * slot} {slot}", f"read -q -P {new} {s * slot} {slot}"]
            pattern[s] = new
            if i % 2:
                commands.append("flush")
        commands += [f"read -q -P {pattern[s]} {s * slot} {slot}" for s in range(0, slots, 11)]
        await qemu_io(sock, *commands, timeout_s=60)  # raises on any error or wrong data

    def faulted(backend: CrucibleBackend) -> bool:
        if faults:
            return int(faulty_status(backend)["connect_attempts"]) >= 2
        return any(e.get("event") == "io_error" for e in dss[0].events())  # read error seen

    async def main() -> None:
        backend = CrucibleBackend("f", make_vcr([d.target for d in dss]), sock, retry=FAST)
        try:
            await backend.start_export()
            await asyncio.wait_for(backend.activate(), 30)
            deadline = time.monotonic() + 120
            n = 0
            while n < 6 or (injected and not faulted(backend)):
                assert time.monotonic() < deadline, (
                    f"no {what} fault seen after {n} batches: {backend.status()}"
                )
                await batch(backend, n)
                n += 1
            seen["batches"] = n
            seen["faulty"] = dict(faulty_status(backend))
            await poll_until(
                lambda: [str(d["state"]) for d in downstairs_status(backend)] == ["active"] * 3,
                "the faulty downstairs to be repaired",
                30,
                last=lambda: backend.status()["downstairs"],
            )
            image = await read_image(sock, tmp_path / "image.raw")
            assert image == b"".join(bytes([p]) * slot for p in pattern)
        finally:
            await backend.close()

    run_bounded(main(), 180)
    log = [e for e in dss[0].events() if e.get("event") == "io_error"]
    if injected:
        assert any(f"injected {what} error" in str(e.get("error")) for e in log), log[-5:]
        if faults:
            assert seen["faulty"]["connect_attempts"] >= 2, seen
        else:
            assert seen["faulty"]["connect_attempts"] == 1 and seen["faulty"]["fault_count"] == 0, seen
    else:
        assert not log and seen["faulty"]["connect_attempts"] == 1, (log, seen)
    assert_regions_identical(dss)
    print(f"\n{flag}: {seen}")


def test_status_names_the_cause_of_a_fault(downstairs: DownstairsFactory, tmp_path: Path) -> None:
    dss = [downstairs.create(flags=("--write-errors",)), downstairs.create(), downstairs.create()]
    sock = tmp_path / "c.nbd"

    async def main() -> None:
        backend = CrucibleBackend("c", make_vcr([d.target for d in dss]), sock, retry=FAST)
        try:
            await backend.start_export()
            await asyncio.wait_for(backend.activate(), 30)
            deadline = time.monotonic() + 60
            while int(faulty_status(backend)["connect_attempts"]) < 2:
                assert time.monotonic() < deadline, f"no write fault injected: {backend.status()}"
                await qemu_io(sock, *[f"write -q -P 7 {i * 4}k 4k" for i in range(64)])
            await poll_until(
                lambda: faulty_status(backend)["state"] == "active",
                "the repair",
                30,
                last=lambda: faulty_status(backend),
            )
            last_error = str(faulty_status(backend)["last_error"])
            assert "injected write error" in last_error, f"status hides the cause: {faulty_status(backend)}"
        finally:
            await backend.close()

    run_bounded(main(), 120)
