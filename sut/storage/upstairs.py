"""The upstairs of one region in Crucible's protocol: three downstairs, activation, I/O, repair.

Activation (read-write): every downstairs must reach ``wait_quorum``; then collate (the
requested generation must exceed every stored extent generation, else
:class:`StorageFatalError`) and RECONCILE the extents whose ``(gen, flush, dirty)`` differ or
are dirty, as Crucible does: for each, ``ExtentFlush`` to the chosen source (the highest
``(gen, flush)``), ``ExtentClose`` to all, ``ExtentRepair`` to the others (each downloads the
extent from the source's repair server), ``ExtentReopen`` to all; every request is answered by
every downstairs it went to before the next is sent. Then the region is active.

I/O: every job gets one upstairs-wide job id and its dependencies (:class:`DependencyTracker`,
Crucible's rule: a write depends on every earlier job touching its blocks, a read on earlier
writes to its blocks, a flush or barrier on everything since the previous one, and everything
on the last flush or barrier). Writes and flushes go to every member and complete once TWO
downstairs (or every member, if fewer remain) acknowledged them; reads go to one active
downstairs and are retried on another if that one fails or returns a block whose hash does
not match (which also faults it). A member that drops is OFFLINE and replays its backlog
after ``LastFlush`` when it returns (see :mod:`sut.storage.client`).

LIVE REPAIR of a downstairs that joined while active (a replacement, or a faulted one
returning) goes extent by extent while guest I/O continues: four jobs per extent, with
dependencies like I/O (``ExtentLiveClose`` on the repaired copy and ``ExtentLiveFlushClose``
elsewhere; ``ExtentLiveRepair`` on the repaired copy, a NoOp elsewhere; a NoOp; then
``ExtentLiveReopen``). Guest writes to extents whose repair has been submitted go to the
repaired copy too (ordered after the reopen by their dependencies); writes to later extents
skip it (their extent's repair brings them); flushes reach it with ``extent_limit``.

A takeover (another upstairs at a higher generation; ``YouAreNoLongerActive``) disables this
upstairs at once: every pending and later I/O fails with :class:`StorageError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import uuid
from collections.abc import Sequence

from sut.storage.client import (
    NO_FLAWS,
    BarrierOp,
    ClientState,
    DownstairsClient,
    Flaws,
    FlushOp,
    LiveCloseOp,
    LiveNoOp,
    LiveReopenOp,
    LiveRepairOp,
    Op,
    ReadOp,
    RetryPolicy,
    SessionInfo,
    WriteOp,
)
from sut.storage.crypt import BlockCipher
from sut.storage.errors import ReplaceRuleError, StorageError, StorageFatalError
from sut.storage.vcr import RegionVcr
from sut.storage.wire import messages as m
from sut.storage.wire.blockhash import unencrypted_contexts
from sut.storage.wire.crucible_error import CrucibleError
from sut.storage.wire.fields import PlainReadContexts, ReadBlockEmpty

__all__ = ["Activation", "DependencyTracker", "Upstairs"]


_LARGE_READ = 64 * 1024  # bytes; reads at least this big are spread over the downstairs
_WRITE_QUORUM = 2  # acknowledgements a write or flush needs (Crucible: two of three)
_DEFAULT_FLUSH_TIMEOUT_S = 0.5  # Crucible flushes on its own when the guest has not
_FIRST_JOB_ID = 1000  # where Crucible's job ids start
_RECONCILE_TIMEOUT_S = 60.0  # one reconciliation request on every downstairs it went to
# A hand-over activation (a migration target's) fails once one downstairs refused our promote
# this many times in a row: it means another session holds the disk at our generation or
# above, which a correct hand-over never meets (see DownstairsClient._promote).
HANDOVER_PROMOTE_REFUSALS = 3
_MAX_JOBS_SINCE_FLUSH = 4096  # more and the upstairs flushes on its own (bounds deps and backlogs)


def _upstairs_id(text: str) -> uuid.UUID:
    """The region's opts.id as a UUID (Crucible's type); an id that is no UUID (a VCR built by
    hand) gets a stable one derived from it rather than failing the volume's construction."""
    try:
        return uuid.UUID(text)
    except ValueError:
        return uuid.uuid5(uuid.NAMESPACE_OID, text)


class Activation(enum.Enum):
    INACTIVE = "inactive"
    ACTIVATING = "activating"
    ACTIVE = "active"
    FAILED = "failed"
    CLOSED = "closed"


class DependencyTracker:
    """Which earlier jobs a new job must wait for (Crucible's rule, see the module docstring).

    Jobs since the last flush or barrier are kept in buckets of ``bucket`` blocks, so a job
    only compares itself with jobs near its blocks. A write that covers an earlier job's
    blocks entirely replaces it (whatever waits for the write waits for it too); a finished
    read is forgotten (nothing can have to wait for a read that is done).
    """

    def __init__(self, bucket: int = 256) -> None:
        self.bucket = bucket
        self.barrier: int | None = None  # the last flush or barrier
        self._buckets: dict[
            int, dict[int, tuple[int, int, bool]]
        ] = {}  # bucket -> id -> (first, last, write)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def _add(self, job_id: int, first: int, last: int, write: bool) -> tuple[int, ...]:
        deps: set[int] = set()
        covered: dict[int, tuple[int, int]] = {}  # id -> its (first, last)
        for b in range(first // self.bucket, last // self.bucket + 1):
            for other, (f, la, w) in self._buckets.get(b, {}).items():
                if f <= last and first <= la and (write or w):
                    deps.add(other)
                    if write and first <= f and la <= last:
                        covered[other] = (f, la)
        for other, (f, la) in covered.items():
            # entirely inside this write: every bucket holding it is one this write spans
            for b in range(f // self.bucket, la // self.bucket + 1):
                jobs = self._buckets.get(b)
                if jobs is not None and jobs.pop(other, None) is not None and not jobs:
                    del self._buckets[b]
            self._count -= 1
        new = False
        for b in range(first // self.bucket, last // self.bucket + 1):
            self._buckets.setdefault(b, {})[job_id] = (first, last, write)
            new = True
        if new:
            self._count += 1
        if self.barrier is not None:
            deps.add(self.barrier)
        return tuple(sorted(deps))

    def write(self, job_id: int, first: int, last: int) -> tuple[int, ...]:
        return self._add(job_id, first, last, True)

    def read(self, job_id: int, first: int, last: int) -> tuple[int, ...]:
        return self._add(job_id, first, last, False)

    def done(self, job_id: int, first: int, last: int) -> None:
        """A read finished: later writes need not wait for it."""
        found = False
        for b in range(first // self.bucket, last // self.bucket + 1):
            jobs = self._buckets.get(b)
            if jobs is not None and jobs.pop(job_id, None) is not None:
                found = True
                if not jobs:
                    del self._buckets[b]
        if found:
            self._count -= 1

    def flush(self, job_id: int) -> tuple[int, ...]:
        """A flush or barrier: it waits for everything since the last one; later jobs wait for it."""
        deps = {j for jobs in self._buckets.values() for j in jobs}
        if self.barrier is not None:
            deps.add(self.barrier)
        self._buckets = {}
        self._count = 0
        self.barrier = job_id
        return tuple(sorted(deps))


class _Quorum:
    """Completes when ``needed`` jobs succeeded, or when every job has ended."""

    def __init__(
        self, clients: Sequence[DownstairsClient], futures: Sequence[asyncio.Future[m.Message]], needed: int
    ) -> None:
        self.needed = needed
        self.ok = 0
        self.left = len(futures)
        self.errors: list[str] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for client, future in zip(clients, futures, strict=True):
            future.add_done_callback(functools.partial(self._one, client))
        if not futures:
            self.done.set_result(None)

    def _one(self, client: DownstairsClient, future: asyncio.Future[m.Message]) -> None:
        self.left -= 1
        if future.cancelled():
            self.errors.append(f"{client.target}: cancelled")
        elif future.exception() is not None:
            self.errors.append(f"{client.target}: {future.exception()}")
        else:
            self.ok += 1
        if not self.done.done() and (self.ok >= self.needed or self.left == 0):
            self.done.set_result(None)


class Upstairs:
    def __init__(
        self,
        region: RegionVcr,
        *,
        read_only: bool,
        retry: RetryPolicy,
        flaws: Flaws = NO_FLAWS,
        logger: logging.Logger,
    ) -> None:
        self.region = region
        self.read_only = read_only or region.opts.read_only
        self.retry = retry
        self.flaws = flaws
        self.log = logger
        self.state = Activation.INACTIVE
        self.failure: StorageFatalError | None = None
        self.targets: list[str] = list(region.opts.target)
        self._gen = region.gen
        self._upstairs_id = _upstairs_id(str(region.opts.id))
        key = region.opts.key
        self._cipher = BlockCipher(key) if key is not None else None
        self._session_id = uuid.uuid4()
        self._clients: dict[str, DownstairsClient] = {}
        self._changed = asyncio.Event()
        self._io_open = asyncio.Event()  # set once I/O may be submitted (active, or failed)
        self._activating = False
        self._refusals_fatal_after: int | None = None  # for clients made during an activation
        self._flush_number = 0
        self._next_job = _FIRST_JOB_ID
        self._deps = DependencyTracker()
        self._repairs: dict[str, asyncio.Task[None]] = {}
        self._dying: list[asyncio.Task[None]] = []  # client tasks cancelled by a takeover
        self._read_cursor = 0
        self._read_batch_open = False
        self._writes_since_flush = False
        self._autoflush: asyncio.Task[None] | None = None
        timeout = region.opts.flush_timeout
        self._flush_timeout_s = float(timeout) if timeout else _DEFAULT_FLUSH_TIMEOUT_S

    # -- clients ---------------------------------------------------------------------------
    def _session(self) -> SessionInfo:
        r = self.region
        return SessionInfo(
            self._upstairs_id,
            self._session_id,
            self._gen,
            self.read_only,
            r.opts.key is not None,
            r.block_size,
            r.blocks_per_extent,
            r.extent_count,
        )

    def _new_client(self, target: str) -> DownstairsClient:
        client = DownstairsClient(
            target,
            self.targets.index(target),
            self._session(),
            self.retry,
            self._client_changed,
            self.log,
            self._cipher,
            self.flaws,
        )
        client.refusals_fatal_after = self._refusals_fatal_after
        self._clients[target] = client
        client.start()
        return client

    def _client_changed(self, client: DownstairsClient) -> None:
        self._changed.set()
        if self._clients.get(client.target) is not client:
            return
        if client.taken_over:
            if self.state is Activation.ACTIVE:
                # Another upstairs with a higher generation owns the region now: disable
                # ourselves rather than write to the copies that are still ours.
                self._fail(StorageFatalError(f"deactivated: {client.last_error}"))
            return
        if self.state is Activation.ACTIVE and client.state is ClientState.WAIT_QUORUM:
            if client.replayable:
                client.replay()
                client.set_state(ClientState.ACTIVE)
            else:
                self._start_repair(client)

    def _fail(self, exc: StorageFatalError) -> None:
        if self.failure is None:
            self.failure = exc
            self.log.error("upstairs %s failed: %s", self.region.opts.id, exc)
        self.state = Activation.FAILED
        for task in self._repairs.values():
            task.cancel()
        if self._autoflush is not None:
            self._autoflush.cancel()
        for c in self._clients.values():
            client_task = c.disable(f"upstairs disabled: {exc}")
            if client_task is not None:
                self._dying.append(client_task)
        self._io_open.set()  # held I/O must wake up and see the failure

    def clients(self) -> list[DownstairsClient]:
        return [self._clients[t] for t in self.targets if t in self._clients]

    def info(self) -> dict[str, object]:
        """This region's upstairs as a whole (ids, generation, what it is doing now)."""
        repairing = any(c.state.value == "repairing" for c in self._clients.values())
        return {
            "upstairs_id": str(self._upstairs_id),
            "session_id": str(self._session_id),
            "generation": self._gen,
            "block_size": self.region.block_size,
            "read_only": self.read_only,
            "encrypted": self._cipher is not None,
            "activation": self.state.value,
            "reconcile_in_progress": repairing and self.state is Activation.ACTIVATING,
            "live_repair_in_progress": repairing and self.state is Activation.ACTIVE,
            "downstairs": self.status(),
        }

    def status(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for target in self.targets:
            client = self._clients.get(target)
            if client is None:
                out.append(
                    {
                        "target": target,
                        "state": "new",
                        "connect_attempts": 0,
                        "failed_attempts": 0,
                        "last_error": None,
                    }
                )
            else:
                out.append(client.status())
        return out

    # -- activation ------------------------------------------------------------------------
    async def activate(self, *, handover: bool = False) -> None:
        """Activate at our generation: return once a quorum negotiated and reconciled;
        retries forever (cancellable). ``handover``: we take the disk over from a session
        that has stopped for good (a migration source), so a promote the downstairs keeps
        refusing fails the activation at once instead of being retried."""
        if self._activating:
            raise StorageError(
                "activate in progress: another activation of this region is pending; wait for it or cancel it"
            )
        if self.state is Activation.ACTIVE:
            return
        if self.state in (Activation.FAILED, Activation.CLOSED):
            raise StorageFatalError(f"region upstairs is {self.state.value}: {self.failure}")
        self._activating = True
        self.state = Activation.ACTIVATING
        self._set_refusal_limit(HANDOVER_PROMOTE_REFUSALS if handover else None)
        try:
            for target in self.targets:
                if target not in self._clients:
                    self._new_client(target)
            while True:
                await self._wait_quorum()
                try:
                    await self._collate_and_reconcile()
                    break
                except StorageFatalError:
                    raise
                except (StorageError, TimeoutError) as exc:
                    # a downstairs dropped or failed mid-reconcile: it reconnects on its own
                    # (and reports fresh extent versions), so wait for quorum again
                    self.log.warning("reconciliation interrupted, retrying: %s", exc)
                    for c in self.clients():
                        if c.state is ClientState.WAIT_QUORUM:
                            c.fault(f"reconciliation interrupted: {exc}")
                    await asyncio.sleep(self.retry.reconnect_delay_s)
            self.state = Activation.ACTIVE
            for c in self.clients():
                c.set_state(ClientState.ACTIVE)
            self._io_open.set()
            if not self.read_only:
                self._autoflush = asyncio.get_running_loop().create_task(
                    self._flush_when_idle(), name=f"autoflush {self.region.opts.id}"
                )
            self.log.info("region %s active at generation %s", self.region.opts.id, self._gen)
        except StorageFatalError as exc:
            self._fail(exc)
            await self._stop_clients()
            raise
        except BaseException:
            await self._stop_clients()
            if self.state is Activation.ACTIVATING:
                self.state = Activation.INACTIVE
            raise
        finally:
            self._activating = False
            self._set_refusal_limit(None)

    def _set_refusal_limit(self, limit: int | None) -> None:
        self._refusals_fatal_after = limit
        for c in self._clients.values():
            c.refusals_fatal_after = limit

    def _quorum_reached(self) -> bool:
        clients = self.clients()
        ready = [c for c in clients if c.state is ClientState.WAIT_QUORUM]
        if self.read_only:
            return len(ready) >= 1
        return len(clients) == len(self.targets) and len(ready) == len(self.targets)

    async def _wait_quorum(self) -> None:
        while True:
            self._changed.clear()
            if self.state is Activation.CLOSED:
                raise StorageError("the backend was closed while activation was pending")
            for c in self.clients():
                if c.fatal_error is not None:
                    raise c.fatal_error
            if self._quorum_reached():
                return
            await self._changed.wait()

    async def _collate_and_reconcile(self) -> None:
        members = [c for c in self.clients() if c.state is ClientState.WAIT_QUORUM]
        versions = {c.target: c.extent_versions for c in members}
        max_gen = max((max(v[0], default=0) for v in versions.values() if v), default=0)
        if not self.flaws.no_generation_fence and self._gen <= max_gen:
            raise StorageFatalError(
                f"generation {self._gen} is not greater than the stored extent generation "
                f"{max_gen}; activate with a generation of at least {max_gen + 1}"
            )
        max_flush = max((max(v[1], default=0) for v in versions.values() if v), default=0)
        self._flush_number = max_flush
        if self.read_only or len(members) < 2:
            return
        repair_id = 0
        for eid in range(self.region.extent_count):
            stamps = {}
            for c in members:
                v = c.extent_versions
                assert v is not None
                stamps[c.target] = (v[0][eid], v[1][eid], v[2][eid])
            if len(set(stamps.values())) == 1 and not any(s[2] for s in stamps.values()):
                continue
            source = max(members, key=lambda c: stamps[c.target])
            dests = [c for c in members if c is not source]
            addr = source.repair_addr
            assert addr is not None  # every negotiated client has one
            self.log.info(
                "reconciling extent %s from %s %s to %s",
                eid,
                source.target,
                stamps[source.target],
                [c.target for c in dests],
            )
            steps: list[tuple[m.Message, Sequence[DownstairsClient]]] = [
                (m.ExtentFlush(repair_id, eid, source.client_id, max_flush, max_gen), [source]),
                (m.ExtentClose(repair_id + 1, eid), members),
                (
                    m.ExtentRepair(
                        repair_id + 2, eid, source.client_id, addr, tuple(d.client_id for d in dests)
                    ),
                    dests,
                ),
                (m.ExtentReopen(repair_id + 3, eid), members),
            ]
            repair_id += 4
            for msg, to in steps:
                await asyncio.gather(*(c.reconcile(msg, _RECONCILE_TIMEOUT_S) for c in to))  # type: ignore[arg-type]

    async def _flush_when_idle(self) -> None:
        """Flush written data the guest has not flushed within the flush timeout."""
        while self.state is Activation.ACTIVE:
            await asyncio.sleep(self._flush_timeout_s)  # a periodic timer, not a wait
            if self._writes_since_flush and self.state is Activation.ACTIVE:
                try:
                    await self.flush()
                except StorageError as exc:
                    self.log.warning("automatic flush failed: %s", exc)

    async def _stop_clients(self) -> None:
        autoflush, self._autoflush = self._autoflush, None
        if autoflush is not None and autoflush is not asyncio.current_task():
            autoflush.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await autoflush
        repairs, self._repairs = self._repairs, {}
        for task in repairs.values():
            task.cancel()
        for task in repairs.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        clients, self._clients = self._clients, {}
        for c in clients.values():
            await c.stop()
        dying, self._dying = self._dying, []
        for task in dying:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- jobs ------------------------------------------------------------------------------
    def _job_id(self) -> int:
        job_id = self._next_job
        self._next_job += 1
        return job_id

    def _extent_blocks(self, eid: int) -> tuple[int, int]:
        per = self.region.blocks_per_extent
        return eid * per, (eid + 1) * per - 1

    # -- live repair -----------------------------------------------------------------------
    def _start_repair(self, client: DownstairsClient) -> None:
        stale = self._repairs.pop(client.target, None)
        if stale is not None:
            stale.cancel()
        client.repair_upto = 0
        client.set_state(ClientState.REPAIRING)
        task = asyncio.get_running_loop().create_task(self._repair(client), name=f"repair {client.target}")
        self._repairs[client.target] = task
        target = client.target

        def forget(_task: asyncio.Task[None]) -> None:
            if self._repairs.get(target) is _task:
                del self._repairs[target]

        task.add_done_callback(forget)

    async def _repair_source(self, client: DownstairsClient) -> DownstairsClient:
        while True:
            self._changed.clear()
            if self.state is not Activation.ACTIVE or client.state is not ClientState.REPAIRING:
                raise StorageError(f"repair of {client.target} abandoned ({self.state.value})")
            sources = [c for c in self.clients() if c.state is ClientState.ACTIVE and c is not client]
            if sources:
                return sources[0]
            await self._changed.wait()  # every source is offline: wait for one to return

    async def _repair(self, client: DownstairsClient) -> None:
        self.log.info("live repair of %s: %s extents", client.target, self.region.extent_count)
        try:
            for eid in range(self.region.extent_count):
                while True:
                    source = await self._repair_source(client)
                    try:
                        await self._repair_extent(eid, source, client)
                    except StorageError as exc:
                        if client.state is not ClientState.REPAIRING:
                            raise  # the repaired downstairs itself failed: it is faulted
                        self.log.warning("repair of extent %s from %s failed: %s", eid, source.target, exc)
                        continue  # the source failed: take another one
                    break
            client.repairs_done += 1
            client.set_state(ClientState.ACTIVE)
            self.log.info("live repair of %s complete", client.target)
        except StorageError as exc:
            if client.state is ClientState.REPAIRING:
                client.fault(f"live repair failed: {exc}")

    async def _repair_extent(self, eid: int, source: DownstairsClient, client: DownstairsClient) -> None:
        """Submit the four jobs of one extent's repair and wait until the repaired copy did them."""
        self._check_usable()
        addr = source.repair_addr
        assert addr is not None
        close_id, repair_id, noop_id, reopen_id = (self._job_id() for _ in range(4))
        first, last = self._extent_blocks(eid)
        deps = self._deps.write(reopen_id, first, last)
        # jobs of this extent from now on go to the repaired copy too, after the reopen
        client.repair_upto = max(client.repair_upto, eid + 1)
        self._flush_number += 1
        others = [c for c in self.clients() if c is not client and c.state is ClientState.ACTIVE]
        steps: list[tuple[int, tuple[int, ...], Op, Op]] = [
            (close_id, deps, LiveCloseOp(eid), LiveCloseOp(eid, self._flush_number, self._gen)),
            (repair_id, (close_id,), LiveRepairOp(eid, source.client_id, addr), LiveNoOp()),
            (noop_id, (repair_id,), LiveNoOp(), LiveNoOp()),
            (reopen_id, (noop_id,), LiveReopenOp(eid), LiveReopenOp(eid)),
        ]
        # The ids are reserved now, so guest I/O submitted meanwhile can wait for the reopen;
        # the steps themselves go out one at a time: the copy may only be fetched once the
        # source has closed its extent, which no dependency can express across downstairs.
        for c in (client, *others):
            c.reserve((close_id, repair_id, noop_id, reopen_id))
        sent = 0
        try:
            for job_id, job_deps, mine, theirs in steps:
                waits = [client.submit(job_id, job_deps, mine)]
                for c in others:
                    future = c.submit(job_id, job_deps, theirs)
                    if c is source:
                        waits.append(future)
                sent += 1
                await asyncio.gather(*waits)
        finally:
            # Abandoned half way: every copy still gets the remaining steps as the others get
            # them (NoOps, then the reopen), or an extent would stay closed and the I/O waiting
            # for these ids would hang; the repaired copy keeps its old extent until the retry.
            for job_id, job_deps, _mine, theirs in steps[sent:]:
                for c in (client, *others):
                    c.submit(job_id, job_deps, theirs)
        # let the I/O that queued behind this extent go first
        await asyncio.sleep(0)

    # -- replacement -----------------------------------------------------------------------
    async def replace_downstairs(self, old: str, new: str, *, guard_in_flux: bool = True) -> str:
        if new in self.targets and old not in self.targets:
            client = self._clients.get(new)
            done = client is not None and client.state is ClientState.ACTIVE
            return "CompletedAlready" if done else "StartedAlready"
        if new in self.targets and old in self.targets:
            raise ReplaceRuleError(
                "both-targets-present", f"{old} and {new} are both targets of this region already"
            )
        if old not in self.targets:
            return "Missing"
        if self.state is Activation.ACTIVE and guard_in_flux:
            in_flux = [
                f"{c.target} ({c.state.value})"
                for c in self.clients()
                if c.target != old and c.state is not ClientState.ACTIVE
            ]
            if in_flux:
                raise ReplaceRuleError(
                    "another-downstairs-in-flux",
                    f"cannot replace {old}: {', '.join(in_flux)} is not yet consistent; "
                    "retry once it is active",
                )
        if self.state in (Activation.FAILED, Activation.CLOSED):
            raise StorageFatalError(f"region upstairs is {self.state.value}; cannot replace")
        self.log.info("replacing downstairs %s with %s (activation %s)", old, new, self.state.value)
        index = self.targets.index(old)
        self.targets[index] = new
        repair = self._repairs.pop(old, None)
        if repair is not None:
            repair.cancel()
        client = self._clients.pop(old, None)
        if client is not None:
            await client.stop()
        if self.state in (Activation.ACTIVATING, Activation.ACTIVE):
            self._new_client(new)  # pending activation: joins it; active: live-repaired
        self._changed.set()
        return "Started"

    # -- I/O -------------------------------------------------------------------------------
    async def _gate(self) -> None:
        await self._io_open.wait()
        self._check_usable()

    def _check_usable(self) -> None:
        if self.state is not Activation.ACTIVE:
            raise StorageError(f"region is {self.state.value}: {self.failure}")

    async def wait_io_ready(self) -> None:
        """Block until I/O may be submitted (used before the first request)."""
        await self._gate()

    async def read(self, block: int, count: int) -> tuple[bytes, str]:
        """Return data and a per-block written map ("0"/"1") from one downstairs."""
        last_error: Exception | None = None
        for attempt in range(5):
            await self._gate()
            members = await self._readable()
            # Small reads issued in the same loop iteration go to the same downstairs (one
            # batch on its connection); large reads and retries rotate per request.
            if count * self.region.block_size >= _LARGE_READ or attempt:
                self._read_cursor += 1
            elif not self._read_batch_open:
                self._read_batch_open = True
                self._read_cursor += 1
                asyncio.get_running_loop().call_soon(self._end_read_batch)
            client = members[self._read_cursor % len(members)]
            job_id = self._job_id()
            first, last = block, block + max(count, 1) - 1
            deps = self._deps.read(job_id, first, last)
            try:
                reply = await client.submit(job_id, deps, ReadOp(block, count))
            except StorageError as exc:
                # a failed read does not make the copy differ: try another downstairs
                last_error = exc
                self._check_usable()
                continue
            finally:
                self._deps.done(job_id, first, last)
            assert isinstance(reply, m.ReadResponse)
            blocks = reply.header.blocks
            assert not isinstance(blocks, CrucibleError)
            if type(blocks) is PlainReadContexts:
                written = "1" * len(blocks)  # every block has a hash: all were written
            else:
                written = "".join("0" if isinstance(b, ReadBlockEmpty) else "1" for b in blocks)
            return bytes(reply.data), written
        raise StorageError(f"read of blocks {block}+{count} failed on every attempt: {last_error}")

    async def _readable(self) -> list[DownstairsClient]:
        while True:
            self._changed.clear()
            self._check_usable()
            members = [c for c in self.clients() if c.state is ClientState.ACTIVE]
            if members:
                return members
            await self._changed.wait()  # all offline or repairing: wait for one to serve

    def _end_read_batch(self) -> None:
        self._read_batch_open = False

    def _members(self) -> list[DownstairsClient]:
        """Full members: active, or offline with a backlog that will be replayed."""
        return [
            c
            for c in self.clients()
            if c.state is ClientState.ACTIVE or (c.state is ClientState.OFFLINE and c.replayable)
        ]

    async def _to_all(
        self,
        job_id: int,
        deps: tuple[int, ...],
        op: Op,
        extents: tuple[int, int] | None,
        *,
        every_active: bool = False,
    ) -> None:
        """Submit one job to every member (and to a repaired copy where it applies); wait for
        the quorum. Called without an await between allocating ``job_id`` and here."""
        members = self._members()
        if not members:
            raise StorageError(f"{type(op).__name__}: no downstairs can take it")
        futures = [c.submit(job_id, deps, op) for c in members]
        for c in self.clients():
            if c.state is not ClientState.REPAIRING or c.repair_upto == 0:
                continue
            if extents is None:  # a flush or barrier: only the extents it has so far
                c.submit(
                    job_id,
                    deps,
                    FlushOp(op.flush_number, op.gen, c.repair_upto - 1) if isinstance(op, FlushOp) else op,
                )
            elif extents[0] < c.repair_upto:
                c.submit(job_id, deps, op)
        needed = min(_WRITE_QUORUM, len(members))
        if every_active:
            needed = max(needed, sum(c.state is ClientState.ACTIVE for c in members))
        quorum = _Quorum(members, futures, needed)
        await quorum.done
        self._check_usable()
        if quorum.ok == 0:
            raise StorageError(f"{type(op).__name__} failed on every downstairs: {'; '.join(quorum.errors)}")

    async def write(self, block: int, data: bytes, *, only_unwritten: bool = False) -> None:
        if self.read_only:
            raise StorageError("region is read-only")
        await self._gate()
        bs = self.region.block_size
        count = len(data) // bs
        per = self.region.blocks_per_extent
        last_block = block + max(count, 1) - 1
        if self._cipher is not None:  # sealed once: every copy stores the same ciphertext
            sealed, contexts = self._cipher.seal(data, bs)
            op = WriteOp(block, sealed, contexts, only_unwritten)
        else:
            op = WriteOp(block, data, unencrypted_contexts(data, bs), only_unwritten)
        self._writes_since_flush = True
        job_id = self._job_id()
        deps = self._deps.write(job_id, block, last_block)
        await self._to_all(job_id, deps, op, (block // per, last_block // per))
        if len(self._deps) > _MAX_JOBS_SINCE_FLUSH:
            await self.flush()

    async def flush(self, *, every_active: bool = False) -> None:
        """Flush; with ``every_active``, wait for every active downstairs, not just two
        (before closing: the slowest copy must not be cut off with work queued)."""
        if self.read_only:
            return
        await self._gate()
        self._flush_number += 1
        self._writes_since_flush = False
        job_id = self._job_id()
        await self._to_all(
            job_id,
            self._deps.flush(job_id),
            FlushOp(self._flush_number, self._gen),
            None,
            every_active=every_active,
        )

    async def barrier(self) -> None:
        """Order everything before against everything after, without making it durable."""
        if self.read_only:
            return
        await self._gate()
        job_id = self._job_id()
        await self._to_all(job_id, self._deps.flush(job_id), BarrierOp(), None)

    async def close(self) -> None:
        if self.state is Activation.ACTIVE:
            with contextlib.suppress(StorageError, TimeoutError):
                await asyncio.wait_for(self.flush(every_active=True), 10)
        await self._stop_clients()
        self.state = Activation.CLOSED
        self._io_open.set()  # held I/O fails instead of waiting forever
        self._changed.set()  # a pending activate() wakes up and sees CLOSED
