"""Randomised fault runs: a writer with a verifiable pattern through NBD while downstairs are
killed, stopped, paused, restarted and replaced at random points.

Per run (seeded, bounded in faults and time): three downstairs from a ``DownstairsSet``
(processes, and containers when Docker is available), our upstairs + NBD export in this
process, and ``qemu-io`` writing 4-64 KiB patterns at random offsets, flushing now and then.
One fault at a time (Crucible tolerates one downstairs in flux): wait until all three are
active, inject, let the writer run on, heal. At the end: every acknowledged write reads back
through NBD (the upstairs never died, so not only flushed ones), and the three copies are
identical in data, block contexts and extent versions (gen, flush, dirty).

Knobs: ``PHD_FAULT_SEEDS`` (comma-separated: every flavour runs every seed; unset, the PR
run's two runs: processes with seed 1, containers with seed 2; ci/nightly sets "1,2,3"),
``PHD_FAULT_COUNT`` (faults per
run, default 6), ``PHD_FAULT_KINDS`` (default "kill,stop,pause,replace"). Each run appends a
JSON line to ``results/fault-runs.jsonl``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from phd.framework import Framework
from phd.storage.downstairs import DockerDownstairs, ProcessDownstairs
from phd.storage.dsc import DownstairsSet, RegionGeometry, docker_members, process_members
from sut.storage.backend import CrucibleBackend, RetryPolicy
from sut.storage.extent_raw import RawRegion
from sut.storage.vcr import dump_vcr, region_volume

from .conftest import qemu_io

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
GEOMETRY = RegionGeometry(block_size=512, extent_size=1024, extent_count=16)  # 8 MiB
CHUNK = 4096  # the model tracks the pattern of every 4 KiB chunk
CHUNKS = GEOMETRY.size_bytes // CHUNK
POLICY = RetryPolicy(connect_timeout_s=1.0, reconnect_delay_s=0.2, io_timeout_s=2.0, keepalive_s=0.25)
FLAVOURS = ("process", "docker")


def _runs(seeds: str | None) -> list[tuple[str, int]]:
    """(flavour, seed) pairs: each flavour with each of ``seeds``; unset, one seed per flavour
    (each run takes 20-40 s of a loaded CI machine; the nightly runs the cross product)."""
    if seeds is None:
        return [("process", 1), ("docker", 2)]
    try:
        numbers = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise pytest.UsageError(f"PHD_FAULT_SEEDS={seeds!r}: give comma-separated integers, "
                                "e.g. 1,2,3") from None
    return [(flavour, seed) for flavour in FLAVOURS for seed in numbers]


RUNS = _runs(os.environ.get("PHD_FAULT_SEEDS"))
FAULTS_PER_RUN = int(os.environ.get("PHD_FAULT_COUNT", "6"))
FAULT_KINDS = tuple(os.environ.get("PHD_FAULT_KINDS", "kill,stop,pause,replace").split(","))
SETTLE_S = 90.0  # replay / repair of an 8 MiB region takes well under a second here


class Model:
    """What every 4 KiB chunk must read back as (0 = never written)."""

    def __init__(self) -> None:
        self.chunks = bytearray(CHUNKS)

    def apply(self, writes: list[tuple[int, int, int]]) -> None:
        for pattern, first, count in writes:
            self.chunks[first : first + count] = bytes([pattern]) * count

    def read_commands(self) -> list[str]:
        out = []
        start = 0
        for i in range(1, CHUNKS + 1):
            if i == CHUNKS or self.chunks[i] != self.chunks[start]:
                out.append(f"read -P {self.chunks[start]} {start * CHUNK} {(i - start) * CHUNK}")
                start = i
        return out


class Run:
    def __init__(self, seed: int, dss: DownstairsSet, sock: Path) -> None:
        # separate streams: which faults happen is reproducible from the seed even though
        # how many writes land between them depends on timing
        self.rng = random.Random(seed)
        self.write_rng = random.Random(f"writes-{seed}")
        self.dss = dss
        self.members = [0, 1, 2]  # set member index behind each of the three targets
        self.volume_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        self.gen = 1
        self.backend = CrucibleBackend("fr", self.vcr(), sock, retry=POLICY)
        self.model = Model()
        self.writes = 0
        self.flushes = 0
        self.faults: list[str] = []
        self.stop_writer = asyncio.Event()

    def vcr(self) -> str:
        return dump_vcr(region_volume(
            self.volume_id, [self.dss.member(i).address for i in self.members], gen=self.gen,
            block_size=GEOMETRY.block_size, blocks_per_extent=GEOMETRY.extent_size,
            extent_count=GEOMETRY.extent_count))

    def states(self) -> list[str]:
        downstairs = cast(list[dict[str, Any]], self.backend.status()["downstairs"])
        return [str(d["state"]) for d in downstairs]

    async def settled(self, what: str) -> None:
        deadline = time.monotonic() + SETTLE_S
        while self.states() != ["active"] * 3:
            if time.monotonic() > deadline:
                raise AssertionError(f"not all active {SETTLE_S} s after {what}: "
                                     f"{self.backend.status()['downstairs']}\n{self.dss.format_steps()}")
            await asyncio.sleep(0.05)  # poll interval of a deadline-bounded wait

    async def writer(self, sock: Path) -> None:
        """qemu-io rounds of 1-6 writes (+ a flush every other round) until told to stop."""
        n = 0
        while not self.stop_writer.is_set():
            n += 1
            pattern = n % 255 + 1
            writes = []
            for _ in range(self.write_rng.randint(1, 6)):
                count = self.write_rng.randint(1, 16)
                first = self.write_rng.randrange(0, CHUNKS - count + 1)
                writes.append((pattern, first, count))
            cmds = [f"write -P {p} {f * CHUNK} {c * CHUNK}" for p, f, c in writes]
            flush = n % 2 == 0
            await qemu_io(sock, *cmds, *(["flush"] if flush else []), timeout_s=60)
            self.model.apply(writes)  # acknowledged: must read back from now on
            self.writes += len(writes)
            self.flushes += int(flush)

    async def inject(self) -> None:
        await self.settled("the previous fault")
        action = self.rng.choice(FAULT_KINDS)
        slot = self.rng.randrange(3)
        member = self.members[slot]
        await asyncio.sleep(self.rng.uniform(0.05, 0.6))  # a random point in the write stream
        if action == "replace":
            new = await asyncio.to_thread(self.dss.add)
            self.members[slot] = new
            self.gen += 1
            result = await self.backend.replace(self.vcr())
            assert result == "Started", result
            self.faults.append(f"replace ds{member} -> ds{new}")
            await asyncio.to_thread(self.dss.destroy, member)
        else:
            await asyncio.to_thread(self.dss.act, action, member)
            self.faults.append(f"{action} ds{member}")
            await asyncio.sleep(self.rng.uniform(0.1, 2.5))  # how long the fault lasts
            await asyncio.to_thread(self.dss.act, "resume" if action == "pause" else "start", member)


@dataclass(frozen=True)
class Copy:
    """One member's region as its raw extent files say (read with our reader of Crucible's
    format, which refuses a torn extent): per-extent (gen, flush, dirty), data, contexts."""

    versions: list[tuple[int, int, bool]]
    data: bytes
    contexts: list[object]


def read_copy(member: object) -> Copy:
    """The region of a member, whatever its flavour (a container's /data is copied out)."""
    with tempfile.TemporaryDirectory(prefix="phd-fr-copy-") as tmp:
        if isinstance(member, ProcessDownstairs):
            root = member.data_dir
        else:
            assert isinstance(member, DockerDownstairs)
            container = member.client.containers.get(member.name)
            stream: Iterable[bytes]
            stream, _ = container.get_archive("/data")
            with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                tar.extractall(tmp, filter="data")
            root = Path(tmp) / "data"
        with RawRegion.open(root, read_only=True) as region:
            gens, flushes, dirty = region.versions()
            data, contexts = region.read(0, region.total_blocks)
    return Copy(list(zip(gens, flushes, dirty, strict=True)), data, list(contexts))


def assert_copies_identical(dss: DownstairsSet, members: list[int]) -> None:
    """Same (gen, flush, dirty) per extent, same data and block contexts on all three. (The
    files themselves may differ: which context slot a block uses, and the bonus fsync count,
    depend on each copy's history - a replay or a repair - as in Crucible.)"""
    copies = [read_copy(dss.member(i)) for i in members]
    versions = [c.versions for c in copies]
    assert versions[0] == versions[1] == versions[2], f"extent versions differ: {versions}"
    got = [c.data for c in copies]
    if not got[0] == got[1] == got[2]:
        odd = [i for i in range(3) if got[i] != got[(i + 1) % 3] and got[i] != got[(i + 2) % 3]]
        a, b = (got[0], got[1]) if got[0] != got[1] else (got[0], got[2])
        at = next(k for k in range(min(len(a), len(b))) if a[k] != b[k])
        raise AssertionError(
            f"extent data differs between the copies (first at block {at // GEOMETRY.block_size}); "
            f"odd one out: {[f'ds{members[i]}' for i in odd]}\n{dss.format_steps()}"
        )
    contexts = [c.contexts for c in copies]
    assert contexts[0] == contexts[1] == contexts[2], "block contexts differ between the copies"


def make_set(flavour: str, fw: Framework, node_id: str, root: Path) -> DownstairsSet:
    if flavour == "docker":
        prefix = f"phd-{fw.session_id}-fr{uuid.uuid4().hex[:6]}"
        make = docker_members(fw.docker(), fw.downstairs_image(), fw.labels(node_id), prefix, log_dir=root)
    else:
        make = process_members(fw.config.downstairs_cmd, root)
    # 3 members + up to one replacement per fault; each a port pair (its repair server: + 4000)
    ports = [fw.ports.allocate_pair() for _ in range(3 + FAULTS_PER_RUN)]
    return DownstairsSet(make, ports, geometry=GEOMETRY)


@pytest.mark.parametrize(("flavour", "seed"), RUNS, ids=[f"{f}-{s}" for f, s in RUNS])
def test_random_faults_lose_no_acknowledged_write(
    flavour: str, seed: int, phd_framework: Framework, phd_test_dir: Path, request: pytest.FixtureRequest
) -> None:
    started = time.monotonic()
    with make_set(flavour, phd_framework, request.node.nodeid, phd_test_dir) as dss:
        record: dict[str, Any] = {}

        async def main() -> None:
            # unix socket paths are limited to 107 bytes: not under the (long) test dir
            sock_dir = Path(tempfile.mkdtemp(prefix="phd-fr-"))
            sock = sock_dir / "disk.nbd"
            run = Run(seed, dss, sock)
            writer: asyncio.Task[None] | None = None
            try:
                await run.backend.start_export()
                await run.backend.activate()
                writer = asyncio.create_task(run.writer(sock))
                for _ in range(FAULTS_PER_RUN):
                    await run.inject()
                    if writer.done():
                        break
                await run.settled("the last fault")
                run.stop_writer.set()
                await asyncio.wait_for(writer, 90)  # re-raises a failed write
                await qemu_io(sock, "flush")
                await qemu_io(sock, *run.model.read_commands(), timeout_s=120)
            finally:
                if writer is not None and not writer.done():
                    writer.cancel()
                await run.backend.close()
                shutil.rmtree(sock_dir, ignore_errors=True)
            record.update(seed=seed, flavour=flavour, faults=run.faults, writes=run.writes,
                          flushes=run.flushes, members=list(run.members))

        async def bounded() -> None:
            async with asyncio.timeout(600):
                await main()

        try:
            asyncio.run(bounded())
        except BaseException:
            print(dss.format_steps())
            raise
        assert len(record["faults"]) == FAULTS_PER_RUN, record
        print(json.dumps(record))
        assert_copies_identical(dss, record["members"])
    record["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(record))
    (REPO / "results").mkdir(exist_ok=True)
    with open(REPO / "results" / "fault-runs.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
