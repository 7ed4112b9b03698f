"""Durability: "a flush is durable (fsync) before it is acknowledged; kill -9 of a downstairs or
the upstairs at any point loses no flushed write and corrupts no extent metadata."

Everything is real: three downstairs processes, the upstairs (CrucibleBackend + NBD export) in
its own process where it must be SIGKILLed, and real NBD clients (qemu-io, qemu-img).
Randomness is seeded (``PHD_DURABILITY_SEED``); the seed is in every failure message.

The rule checked after a crash, per 512-byte block: the block holds the value of the last write
covered by an acknowledged flush, or the value of a write issued after that flush (which may or
may not have landed, and a multi-block write may land partly) - never anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from sut.storage.backend import CrucibleBackend, RetryPolicy
from sut.storage.protocol import PROTOCOL_VERSION, Message, encode, read_message
from sut.storage.region import Region

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
    qemu_io_status,
    read_image,
    region_on_disk,
    run_bounded,
)

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("PHD_DURABILITY_SEED", "20240611"))
REPO_ROOT = Path(__file__).resolve().parents[3]
FAST = RetryPolicy(connect_timeout_s=1.0, reconnect_delay_s=0.2)
REGION_BYTES = BLOCK_SIZE * EXTENT_SIZE * EXTENT_COUNT
SLOT_BYTES = 64 * 1024  # unit of one test write; 8 slots per extent
SLOTS = REGION_BYTES // SLOT_BYTES
BLOCKS_PER_SLOT = SLOT_BYTES // BLOCK_SIZE
TOTAL_BLOCKS = REGION_BYTES // BLOCK_SIZE
STEP_S = 30.0  # deadline of any single step (start, activation, one qemu-io batch)
KILLS = 6  # downstairs kill -9 rounds

# -- stamped block contents ----------------------------------------------------------------
# Each block of a test write says which write it came from and where it belongs, so a block
# that holds stale, misplaced or garbage data is told apart from an acceptable one.
_MAGIC = b"PHD-DUR1"
_STAMP = struct.Struct(">8sIIII")  # magic, round, seq, slot, block within the slot

WriteId = tuple[int, int]  # (round, seq); unique per write


def slot_content(wid: WriteId, slot: int) -> bytes:
    return b"".join(
        _STAMP.pack(_MAGIC, wid[0], wid[1], slot, i).ljust(BLOCK_SIZE, b"\xa5")
        for i in range(BLOCKS_PER_SLOT)
    )


def decode_block(data: bytes, block: int) -> WriteId | None:
    """The write a block came from; None for a never-written (zero) block."""
    if data == bytes(BLOCK_SIZE):
        return None
    magic, rnd, seq, slot, i = _STAMP.unpack_from(data)
    slot_want, i_want = divmod(block, BLOCKS_PER_SLOT)
    if (
        magic != _MAGIC
        or (slot, i) != (slot_want, i_want)
        or data[_STAMP.size :] != b"\xa5" * (BLOCK_SIZE - _STAMP.size)
    ):
        raise ValueError(f"block {block} holds foreign data: {data[:32].hex()}...")
    return (rnd, seq)


@dataclass
class BlockModel:
    """What each block may hold after a crash."""

    flushed: list[WriteId | None] = field(default_factory=lambda: [None] * TOTAL_BLOCKS)
    later: list[set[WriteId]] = field(default_factory=lambda: [set() for _ in range(TOTAL_BLOCKS)])
    acked: dict[int, WriteId] = field(default_factory=dict)  # slot -> acked, not yet flushed

    @staticmethod
    def blocks(slot: int) -> range:
        return range(slot * BLOCKS_PER_SLOT, (slot + 1) * BLOCKS_PER_SLOT)

    def issued(self, slot: int, wid: WriteId) -> None:
        for b in self.blocks(slot):
            self.later[b].add(wid)

    def acknowledged(self, slot: int, wid: WriteId) -> None:
        self.acked[slot] = wid

    def flush_acknowledged(self) -> None:
        # qemu-io runs its commands one after another, so every write acked before the flush
        # was sent is covered by it, and no write to these slots is still in flight
        for slot, wid in self.acked.items():
            for b in self.blocks(slot):
                self.flushed[b] = wid
                self.later[b].clear()
        self.acked.clear()

    def check(self, image: bytes, seed_note: str) -> Counter[str]:
        """Every block acceptable? Returns counts for the report; raises listing violations."""
        seen: Counter[str] = Counter()
        bad: list[str] = []
        for b in range(TOTAL_BLOCKS):
            try:
                got = decode_block(image[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE], b)
            except ValueError as exc:
                bad.append(str(exc))
                continue
            if got == self.flushed[b]:
                seen["flushed"] += 1
            elif got in self.later[b]:
                seen["newer_than_flush"] += 1
            else:
                bad.append(
                    f"block {b}: holds {got}, flushed {self.flushed[b]}, later {sorted(self.later[b])}"
                )
        if bad:
            raise AssertionError(f"{len(bad)} blocks violate durability ({seed_note}): {bad[:8]}")
        return seen

    def settle(self, image: bytes) -> None:
        """After a verified recovery, what was read is what is durable."""
        for b in range(TOTAL_BLOCKS):
            self.flushed[b] = decode_block(image[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE], b)
            self.later[b].clear()
        self.acked.clear()


def torn_slots(image: bytes) -> int:
    """Slots whose blocks come from different writes (a crash landed inside a write)."""
    torn = 0
    for slot in range(SLOTS):
        ids = {decode_block(image[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE], b) for b in BlockModel.blocks(slot)}
        torn += len(ids) > 1
    return torn


# -- the upstairs in a child process -----------------------------------------------------------
class UpstairsChild:
    """``python -m tests.integration.storage.upstairs_child``: start, await events, SIGKILL."""

    def __init__(self, vcr_json: str, workdir: Path, socket_path: Path, tag: str) -> None:
        self.vcr_file = workdir / f"vcr-{tag}.json"
        self.vcr_file.write_text(vcr_json)
        self.log_path = workdir / f"upstairs-{tag}.log"
        self.socket_path = socket_path
        self.proc: asyncio.subprocess.Process | None = None
        self.events: list[str] = []

    async def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.integration.storage.upstairs_child",
                "--vcr-file",
                str(self.vcr_file),
                "--socket",
                str(self.socket_path),
                cwd=REPO_ROOT,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )

    async def wait_event(self, event: str, timeout_s: float = STEP_S) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while f'"event": "{event}"' not in "".join(self.events):
            remaining = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), max(remaining, 0.01))
            except TimeoutError:
                line = b""
            if line:
                self.events.append(line.decode())
                continue
            raise AssertionError(
                f"upstairs child never announced {event!r} (events {self.events}, rc {self.proc.returncode});"
                f" log {self.log_path}:\n{self.log_path.read_text()[-3000:]}"
            )

    async def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), STEP_S)

    async def drain_events(self) -> None:
        """After the child died: collect what it announced before dying."""
        assert self.proc is not None and self.proc.stdout is not None
        rest = await asyncio.wait_for(self.proc.stdout.read(), STEP_S)
        self.events += rest.decode().splitlines(keepends=True)

    async def terminate(self) -> int:
        """Clean shutdown (SIGTERM: the backend flushes and closes); returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), STEP_S)


@dataclass
class Tally:
    rounds: int = 0
    kills: int = 0
    kills_mid_io: int = 0  # the batch running when the kill landed failed
    kills_before_active: int = 0
    batches: int = 0
    flushes_acked: int = 0
    writes_acked: int = 0
    blocks: Counter[str] = field(default_factory=Counter)
    torn_slots: int = 0


async def drive_until_killed(
    child: UpstairsChild,
    model: BlockModel,
    rng: random.Random,
    rnd: int,
    stamps: Path,
    tally: Tally,
    note: str,
) -> None:
    """Write stamped slots (+ flush, usually) through NBD until the child is SIGKILLed."""
    assert child.proc is not None
    proc = child.proc
    seq = 0
    while proc.returncode is None:
        slots = rng.sample(range(SLOTS), rng.randint(1, 6))
        flush = rng.random() < 0.6
        commands, batch = [], []
        for slot in slots:
            seq += 1
            wid = (rnd, seq)
            path = stamps / f"{rnd}-{seq}.bin"
            path.write_bytes(slot_content(wid, slot))
            commands.append(f"write -q -s {path} {slot * SLOT_BYTES} {SLOT_BYTES}")
            model.issued(slot, wid)
            batch.append((slot, wid, path))
        if flush:
            # (qemu-io also flushes on exit after writing; the model ignores that flush, as
            # nothing tells whether it was acknowledged - which only widens what is accepted)
            commands.append("flush")
        ok, output = await qemu_io_status(child.socket_path, *commands, timeout_s=STEP_S)
        for _slot, _wid, path in batch:
            path.unlink()
        if not ok:
            # The only acceptable reason for a failed batch is the kill of the upstairs.
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                raise AssertionError(f"I/O failed while the upstairs was alive ({note}): {output}") from None
            tally.kills_mid_io += 1
            return
        tally.batches += 1
        tally.writes_acked += len(batch)
        for slot, wid, _path in batch:
            model.acknowledged(slot, wid)
        if flush:
            model.flush_acknowledged()
            tally.flushes_acked += 1


async def verify_recovery(
    child: UpstairsChild, model: BlockModel, dss: list[DownstairsProc], scratch: Path, tally: Tally, note: str
) -> None:
    """After a crash and a fresh activation: data acceptable, copies identical, metadata sane."""
    image = await read_image(child.socket_path, scratch / "image.raw", timeout_s=STEP_S)
    tally.blocks.update(model.check(image, note))
    tally.torn_slots += torn_slots(image)
    # reconciliation at activation left every copy identical and clean (no I/O since)...
    assert_regions_identical(dss)
    # ...so what was read is durable now: extents it rewrote were fsynced, the others were
    # clean (nothing written since their last flush). No flush needed - and qemu-io would not
    # send one anyway: it skips a flush when it wrote nothing.
    model.settle(image)


async def wait_session_over(ds: DownstairsProc, since: int) -> None:
    await poll_until(
        lambda: not ds.session_open(since),
        f"{ds.target} to end the killed upstairs' session",
        last=lambda: ds.events(since)[-3:],
    )


def test_upstairs_sigkill_at_random_points_loses_no_flushed_write(
    downstairs: DownstairsFactory, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    rounds = int(os.environ.get("PHD_DURABILITY_ROUNDS", "12"))
    rng = random.Random(SEED)  # what is written: its draws depend on how many batches ran
    plan = random.Random(SEED)  # when each kill lands: the same every run of a seed
    note = f"PHD_DURABILITY_SEED={SEED}"
    dss = [downstairs.create() for _ in range(3)]
    targets = [d.target for d in dss]
    vid = "6a1f4c2e-8b3d-4e5f-9a0b-1c2d3e4f5a6b"
    sock = tmp_path / "up.nbd"
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    model = BlockModel()
    tally = Tally()

    async def one_round(rnd: int) -> None:
        child = UpstairsChild(make_vcr(targets, gen=rnd + 1, volume_id=vid), tmp_path, sock, f"r{rnd}")
        offsets = [d.log_offset() for d in dss]
        try:
            await child.start()
            await child.wait_event("exported")
            if rnd % 4 == 2:
                # kill while activation (collate + reconciliation of the last crash) may run
                await asyncio.sleep(plan.uniform(0.0, 0.15))  # the random kill point itself
                await child.kill()
                await child.drain_events()
                tally.kills_before_active += not any('"active"' in e for e in child.events)
            else:
                await child.wait_event("active")
                await verify_recovery(child, model, dss, tmp_path, tally, f"{note}, round {rnd}")
                delay = plan.uniform(0.05, 1.5)

                async def killer() -> None:
                    await asyncio.sleep(delay)  # the random kill point itself, not a wait
                    await child.kill()

                kill_task = asyncio.create_task(killer())
                await drive_until_killed(child, model, rng, rnd, stamps, tally, f"{note}, round {rnd}")
                await kill_task
            tally.kills += 1
            # A downstairs still runs the jobs it received before the upstairs died; once it
            # ended that session its files are at rest and every .meta must parse.
            for d, since in zip(dss, offsets, strict=True):
                await wait_session_over(d, since)
                assert not region_on_disk(d.data_dir).tmp_files, f"{d.data_dir}: leftover .tmp files"
        finally:
            await child.kill()
        tally.rounds += 1

    async def main() -> None:
        for rnd in range(rounds):
            await one_round(rnd)
        final = UpstairsChild(make_vcr(targets, gen=rounds + 1, volume_id=vid), tmp_path, sock, "final")
        try:
            await final.start()
            await final.wait_event("active")
            await verify_recovery(final, model, dss, tmp_path, tally, f"{note}, final")
            assert await final.terminate() == 0
        finally:
            await final.kill()

    started = time.monotonic()
    run_bounded(main(), timeout_s=60 + rounds * 30)
    summary = {
        "seed": SEED,
        "seconds": round(time.monotonic() - started, 1),
        **{k: v for k, v in vars(tally).items() if k != "blocks"},
        "blocks": dict(tally.blocks),
    }
    record_property("durability_upstairs_kill", summary)
    print(f"\nupstairs kill -9 durability: {summary}")
    assert tally.kills == rounds
    assert tally.flushes_acked > 0 and tally.kills_mid_io > 0, f"the kills never landed mid-I/O: {summary}"


# -- downstairs kill -9 while the upstairs is active -------------------------------------------
def ds_states(backend: CrucibleBackend) -> list[str]:
    return [str(d["state"]) for d in cast(list[dict[str, Any]], backend.status()["downstairs"])]


async def wait_not_active(backend: CrucibleBackend, index: int) -> None:
    await poll_until(
        lambda: ds_states(backend)[index] != "active",
        f"the upstairs to notice that downstairs {index} is gone",
        last=lambda: ds_states(backend),
    )


def test_downstairs_sigkill_mid_write_io_continues_and_copies_converge(
    downstairs: DownstairsFactory, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    rng = random.Random(SEED + 1)
    note = f"PHD_DURABILITY_SEED={SEED}"
    dss = [downstairs.create() for _ in range(3)]
    sock = tmp_path / "d.nbd"
    pattern = [0] * SLOTS  # byte each slot holds; every batch succeeds, so this is exact
    done = {"batches": 0, "writes": 0, "reads": 0}
    events: list[dict[str, object]] = []

    async def writer(backend_sock: Path, stop: asyncio.Event) -> None:
        while not stop.is_set():
            slots = rng.sample(range(SLOTS), rng.randint(1, 6))
            others = [s for s in range(SLOTS) if s not in slots]
            reads = rng.sample(others, 2)
            new = {s: rng.choice([b for b in range(1, 256) if b != pattern[s]]) for s in slots}
            commands = [f"write -q -P {new[s]} {s * SLOT_BYTES} {SLOT_BYTES}" for s in slots]
            commands += [f"read -q -P {pattern[s]} {s * SLOT_BYTES} {SLOT_BYTES}" for s in reads]
            commands.append("flush")
            # raises (failing the test) on any I/O error or pattern mismatch
            await qemu_io(backend_sock, *commands, timeout_s=STEP_S)
            for slot, byte in new.items():
                pattern[slot] = byte
            done["batches"] += 1
            done["writes"] += len(slots)
            done["reads"] += len(reads)

    async def main() -> None:
        backend = CrucibleBackend("d", make_vcr([d.target for d in dss]), sock, retry=FAST)
        stop = asyncio.Event()
        write_task: asyncio.Task[None] | None = None

        async def progress(batches: int, what: str, timeout_s: float = STEP_S) -> None:
            target = done["batches"] + batches
            task = write_task
            assert task is not None
            await poll_until(lambda: done["batches"] >= target or task.done(), what, timeout_s, lambda: done)
            if task.done():
                task.result()  # the NBD client saw an error: raise it
                raise AssertionError(f"the writer stopped early while waiting for {what}")

        try:
            await backend.start_export()
            await backend.activate()
            write_task = asyncio.create_task(writer(sock, stop))
            for rnd, victim_index in enumerate(rng.choice(range(3)) for _ in range(KILLS)):
                victim = dss[victim_index]
                await progress(2, "writes before the kill")
                await asyncio.sleep(rng.uniform(0.0, 0.05))  # the random kill point inside a batch
                port = victim.port
                await asyncio.to_thread(victim.kill)
                # its own metadata survived the kill: the region opens and every .meta parses
                on_disk = region_on_disk(victim.data_dir)
                Region.open(victim.data_dir).close()
                events.append(
                    {
                        "round": rnd,
                        "victim": victim_index,
                        "tmp_files": on_disk.tmp_files,
                        "dirty_extents": sum(s[2] for s in on_disk.stamps),
                    }
                )
                await wait_not_active(backend, victim_index)
                await progress(3, "I/O to continue on the two live downstairs")
                await asyncio.to_thread(victim.start, port)
                await poll_until(
                    lambda: ds_states(backend) == ["active"] * 3,
                    "the restarted downstairs to be repaired and rejoin",
                    STEP_S,
                    last=lambda: backend.status()["downstairs"],
                )
                await progress(2, "I/O after the rejoin")
            stop.set()
            await asyncio.wait_for(write_task, STEP_S)
            image = await read_image(sock, tmp_path / "image.raw")
            expected = b"".join(bytes([p]) * SLOT_BYTES for p in pattern)
            assert image == expected, f"final image differs from what was written ({note})"
        finally:
            stop.set()
            if write_task is not None and not write_task.done():
                write_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, AssertionError):
                    await write_task
            await backend.close()

    started = time.monotonic()
    run_bounded(main(), timeout_s=240)
    # close() flushed: the three copies are identical and clean on disk ((gen, flush): a
    # restart may land between a batch's writes and its flush - the known repair bug)
    assert_regions_identical(dss)
    summary = {"seed": SEED + 1, "seconds": round(time.monotonic() - started, 1), **done, "kills": events}
    record_property("durability_downstairs_kill", summary)
    print(f"\ndownstairs kill -9: {summary}")


# -- fsync before the acknowledgement, seen from outside with strace ---------------------------
@dataclass
class Syscall:
    name: str
    line: str


def parse_strace(text: str) -> list[Syscall]:
    calls = []
    for line in text.splitlines():
        m = re.match(r"^\d+\s+(\w+)\(", line)
        if m:
            calls.append(Syscall(m.group(1), line))
    return calls


async def raw_active_session(port: int, gen: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ids = {"upstairs_id": "0f0e0d0c-0b0a-4908-8706-050403020100", "session_id": "s-strace", "gen": gen}
    writer.write(
        encode(
            Message("HereIAm", {"version": PROTOCOL_VERSION, "read_only": False, "encrypted": False, **ids})
        )
    )
    writer.write(encode(Message("PromoteToActive", ids)))
    await writer.drain()
    for want in ("YesItsMe", "YouAreNowActive"):
        msg = await asyncio.wait_for(read_message(reader), 10)
        assert msg is not None and msg.kind == want, f"negotiation: expected {want}, got {msg}"
    return reader, writer


async def job(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, msg: Message, reply: str) -> None:
    writer.write(encode(msg))
    await writer.drain()
    got = await asyncio.wait_for(read_message(reader), 10)
    assert got is not None and got.kind == reply and got["error"] is None, f"{msg.kind}: {got}"


def _between(calls: list[Syscall], start: int, end: int, name: str, needle: str) -> list[int]:
    """Indexes of ``name`` calls (a prefix: "rename" also matches renameat2) naming ``needle``."""
    return [i for i in range(start, end) if calls[i].name.startswith(name) and needle in calls[i].line]


_SENDS = ("sendto", "sendmsg", "writev", "write")


def test_flush_ack_is_sent_only_after_fsync_strace(downstairs: DownstairsFactory, tmp_path: Path) -> None:
    """strace a real downstairs: dirty mark durable before WriteAck; data fsync, metadata
    fsync + rename + directory fsync before FlushAck."""
    if shutil.which("strace") is None:
        pytest.skip(
            "strace is not installed (apt-get install strace); the unit test "
            "test_dirty_mark_and_flush_stamp_are_fsynced_in_order checks the same order"
        )
    ds = downstairs.create()
    assert ds.proc is not None
    trace = tmp_path / "strace.txt"
    err = tmp_path / "strace.err"
    with err.open("wb") as err_file:
        tracer = subprocess.Popen(
            [
                "strace",
                "-f",
                "-y",
                "-s",
                "120",
                "-e",
                "trace=fsync,fdatasync,rename,renameat,renameat2,recvfrom,recvmsg,sendto,sendmsg,writev,write",
                "-o",
                str(trace),
                "-p",
                str(ds.proc.pid),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )
    try:
        deadline = time.monotonic() + 10
        while b"attached" not in err.read_bytes():
            if b"Operation not permitted" in err.read_bytes():
                pytest.skip(f"ptrace is not permitted here: {err.read_text().strip()}")
            assert tracer.poll() is None and time.monotonic() < deadline, f"strace: {err.read_text()}"
            time.sleep(0.02)  # poll interval of a deadline-bounded wait

        async def main() -> None:
            reader, writer = await raw_active_session(ds.port, gen=1)
            try:
                second_extent_block = 3 * EXTENT_SIZE + 5
                for job_id, block in ((1, 0), (2, second_extent_block)):
                    write = Message("Write", {"job_id": job_id, "block": block}, b"\x5a" * BLOCK_SIZE)
                    await job(reader, writer, write, "WriteAck")
                await job(
                    reader, writer, Message("Flush", {"job_id": 3, "flush_number": 1, "gen": 1}), "FlushAck"
                )
            finally:
                writer.close()

        run_bounded(main(), 30)
    finally:
        tracer.send_signal(signal.SIGINT)  # detaches from the downstairs, which keeps running
        tracer.wait(10)
    calls = parse_strace(trace.read_text())
    # Requests go one at a time and each gets exactly one reply, so the downstairs' sends on
    # the socket are, in order: YesItsMe, YouAreNowActive (negotiation), WriteAck, WriteAck,
    # FlushAck; its receives after negotiation: HereIAm+Promote, Write, Write, Flush. (The
    # I/O messages are binary frames, so they are told apart by position, not by name.)
    done = [i for i, c in enumerate(calls) if "socket:" in c.line and " = -1 " not in c.line]
    sends = [i for i in done if calls[i].name in _SENDS]
    ack_write, ack_flush = sends[2:4], sends[4:5]
    # the Flush request: the last receive before its ack
    flush_in = (
        [max(i for i in done if calls[i].name.startswith("recv") and i < ack_flush[0])] if ack_flush else []
    )
    assert len(ack_write) == 2 and len(flush_in) == 1 and len(ack_flush) == 1, trace.read_text()
    # first write to a clean extent: its dirty mark (atomic .meta replace) is durable before the ack
    assert _between(calls, 0, ack_write[0], "fsync", "00000.meta.tmp>"), trace.read_text()
    assert _between(calls, 0, ack_write[0], "rename", "00000.meta"), trace.read_text()
    assert _between(calls, ack_write[0], ack_write[1], "rename", "00003.meta"), trace.read_text()
    start, end = flush_in[0], ack_flush[0]
    for eid in ("00000", "00003"):
        data_sync = _between(calls, start, end, "fsync", f"{eid}.dat>")
        meta_sync = _between(calls, start, end, "fsync", f"{eid}.meta.tmp>")
        renamed = _between(calls, start, end, "rename", f"{eid}.meta")
        assert data_sync and meta_sync and renamed, (
            f"extent {eid} not made durable before FlushAck:\n"
            + "\n".join(c.line for c in calls[start : end + 1])
        )
        assert data_sync[0] < renamed[0], f"extent {eid}: metadata stamped before its data was fsynced"
    assert _between(calls, start, end, "fsync", "/extents>"), (
        "the directory holding the renames was not fsynced"
    )
    on_disk = region_on_disk(ds.data_dir)
    assert on_disk.stamps[0] == on_disk.stamps[3] == (1, 1, False)


async def copy_without_flush(src: Path, sock: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        "nbdcopy",
        str(src),
        f"nbd+unix:///?socket={sock}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), STEP_S)
    assert proc.returncode == 0, f"nbdcopy failed: {out.decode(errors='replace')}"


def test_live_repair_of_a_dirty_extent_leaves_matching_stamps(
    downstairs: DownstairsFactory, tmp_path: Path
) -> None:
    dss = [downstairs.create() for _ in range(3)]
    sock = tmp_path / "s.nbd"

    async def main() -> None:
        backend = CrucibleBackend("s", make_vcr([d.target for d in dss]), sock, retry=FAST)
        try:
            await backend.start_export()
            await backend.activate()
            await qemu_io(sock, "write -P 1 0 64k", "flush")
            # every extent dirty on every copy: nbdcopy (unlike qemu-io) sends no flush
            image = tmp_path / "src.raw"
            image.write_bytes(b"\x02" * REGION_BYTES)
            await copy_without_flush(image, sock)
            port = dss[1].port
            await asyncio.to_thread(dss[1].kill)
            await wait_not_active(backend, 1)
            await asyncio.to_thread(dss[1].start, port)
            await poll_until(
                lambda: ds_states(backend) == ["active"] * 3,
                "the live repair",
                STEP_S,
                last=lambda: backend.status()["downstairs"],
            )
            # a write, so qemu-io's flush is really sent (it skips a flush with nothing written)
            await qemu_io(sock, "write -P 3 0 4k", "flush", "read -P 2 1M 64k")
        finally:
            await backend.close()

    run_bounded(main(), 60)
    assert_regions_identical(dss)
