"""Wire hardening: a real downstairs process (ours, Crucible's protocol v13) against
misbehaving raw socket peers, and the upstairs against downstairs started with the
error-injection flags.

Every bad peer must lose THAT connection, leave a JSON log line naming the reason, and the
downstairs must go on serving a well-behaved upstairs (checked with real NBD I/O after each).
The frames are built with our codec (sut.storage.wire), or by hand where the codec refuses to
build them. The same frames against a bare connection (no upstairs, and against the real
crucible-downstairs too) are in test_downstairs_conformance.py.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from sut.storage import wire
from sut.storage.backend import CrucibleBackend, RetryPolicy
from sut.storage.wire import messages as m
from sut.storage.wire.blockhash import unencrypted_contexts

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
RAW_U = uuid.UUID("a0a1a2a3-b4b5-4c6c-8d7d-e8e9eaebeced")
RAW_S = uuid.UUID("b0b1b2b3-c4c5-4d6d-9e7e-f8f9fafbfcfd")


# -- raw peers -----------------------------------------------------------------------------
def hello(gen: int = 1) -> bytes:
    return wire.encode(m.HereIAm(wire.MESSAGE_VERSION, RAW_U, RAW_S, gen, False, False, ()))


def refit(frame: bytes | bytearray) -> bytes:
    """``frame`` with its length prefix set to its length."""
    return struct.pack("<I", len(frame)) + bytes(frame[4:])


class Frames:
    """Reads whole frames from an asyncio stream (our codec's assembler, cap 100 MiB)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.assembler = wire.FrameAssembler(wire.MAX_FRAME)
        self.pending: list[wire.Message] = []

    async def next(self) -> wire.Message:
        while not self.pending:
            chunk = await asyncio.wait_for(self.reader.read(1 << 16), 10)
            assert chunk, "the downstairs closed the connection"
            self.pending += self.assembler.feed(chunk)
        return self.pending.pop(0)


async def negotiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Frames:
    """HereIAm .. ExtentVersions: a raw connection ready for I/O."""
    frames = Frames(reader)
    for msg, want in (
        (m.HereIAm(wire.MESSAGE_VERSION, RAW_U, RAW_S, 1, False, False, ()), m.YesItsMe),
        (m.PromoteToActive(RAW_U, RAW_S, 1), m.YouAreNowActive),
        (m.RegionInfoPlease(), m.RegionInfo),
        (m.ExtentVersionsPlease(), m.ExtentVersions),
    ):
        writer.write(wire.encode(msg))
        await writer.drain()
        got = await frames.next()
        assert isinstance(got, want), f"{type(msg).__name__}: expected {want.__name__}, got {got}"
    return frames


Peer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def sends(data: bytes) -> Peer:
    async def peer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return peer


async def truncated_then_close(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(hello()[:30])  # 30 of its 78 bytes
    await writer.drain()
    writer.close()


async def second_promote(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await negotiate(reader, writer)
    writer.write(wire.encode(m.PromoteToActive(RAW_U, RAW_S, 1)))
    await writer.drain()


async def promote_with_other_ids(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(hello())
    await writer.drain()
    frames = Frames(reader)
    assert isinstance(await frames.next(), m.YesItsMe)
    writer.write(wire.encode(m.PromoteToActive(RAW_S, RAW_S, 1)))
    await writer.drain()
    assert await frames.next() == m.UuidMismatch(RAW_U)


async def write_with_too_few_contexts(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await negotiate(reader, writer)
    data = b"\x33" * (2 * BLOCK_SIZE)
    contexts = unencrypted_contexts(data[:BLOCK_SIZE], BLOCK_SIZE)
    writer.write(wire.encode(m.Write(wire.WriteHeader(RAW_U, RAW_S, 1000, (), 0, contexts), data)))
    await writer.drain()


async def frame_over_the_cap_once_active(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await negotiate(reader, writer)
    writer.write(struct.pack("<II", wire.MAX_FRAME + 1, 30))
    await writer.drain()


@dataclass(frozen=True)
class BadPeer:
    name: str
    act: Peer
    reason: str  # regex the downstairs' log line must match
    event: str = "protocol_error"  # protocol_error: undecodable; closed: decodable, refused
    closes_itself: bool = False
    promotes: bool = False  # becomes the active upstairs for a moment
    answers: tuple[type, ...] = ()  # replies the downstairs sends before it closes


_HELLO = hello()
BAD_PEERS = [
    BadPeer(
        "frame-over-the-handshake-cap",
        sends(struct.pack("<II", wire.NEGOTIATION_FRAME_CAP + 1, 0)),
        r"exceeds the frame cap 65536",
    ),
    BadPeer("length-below-minimum", sends(struct.pack("<I", 3) + bytes(12)), r"below the minimum frame"),
    BadPeer("unknown-variant", sends(struct.pack("<II", 8, 42)), r"not one of the 42 variants"),
    BadPeer(
        "bool-not-0-or-1", sends(_HELLO[:68] + b"\x02" + _HELLO[69:]), r"HereIAm\.read_only.*bool must be"
    ),
    BadPeer(
        "vec-count-beyond-the-frame",
        sends(_HELLO[:70] + (1 << 60).to_bytes(8, "little")),
        r"HereIAm\.alternate_versions.*count",
    ),
    BadPeer("trailing-bytes", sends(refit(_HELLO + b"\x00")), r"trailing bytes"),
    BadPeer(
        "truncated-then-close",
        truncated_then_close,
        r"IncompleteReadError",
        event="connection_lost",
        closes_itself=True,
    ),
    BadPeer(
        "here-i-am-twice",
        sends(_HELLO + _HELLO),
        r"HereIAm out of order",
        event="closed",
        answers=(m.YesItsMe,),
    ),
    BadPeer("promote-with-other-ids", promote_with_other_ids, r"other ids", event="closed"),
    BadPeer(
        "second-promote",
        second_promote,
        r"unexpected PromoteToActive after negotiation",
        event="closed",
        promotes=True,
    ),
    BadPeer(
        "write-with-too-few-contexts",
        write_with_too_few_contexts,
        r"1024 bytes of data for 1 block contexts",
        event="closed",
        promotes=True,
    ),
    BadPeer(
        "frame-over-100MiB-once-active",
        frame_over_the_cap_once_active,
        r"exceeds the frame cap 104857600",
        promotes=True,
    ),
]
# Not here any more (our framed protocol is gone): JSON-header cases (not JSON, not an object,
# missing field, a string where an integer belongs) - Crucible's frames have no JSON; their
# bincode counterparts are the bool / count / trailing / variant cases above. "I/O before
# negotiation" no longer closes: Crucible's downstairs ignores it, and so does ours
# (test_downstairs_conformance.py::test_interop_io_before_negotiation_is_ignored).


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
            got = [type(msg) for msg in wire.FrameAssembler().feed(rest)]
            assert got == list(peer.answers), f"{peer.name}: the downstairs answered {got} instead of closing"
    finally:
        writer.close()


async def wait_log_line(ds: DownstairsProc, since: int, kind: str, reason: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        for event in ds.events(since):
            if event.get("event") == kind and re.search(reason, str(event.get("reason"))):
                return event
        return None

    await poll_until(
        lambda: found() is not None,
        f"a {kind} log line matching {reason!r}",
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
        event = await wait_log_line(ds, since, peer.event, peer.reason)
        assert event["component"] == "downstairs" and "peer" in event
        await no_session(ds)  # a peer that got promoted was deactivated with its connection
        await trio.io_works(tmp_path / "w.nbd", byte=0x40 + BAD_PEERS.index(peer))
        assert ds.process is not None and ds.process.alive()

    run_bounded(main(), 60)


def test_bad_peers_do_not_disturb_an_active_upstairs(trio: Trio, tmp_path: Path) -> None:
    """Garbage connections to every downstairs while an upstairs does I/O: its sessions stay
    up (no reconnect) and the data is right. (Peers that promote themselves are left out: a
    promote at a lower generation than the active upstairs' is refused by closing, which
    test_faults / the conformance tests cover.)"""
    sock = tmp_path / "a.nbd"
    harmless = [p for p in BAD_PEERS if not p.promotes and p.name != "promote-with-other-ids"]

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
                    *[f"write -P {0x10 + i} {i * 512}k 512k" for i in range(4)],
                    "flush",
                    *[f"read -P {0x10 + i} {i * 512}k 512k" for i in range(4)],
                )
            )
            for ds in trio.dss:
                await asyncio.gather(*(misbehave(ds, p) for p in harmless))
            await io
            status = downstairs_status(backend)
            assert [d["state"] for d in status] == ["active"] * 3, status
            assert [d["connect_attempts"] for d in status] == [1, 1, 1], status
            assert [d["fault_count"] for d in status] == [0, 0, 0], status
        finally:
            await backend.close()

    run_bounded(main(), 60)


# -- error injection flags ---------------------------------------------------------------------
def downstairs_status(backend: CrucibleBackend) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], backend.status()["downstairs"])


def faulty_status(backend: CrucibleBackend) -> dict[str, Any]:
    return downstairs_status(backend)[0]


@pytest.mark.parametrize("flag", ["--write-errors", "--read-errors", "--flush-errors"])
def test_one_faulty_downstairs_is_survived_with_correct_data(
    flag: str, downstairs: DownstairsFactory, tmp_path: Path
) -> None:
    """The first downstairs fails a quarter of its write/read/flush attempts, as the real
    crucible-downstairs does with these flags: it sends ``ErrorReport`` for the failed attempt
    and retries the job itself until it succeeds. Every NBD request still succeeds with the
    right data; the upstairs counts the reports (status ``error_reports``, the cause shown per
    downstairs) and keeps that downstairs a member - an ErrorReport is not a failed job, so
    there is no reconnect, no fault and no repair, and the copies end identical.

    (``--lossy`` is gone: our v13 downstairs does not implement it, although the real one has
    it; what a failed job does to the upstairs - a failed write or flush faults that
    downstairs, a failed read is retried elsewhere - is pinned by
    tests/unit/storage/test_client_hostile.py against a scripted downstairs.)"""
    dss = [downstairs.create(flags=(flag,)), downstairs.create(), downstairs.create()]
    sock = tmp_path / "f.nbd"
    slot = 32 * 1024
    slots = REGION_BYTES // slot
    pattern = [0] * slots
    what = flag.removeprefix("--").removesuffix("-errors")
    seen: dict[str, Any] = {"batches": 0}

    async def batch(n: int) -> None:
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

    async def main() -> None:
        backend = CrucibleBackend("f", make_vcr([d.target for d in dss]), sock, retry=FAST)
        try:
            await backend.start_export()
            await asyncio.wait_for(backend.activate(), 30)
            deadline = time.monotonic() + 120
            n = 0
            while n < 6 or int(faulty_status(backend)["error_reports"]) < 3:
                assert time.monotonic() < deadline, (
                    f"no {what} ErrorReport seen after {n} batches: {backend.status()}"
                )
                await batch(n)
                n += 1
            seen["batches"] = n
            seen["status"] = downstairs_status(backend)
            image = await read_image(sock, tmp_path / "image.raw")
            assert image == b"".join(bytes([p]) * slot for p in pattern)
        finally:
            await backend.close()

    run_bounded(main(), 180)
    faulty, *healthy = seen["status"]
    assert faulty["state"] == "active" and faulty["error_reports"] >= 3, faulty
    assert faulty["connect_attempts"] == 1 and faulty["fault_count"] == 0, faulty
    assert faulty["offline_count"] == 0, faulty
    assert all(h["error_reports"] == 0 and h["fault_count"] == 0 for h in healthy), healthy
    assert_regions_identical(dss)
    print(f"\n{flag}: batches {seen['batches']}, faulty {faulty}")
