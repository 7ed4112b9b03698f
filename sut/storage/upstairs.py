"""The upstairs of one region: three downstairs clients, activation, replication, replacement.

Activation (read-write): every client must reach ``wait_quorum``; then collate (the requested
generation must exceed every stored extent generation, else :class:`StorageFatalError`),
reconcile extents that are dirty or differ by copying the highest ``(gen, flush, dirty)``
copy to the others, then go active.

I/O while active: writes and flushes go to every member and complete once TWO downstairs
(or every member, if fewer remain) acknowledged them; reads go to one active downstairs.
A member that drops is OFFLINE: its writes queue up and are replayed when it returns (see
:mod:`sut.storage.client`). A member that failed a write, outgrew its backlog, or joined fresh
(a replacement) is FAULTED and live-repaired extent by extent while guest I/O continues:
writes to extents already repaired go to it too, writes to the extent being copied wait for
that one copy, writes to extents not yet reached skip it (the copy brings them later). The
copy of an extent is ordered after every write submitted before it because each downstairs
executes its jobs in submission order.

A takeover (another upstairs at a higher generation) disables this upstairs at once: every
pending and later I/O fails with :class:`StorageError`, which the NBD export turns into EIO.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import uuid
from collections.abc import Sequence

from sut.storage.client import ClientState, DownstairsClient, RetryPolicy, SessionInfo
from sut.storage.errors import ReplaceRuleError, StorageError, StorageFatalError
from sut.storage.protocol import Message
from sut.storage.vcr import RegionVcr

__all__ = ["Activation", "Upstairs"]


_LARGE_READ = 64 * 1024  # bytes; reads at least this big are spread over the downstairs
_WRITE_QUORUM = 2  # acknowledgements a write or flush needs (Crucible: two of three)
# Crucible flushes on its own when the guest has not for this long (VCR opts.flush_timeout):
# a downstairs keeps every write until a flush covers it, so flushes bound that memory.
_DEFAULT_FLUSH_TIMEOUT_S = 0.5


class Activation(enum.Enum):
    INACTIVE = "inactive"
    ACTIVATING = "activating"
    ACTIVE = "active"
    FAILED = "failed"
    CLOSED = "closed"


class _Quorum:
    """Completes when ``needed`` jobs succeeded, or when every job has ended."""

    def __init__(self, kind: str, clients: Sequence[DownstairsClient],
                 futures: Sequence[asyncio.Future[Message]], needed: int) -> None:
        self.kind = kind
        self.needed = needed
        self.ok = 0
        self.left = len(futures)
        self.errors: list[str] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for client, future in zip(clients, futures, strict=True):
            future.add_done_callback(functools.partial(self._one, client))
        if not futures:
            self.done.set_result(None)

    def _one(self, client: DownstairsClient, future: asyncio.Future[Message]) -> None:
        self.left -= 1
        if future.cancelled():
            self.errors.append(f"{client.target}: cancelled")
        elif future.exception() is not None:
            self.errors.append(f"{client.target}: {future.exception()}")
        elif future.result().get("error"):
            self.errors.append(f"{client.target}: {future.result()['error']}")
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
        generation_fence: bool = True,
        logger: logging.Logger,
    ) -> None:
        self.region = region
        self.read_only = read_only or region.opts.read_only
        self.retry = retry
        self.generation_fence = generation_fence
        self.log = logger
        self.state = Activation.INACTIVE
        self.failure: StorageFatalError | None = None
        self.targets: list[str] = list(region.opts.target)
        self._gen = region.gen
        self._session_id = str(uuid.uuid4())
        self._clients: dict[str, DownstairsClient] = {}
        self._changed = asyncio.Event()
        self._io_open = asyncio.Event()  # set once I/O may be submitted (active, or failed)
        self._activating = False
        self._flush_number = 0
        self._repairs: dict[str, asyncio.Task[None]] = {}
        self._locked: dict[int, asyncio.Event] = {}  # extents being live-repaired right now
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
            r.opts.id,
            self._session_id,
            self._gen,
            self.read_only,
            r.opts.key is not None,
            r.block_size,
            r.blocks_per_extent,
            r.extent_count,
        )

    def _new_client(self, target: str) -> DownstairsClient:
        client = DownstairsClient(target, self._session(), self.retry, self._client_changed, self.log)
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
        # synchronously: every pending job fails now, nothing reconnects
        for task in self._repairs.values():
            task.cancel()
        if self._autoflush is not None:
            self._autoflush.cancel()
        for c in self._clients.values():
            client_task = c.disable(f"upstairs disabled: {exc}")
            if client_task is not None:
                self._dying.append(client_task)
        self._io_open.set()  # held I/O must wake up and see the failure
        for event in self._locked.values():
            event.set()

    def clients(self) -> list[DownstairsClient]:
        return [self._clients[t] for t in self.targets if t in self._clients]

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
    async def activate(self) -> None:
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
                except StorageError as exc:
                    # a downstairs dropped or failed mid-reconcile: it reconnects on its own,
                    # so wait for quorum again rather than failing an activation that the
                    # caller expects to retry forever
                    self.log.warning("reconciliation interrupted, retrying: %s", exc)
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
            # cancelled (or a bug): leave nothing behind, a later activate() starts afresh
            await self._stop_clients()
            if self.state is Activation.ACTIVATING:
                self.state = Activation.INACTIVE
            raise
        finally:
            self._activating = False

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
        if self.generation_fence and self._gen <= max_gen:
            raise StorageFatalError(
                f"generation {self._gen} is not greater than the stored extent generation "
                f"{max_gen}; activate with a generation of at least {max_gen + 1}"
            )
        self._flush_number = max((max(v[1], default=0) for v in versions.values() if v), default=0)
        if self.read_only or len(members) < 2:
            return
        for eid in range(self.region.extent_count):
            stamps = {}
            for c in members:
                v = c.extent_versions
                assert v is not None
                stamps[c.target] = (v[0][eid], v[1][eid], v[2][eid])
            if len(set(stamps.values())) == 1 and not any(s[2] for s in stamps.values()):
                continue
            source = max(members, key=lambda c: stamps[c.target])
            src_stamp = stamps[source.target]
            # a dirty source is rewritten too so every copy ends clean with the same stamp
            dests = [c for c in members if c is not source or src_stamp[2]]
            self.log.info(
                "reconciling extent %s from %s %s to %s",
                eid,
                source.target,
                src_stamp,
                [c.target for c in dests],
            )
            await self._copy_extent(eid, source, dests)

    async def _copy_extent(
        self, eid: int, source: DownstairsClient, dests: Sequence[DownstairsClient], *, live: bool = False
    ) -> None:
        data = await source.call("ExtentFetch", {"eid": eid})
        # reconciliation leaves every copy clean; a live repair copies the dirty mark too, so
        # the next flush stamps source and copy alike (the copy missed no write since)
        dirty = bool(data["dirty"]) if live else False
        fields = {"eid": eid, "gen": data["gen"], "flush": data["flush"], "written": data["written"],
                  "dirty": dirty}
        futures = [
            d.submit("ExtentPut", fields, data.payload)
            for d in dests
        ]
        for d, fut in zip(dests, futures, strict=True):
            reply = await fut
            if reply.get("error"):
                raise StorageError(f"extent {eid} put to {d.target} failed: {reply['error']}")

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

    # -- live repair -----------------------------------------------------------------------
    def _start_repair(self, client: DownstairsClient) -> None:
        stale = self._repairs.pop(client.target, None)
        if stale is not None:
            # the previous repair of this target is being abandoned (its downstairs faulted
            # and came back before that task noticed): it must not hold up the new one
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
                    # writes to this extent wait for this copy; others carry on
                    lock = self._locked[eid] = asyncio.Event()
                    try:
                        await self._copy_extent(eid, source, [client], live=True)
                    except StorageError as exc:
                        if client.state is not ClientState.REPAIRING:
                            raise  # the repaired downstairs itself failed: it is faulted
                        self.log.warning("repair of extent %s from %s failed: %s", eid, source.target, exc)
                        continue  # the source failed: take another one
                    finally:
                        if self._locked.get(eid) is lock:
                            del self._locked[eid]
                        lock.set()
                    client.repair_upto = eid + 1
                    # let the writes and flushes that waited for this copy go first; a flush
                    # waits for whichever extent is being copied and would otherwise starve
                    await asyncio.sleep(0)
                    break
            client.repairs_done += 1
            client.set_state(ClientState.ACTIVE)
            self.log.info("live repair of %s complete", client.target)
        except StorageError as exc:
            if client.state is ClientState.REPAIRING:  # else it faulted already, with its cause
                client.fault(f"live repair failed: {exc}")

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
            # pending activation: the new member joins it; active: it is live-repaired
            self._new_client(new)
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
        last: Exception | None = None
        for attempt in range(5):
            await self._gate()
            members = await self._readable()
            # Small reads issued in the same loop iteration go to the same downstairs so that
            # its connection sends them (and it answers them) in one batch; the next batch goes
            # to the next downstairs. Large reads (and retries) rotate per request so several
            # downstairs copy data in parallel. Any active downstairs has every acked write.
            if count * self.region.block_size >= _LARGE_READ or attempt:
                self._read_cursor += 1
            elif not self._read_batch_open:
                self._read_batch_open = True
                self._read_cursor += 1
                asyncio.get_running_loop().call_soon(self._end_read_batch)
            client = members[self._read_cursor % len(members)]
            try:
                reply = await client.call("Read", {"block": block, "count": count})
                return reply.payload, str(reply["written"])
            except StorageError as exc:
                # a failed read does not make the copy differ: try another downstairs
                last = exc
                self._check_usable()
        raise StorageError(f"read of blocks {block}+{count} failed on every attempt: {last}")

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

    async def _wait_unlocked(self, first: int, last: int) -> None:
        while self._locked:
            event = next((self._locked[e] for e in range(first, last + 1) if e in self._locked), None)
            if event is None:
                return
            await event.wait()

    def _members(self) -> list[DownstairsClient]:
        """Full members: active, or offline with a backlog that will be replayed."""
        return [
            c
            for c in self.clients()
            if c.state is ClientState.ACTIVE or (c.state is ClientState.OFFLINE and c.replayable)
        ]

    async def _to_all(self, kind: str, fields: dict[str, object], payload: bytes = b"",
                      extents: tuple[int, int] | None = None) -> None:
        await self._gate()
        # a write waits for the copy of its extents; a flush for any copy in progress
        await self._wait_unlocked(*(extents or (0, self.region.extent_count - 1)))
        self._check_usable()
        # from here to the submits: no await, so no repair step can slip in between
        members = self._members()
        if not members:
            raise StorageError(f"{kind}: no downstairs can take it")
        futures = [c.submit(kind, dict(fields), payload) for c in members]
        for c in self.clients():
            # A downstairs under live repair gets writes to the extents it already has and
            # flushes limited to those extents (it does not count towards the quorum).
            if c.state is not ClientState.REPAIRING:
                continue
            if extents is None:
                c.submit(kind, {**fields, "extent_limit": c.repair_upto})
            elif extents[1] < c.repair_upto:
                c.submit(kind, dict(fields), payload)
            elif extents[0] < c.repair_upto:
                # the write straddles the repair point: the repaired part must reach this
                # copy now (no later copy brings it); the rest comes with its extent's copy
                first_block = int(fields["block"])  # type: ignore[call-overload]
                cut = (c.repair_upto * self.region.blocks_per_extent - first_block) * self.region.block_size
                c.submit(kind, dict(fields), payload[:cut])
        quorum = _Quorum(kind, members, futures, min(_WRITE_QUORUM, len(members)))
        await quorum.done
        self._check_usable()
        if quorum.ok == 0:
            raise StorageError(f"{kind} failed on every downstairs: {'; '.join(quorum.errors)}")

    async def write(self, block: int, data: bytes, *, only_unwritten: bool = False) -> None:
        if self.read_only:
            raise StorageError("region is read-only")
        count = len(data) // self.region.block_size
        per = self.region.blocks_per_extent
        extents = (block // per, (block + max(count, 1) - 1) // per)
        self._writes_since_flush = True
        await self._to_all(
            "WriteUnwritten" if only_unwritten else "Write", {"block": block}, data, extents=extents
        )

    async def flush(self) -> None:
        if self.read_only:
            return
        self._flush_number += 1
        self._writes_since_flush = False
        await self._to_all("Flush", {"flush_number": self._flush_number, "gen": self._gen})

    async def close(self) -> None:
        if self.state is Activation.ACTIVE:
            with contextlib.suppress(StorageError, TimeoutError):
                await asyncio.wait_for(self.flush(), 10)
        await self._stop_clients()
        self.state = Activation.CLOSED
        self._io_open.set()  # held I/O fails instead of waiting forever
        self._changed.set()  # a pending activate() wakes up and sees CLOSED
