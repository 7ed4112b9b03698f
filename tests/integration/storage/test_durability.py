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
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from sut.storage import wire
from sut.storage.backend import CrucibleBackend, RetryPolicy
from sut.storage.extent_raw import CONTEXT_SLOT_BYTES, META_BYTES, RawRegion, extent_path
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
            # ended that session its files are at rest: every extent must open (region_on_disk
            # refuses a torn one) and no repair scratch directory is left.
            for d, since in zip(dss, offsets, strict=True):
                await wait_session_over(d, since)
                assert not region_on_disk(d.data_dir).tmp_files, (
                    f"{d.data_dir}: leftover repair scratch directories"
                )
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
                # its own metadata survived the kill: the region opens (a dirty extent's
                # active slots are recomputed from its data; a torn one would be refused)
                on_disk = region_on_disk(victim.data_dir)
                RawRegion.open(victim.data_dir).close()
                events.append(
                    {
                        "round": rnd,
                        "victim": victim_index,
                        "scratch_dirs": on_disk.tmp_files,
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
# The raw extent rules (sut/storage/extent_raw.py, as Crucible's extent_inner_raw.rs): before
# the first write since a flush lands, the extent's dirty byte is written and fsynced; a block
# written twice since the last fsync is fsynced first; the new contexts go to the block's
# INACTIVE slot, then the data. At a flush, each dirty extent gets its bitmap + metadata
# written and then an fsync - all before FlushAck; clean extents are not touched.
U_STRACE = uuid.UUID("0f0e0d0c-0b0a-4908-8706-050403020100")
S_STRACE = uuid.UUID("1f1e1d1c-1b1a-4918-9716-151413121110")
_VARIANT = {cls.__name__: i for i, cls in enumerate(m.VARIANTS)}
# offsets inside one extent file (the layout table of extent_raw's docstring)
_DATA_END = EXTENT_SIZE * BLOCK_SIZE
_SLOT_A = _DATA_END
_SLOT_B = _DATA_END + EXTENT_SIZE * CONTEXT_SLOT_BYTES
_BITMAP = _DATA_END + 2 * EXTENT_SIZE * CONTEXT_SLOT_BYTES
_META = _BITMAP + (EXTENT_SIZE + 7) // 8


@dataclass
class Syscall:
    name: str
    line: str
    fd_path: str = ""  # what strace -y names the first argument (a path, or socket:[inode])
    data: bytes = b""  # the buffer (-xx: every byte as \xNN; -s 120 keeps its head)
    count: int = -1  # pwrite64's count
    offset: int = -1  # pwrite64's offset

    @property
    def variant(self) -> int | None:
        """The Message variant index of a frame that starts this socket buffer."""
        return struct.unpack_from("<I", self.data, 4)[0] if len(self.data) >= 8 else None


_CALL = re.compile(r'^\d+\s+(\w+)\((\d+)<([^>]*)>(?:, "((?:\\x[0-9a-f]{2})*)"(?:\.\.\.)?)?(.*)\) = (-?\d+)')


def parse_strace(text: str) -> list[Syscall]:
    """Completed calls that succeeded (unfinished / resumed halves and failures are skipped)."""
    calls = []
    for line in text.splitlines():
        got = _CALL.match(line)
        if got is None or int(got.group(6)) < 0:
            continue
        name, _fd, path, hexdata, rest = got.group(1, 2, 3, 4, 5)
        if "\\x" in path:  # -xx escapes the -y names too
            path = bytes.fromhex(path.replace("\\x", "")).decode(errors="replace")
        call = Syscall(name, line, path, bytes.fromhex((hexdata or "").replace("\\x", "")))
        if name.startswith("pwrite"):
            count, offset = (int(x) for x in rest.strip(", ").split(", ")[:2])
            call.count, call.offset = count, offset
        calls.append(call)
    return calls


class RawSession:
    """An upstairs-side connection speaking v13 frames (sut.storage.wire), one job at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.assembler = wire.FrameAssembler(wire.MAX_FRAME)
        self.pending: list[wire.Message] = []

    @classmethod
    async def active(cls, port: int, gen: int) -> RawSession:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self = cls(reader, writer)
        hello = m.HereIAm(wire.MESSAGE_VERSION, U_STRACE, S_STRACE, gen, False, False, ())
        assert isinstance(await self.ask(hello), m.YesItsMe)
        assert isinstance(await self.ask(m.PromoteToActive(U_STRACE, S_STRACE, gen)), m.YouAreNowActive)
        assert isinstance(await self.ask(m.RegionInfoPlease()), m.RegionInfo)
        assert isinstance(await self.ask(m.ExtentVersionsPlease()), m.ExtentVersions)
        return self

    async def ask(self, msg: wire.Message) -> wire.Message:
        self.writer.write(wire.encode(msg))
        await self.writer.drain()
        while not self.pending:
            chunk = await asyncio.wait_for(self.reader.read(1 << 16), 10)
            assert chunk, f"the downstairs closed the connection after {type(msg).__name__}"
            self.pending += self.assembler.feed(chunk)
        return self.pending.pop(0)

    async def job(self, msg: wire.Message, reply: type) -> None:
        got = await self.ask(msg)
        assert isinstance(got, reply) and getattr(got, "result", "?") is None, f"{type(msg).__name__}: {got}"

    def close(self) -> None:
        self.writer.close()


def _write(job_id: int, block: int, byte: int, deps: tuple[int, ...] = ()) -> m.Write:
    data = bytes([byte]) * BLOCK_SIZE
    header = wire.WriteHeader(U_STRACE, S_STRACE, job_id, deps, block, unencrypted_contexts(data, BLOCK_SIZE))
    return m.Write(header, data)


def _on(calls: list[Syscall], start: int, end: int, eid: int, name: str) -> list[int]:
    """Indexes in [start, end) of ``name`` calls (a prefix: "pwrite" matches pwrite64) on the
    file of extent ``eid``."""
    tail = "/" + extent_path(Path("r"), eid).relative_to("r").as_posix()
    return [
        i for i in range(start, end) if calls[i].name.startswith(name) and calls[i].fd_path.endswith(tail)
    ]


def test_flush_ack_is_sent_only_after_fsync_strace(downstairs: DownstairsFactory, tmp_path: Path) -> None:
    """strace a real downstairs process through three Writes and a Flush (v13 frames): the raw
    extent order of writes, fsyncs and acks as extent_raw's docstring (and Crucible) has it."""
    if shutil.which("strace") is None:
        pytest.skip(
            "strace is not installed (apt-get install strace); tests/unit/storage/test_extent_raw.py "
            "checks the file contents the same steps leave"
        )
    ds = downstairs.create()
    assert ds.process is not None and ds.process.pid is not None
    trace = tmp_path / "strace.txt"
    err = tmp_path / "strace.err"
    with err.open("wb") as err_file:
        tracer = subprocess.Popen(
            [
                "strace",
                "-f",
                "-y",
                "-xx",
                "-s",
                "120",
                "-e",
                "trace=fsync,fdatasync,pwrite64,pwritev,pwritev2,write,writev,"
                "recvfrom,recvmsg,read,sendto,sendmsg",
                "-o",
                str(trace),
                "-p",
                str(ds.process.pid),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )
    second_extent_block = 3 * EXTENT_SIZE + 5
    try:
        deadline = time.monotonic() + 10
        while b"attached" not in err.read_bytes():
            if b"Operation not permitted" in err.read_bytes():
                pytest.skip(f"ptrace is not permitted here: {err.read_text().strip()}")
            assert tracer.poll() is None and time.monotonic() < deadline, f"strace: {err.read_text()}"
            time.sleep(0.02)  # poll interval of a deadline-bounded wait

        async def main() -> None:
            session = await RawSession.active(ds.port, gen=1)
            try:
                await session.job(_write(1000, 0, 0x5A), m.WriteAck)
                await session.job(_write(1001, second_extent_block, 0x5B), m.WriteAck)
                await session.job(_write(1002, 0, 0x5C, (1000,)), m.WriteAck)  # block 0 again
                flush = m.Flush(U_STRACE, S_STRACE, 1003, (1000, 1001, 1002), 1, 1)
                await session.job(flush, m.FlushAck)
            finally:
                session.close()

        run_bounded(main(), 30)
        # The FlushAck reached us while strace may still be inside that sendto (its return not
        # logged yet): detaching now would leave the line "<detached ...>", which the parser
        # (rightly) skips. Wait until strace has logged the call's return.
        deadline = time.monotonic() + 10
        while not any(c.fd_path.startswith("socket:") and c.name.startswith(("send", "write"))
                      and c.variant == _VARIANT["FlushAck"] for c in parse_strace(trace.read_text())):
            assert time.monotonic() < deadline, "strace never logged the FlushAck's sendto returning"
            time.sleep(0.05)  # poll interval of a deadline-bounded wait
    finally:
        tracer.send_signal(signal.SIGINT)  # detaches from the downstairs, which keeps running
        tracer.wait(10)
    text = trace.read_text()
    calls = parse_strace(text)
    sock = [i for i, c in enumerate(calls) if c.fd_path.startswith("socket:")]

    def frames(direction: tuple[str, ...], variant: str) -> list[int]:
        return [
            i for i in sock if calls[i].name.startswith(direction) and calls[i].variant == _VARIANT[variant]
        ]

    writes_in = frames(("recv", "read"), "Write")
    flush_in = frames(("recv", "read"), "Flush")
    write_acks = frames(("send", "write"), "WriteAck")
    flush_acks = frames(("send", "write"), "FlushAck")
    counts = (len(writes_in), len(write_acks), len(flush_in), len(flush_acks))
    # the counts first: the trace behind them is long and pytest cuts long messages short
    assert counts == (3, 3, 1, 1), f"(Writes, WriteAcks, Flushes, FlushAcks) seen = {counts}:\n{text}"
    where = "\n".join(c.line for c in calls)

    def step(i: int, eid: int, block: int, *, first_since_flush: bool, rewrite: bool, slot_base: int) -> None:
        start, ack = writes_in[i], write_acks[i]
        pw = _on(calls, start, ack, eid, "pwrite")
        syncs = _on(calls, start, ack, eid, "fsync") + _on(calls, start, ack, eid, "fdatasync")
        dirty = [j for j in pw if calls[j].offset == _META and calls[j].data == b"\x01"]
        contexts = [j for j in pw if calls[j].offset == slot_base + block * CONTEXT_SLOT_BYTES]
        data = [j for j in pw if calls[j].offset == block * BLOCK_SIZE and calls[j].count == BLOCK_SIZE]
        label = f"write {i} (extent {eid}, block {block})"
        assert len(contexts) == 1 and len(data) == 1, (
            f"{label}: contexts/data not written before its ack:\n{where}"
        )
        assert contexts[0] < data[0], f"{label}: data written before its contexts:\n{where}"
        if first_since_flush:
            assert dirty and syncs, f"{label}: no dirty byte + fsync before the ack:\n{where}"
            assert dirty[0] < syncs[0] < contexts[0], (
                f"{label}: dirty byte not durable before the write:\n{where}"
            )
        else:
            assert not dirty, f"{label}: the dirty byte written again:\n{where}"
        if rewrite:
            assert syncs and syncs[0] < contexts[0], f"{label}: a rewritten block not fsynced first:\n{where}"
        elif not first_since_flush:
            assert not syncs, f"{label}: an fsync nobody needs:\n{where}"
        # nothing on the bitmap or metadata besides the dirty byte until the flush
        assert not [j for j in pw if calls[j].offset >= _BITMAP and j not in dirty], where

    # a fresh block's active slot is A (bitmap 0), so its first contexts go to B, the next to A
    step(0, 0, 0, first_since_flush=True, rewrite=False, slot_base=_SLOT_B)
    step(1, 3, 5, first_since_flush=True, rewrite=False, slot_base=_SLOT_B)
    step(2, 0, 0, first_since_flush=False, rewrite=True, slot_base=_SLOT_A)

    start, end = flush_in[0], flush_acks[0]
    for eid in (0, 3):
        stamp = [j for j in _on(calls, start, end, eid, "pwrite") if calls[j].offset == _BITMAP]
        syncs = _on(calls, start, end, eid, "fsync") + _on(calls, start, end, eid, "fdatasync")
        assert stamp and calls[stamp[0]].count == _META - _BITMAP + META_BYTES, (
            f"extent {eid}: bitmap + metadata not written before FlushAck:\n{where}"
        )
        assert syncs and stamp[0] < max(syncs), (
            f"extent {eid}: not fsynced after its stamp, before FlushAck:\n{where}"
        )
    for eid in set(range(EXTENT_COUNT)) - {0, 3}:
        assert not _on(calls, 0, len(calls), eid, "pwrite"), f"clean extent {eid} was written:\n{where}"
    on_disk = region_on_disk(ds.data_dir)
    assert on_disk.stamps[0] == on_disk.stamps[3] == (1, 1, False)
    assert on_disk.data[:BLOCK_SIZE] == b"\x5c" * BLOCK_SIZE
    assert on_disk.data[second_extent_block * BLOCK_SIZE :][:BLOCK_SIZE] == b"\x5b" * BLOCK_SIZE


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


def test_downstairs_back_with_another_region_is_not_trusted_with_the_old_data(
    downstairs: DownstairsFactory, tmp_path: Path
) -> None:
    """A downstairs goes away and comes back at the same address with ANOTHER region (its
    region re-created: a new UUID, none of the flushed data). Crucible's upstairs remembers
    each downstairs' region UUID and does not take a different one back (client.rs, RegionInfo;
    it panics). Ours must not replay the offline backlog onto it and call it a good copy: it
    must repair it, or leave it out; either way every read of flushed data stays right."""
    dss = [downstairs.create() for _ in range(3)]
    sock = tmp_path / "r.nbd"
    seen: dict[str, object] = {}

    async def main() -> None:
        backend = CrucibleBackend("r", make_vcr([d.target for d in dss]), sock, retry=FAST)
        try:
            await backend.start_export()
            await backend.activate()
            await qemu_io(sock, "write -P 0x41 0 1M", "flush")
            port = dss[1].port
            await asyncio.to_thread(dss[1].kill)
            await wait_not_active(backend, 1)
            shutil.rmtree(dss[1].data_dir)
            created = await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "sut.storage.downstairs",
                    "create",
                    "-u",
                    str(uuid.uuid4()),
                    "-d",
                    str(dss[1].data_dir),
                    "--block-size",
                    str(BLOCK_SIZE),
                    "--extent-size",
                    str(EXTENT_SIZE),
                    "--extent-count",
                    str(EXTENT_COUNT),
                ],
                capture_output=True,
                check=False,
            )
            assert created.returncode == 0, created.stderr
            await qemu_io(sock, "write -P 0x42 2M 64k")  # a backlog for the offline copy
            await asyncio.to_thread(dss[1].start, port)
            await poll_until(
                lambda: (
                    ds_states(backend)[1] in ("active", "disabled")
                    and ds_states(backend).count("active") >= 2
                ),
                "the returning downstairs to be dealt with",
                STEP_S,
                last=lambda: backend.status()["downstairs"],
            )
            seen["returned"] = backend.status()["downstairs"][1]  # type: ignore[index]
            # reads of 1 MiB rotate over the active copies: six cover each one twice
            for _ in range(6):
                await qemu_io(sock, "read -q -P 0x41 0 1M", "read -q -P 0x42 2M 64k")
        finally:
            await backend.close()

    run_bounded(main(), 90)
    print(f"\nreturning downstairs: {seen['returned']}")
