"""One upstairs' connection to one downstairs, in Crucible's protocol (message version 13).

The client connects FOREVER (an unreachable target is retried on a fixed delay, as Crucible
does), negotiates (HereIAm -> YesItsMe -> PromoteToActive -> YouAreNowActive ->
RegionInfoPlease -> RegionInfo, then ExtentVersionsPlease -> ExtentVersions, or LastFlush
when it comes back with a backlog to replay) and reaches ``WAIT_QUORUM``; the owning
:class:`~sut.storage.upstairs.Upstairs` decides what happens next (join an activation,
replay, or live-repair).

Jobs carry the UPSTAIRS' job id (the same id goes to every downstairs) and dependencies; a
downstairs runs a job once its dependencies are done, so dependencies - not the order of
frames - order the work. A downstairs forgets what completed before its last Flush or Barrier
and cannot know a job it was never sent (a job skipped while it was being repaired, a read sent
to another downstairs, anything from before it (re)connected): such dependencies would never
be satisfied. So every job is sent with its dependencies cut down to the ids THIS connection
carried since the downstairs' last flush (or the ``LastFlush`` it was told), as Crucible prunes
a client's skipped jobs.

Writes a downstairs acknowledged are KEPT until a later flush is acknowledged by it: until
then they carry no durability promise there. Losing an ACTIVE downstairs (it died, restarted
or stopped answering for ``io_timeout_s``) makes the client OFFLINE: its writes, flushes and
barriers since its last flush are kept, new ones queue behind them, and on reconnection it
sends ``LastFlush{its last acknowledged flush}`` and replays the backlog, in job order, before
anything new. A backlog over the policy's limits or an outage longer than
``offline_timeout_s`` FAULTS the client instead (live repair when it returns).

Every reply is checked before it is used: ids, a read's block count and data length, and each
block's hash (xxHash64 of the data; an Empty block must read as zeros). A hash that does not
match FAULTS this downstairs and fails the read, which the upstairs then serves from another;
any other reply that breaks the protocol faults it too. Frames are capped at 64 KiB until the
downstairs promoted us (then ``ExtentVersions``' size, then 100 MiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sut.storage.bincode import SocketAddr
from sut.storage.crypt import BlockCipher
from sut.storage.errors import ProtocolError, StorageError, StorageFatalError
from sut.storage.stream import BatchedWriter, RecordStream, RecordWriter, open_stream
from sut.storage.vcr import parse_target
from sut.storage.wire import messages as m
from sut.storage.wire.blockhash import block_hash, verify_unencrypted
from sut.storage.wire.crucible_error import CrucibleError
from sut.storage.wire.fields import (
    BlockContext,
    PlainReadContexts,
    ReadBlockEmpty,
    ReadBlockUnencrypted,
    WriteHeader,
)
from sut.storage.wire.framing import NEGOTIATION_FRAME_CAP, FrameSplitter, extent_versions_frame_len
from sut.storage.wire.messages import MAX_FRAME, MESSAGE_VERSION, Message, decode_record, encode_parts

__all__ = [
    "NO_FLAWS",
    "BarrierOp",
    "ClientState",
    "DownstairsClient",
    "Flaws",
    "FlushOp",
    "LiveCloseOp",
    "LiveNoOp",
    "LiveReopenOp",
    "LiveRepairOp",
    "Op",
    "ReadOp",
    "RetryPolicy",
    "SessionInfo",
    "WriteOp",
]


@dataclass(frozen=True)
class RetryPolicy:
    """How the upstairs treats an unreachable or silent downstairs.

    Crucible connects with a 10 s timeout and retries every 10 s, without limit; the defaults
    here are shorter because test disks are small and tests want answers quickly.
    """

    connect_timeout_s: float = 2.0
    reconnect_delay_s: float = 1.0
    # A connected downstairs that sends nothing (not even Imok to a Ruok) for this long while
    # we wait for it is treated as gone: a paused container keeps its TCP connection open
    # forever, so silence is the only sign.
    io_timeout_s: float = 10.0
    keepalive_s: float = 1.0
    # Limits of an OFFLINE downstairs' backlog; beyond them it is faulted (live repair).
    max_backlog_jobs: int = 20_000
    max_backlog_bytes: int = 256 * 1024 * 1024
    offline_timeout_s: float = 60.0


@dataclass(frozen=True)
class Flaws:
    """Historical storage bugs re-created on request (the server's ``--regression``), so the
    suite can prove it catches them. All off by default; each is one isolated branch."""

    no_generation_fence: bool = False  # activate although a copy holds a newer generation
    no_read_hash_check: bool = False  # hand out a read's data without checking its hashes
    no_replay: bool = False  # a copy back from an outage resumes without what it missed


NO_FLAWS = Flaws()


@dataclass(frozen=True)
class SessionInfo:
    upstairs_id: uuid.UUID
    session_id: uuid.UUID
    gen: int
    read_only: bool
    encrypted: bool
    block_size: int
    extent_size: int
    extent_count: int


class ClientState(enum.Enum):
    NEW = "new"
    CONNECTING = "connecting"
    NEGOTIATING = "negotiating"
    WAIT_QUORUM = "wait_quorum"  # negotiated; the upstairs decides what happens next
    REPAIRING = "repairing"
    ACTIVE = "active"
    OFFLINE = "offline"  # was active, lost; backlog kept for replay
    FAULTED = "faulted"  # must be live-repaired before it serves again
    DISABLED = "disabled"  # fatal: will not reconnect (refused, taken over, removed)


# -- operations: what a job asks of one downstairs (the message is built per connection) ------
@dataclass(frozen=True)
class WriteOp:
    start: int
    data: bytes
    contexts: Sequence[BlockContext]
    unwritten: bool = False


@dataclass(frozen=True)
class ReadOp:
    start: int
    count: int


@dataclass(frozen=True)
class FlushOp:
    flush_number: int
    gen: int
    extent_limit: int | None = None


@dataclass(frozen=True)
class BarrierOp:
    pass


@dataclass(frozen=True)
class LiveCloseOp:
    """ExtentLiveFlushClose (flush_number given) or ExtentLiveClose (the repaired copy)."""

    extent_id: int
    flush_number: int | None = None
    gen: int = 0


@dataclass(frozen=True)
class LiveRepairOp:
    extent_id: int
    source_client_id: int
    source_repair_address: SocketAddr


@dataclass(frozen=True)
class LiveNoOp:
    pass


@dataclass(frozen=True)
class LiveReopenOp:
    extent_id: int


Op = WriteOp | ReadOp | FlushOp | BarrierOp | LiveCloseOp | LiveRepairOp | LiveNoOp | LiveReopenOp

# Jobs replayed after a reconnection. Reads and live-repair steps are failed when the
# connection drops (their owner retries them if they still matter).
_REPLAYABLE = (WriteOp, FlushOp, BarrierOp)
_RESETS_DONE = (FlushOp, BarrierOp)  # a downstairs forgets older completions once these finish


class _Disconnected(StorageError):
    pass


def _short(value: object, limit: int = 200) -> str:
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(eq=False)
class _Job:
    job_id: int
    deps: tuple[int, ...]
    op: Op
    future: asyncio.Future[Message]

    @property
    def size(self) -> int:
        return len(self.op.data) if isinstance(self.op, WriteOp) else 0


def _consume_result(future: asyncio.Future[Message]) -> None:
    # Nobody may await a job that enough other downstairs acknowledged already; retrieving
    # its exception here keeps asyncio from logging it as "never retrieved".
    if not future.cancelled():
        future.exception()


@dataclass
class _Reconcile:
    """The one reconciliation request in flight (repair ids are answered one at a time)."""

    repair_id: int
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class DownstairsClient:
    """Owns one task and at most one socket; :meth:`stop` releases both."""

    def __init__(
        self,
        target: str,
        client_id: int,
        session: SessionInfo,
        retry: RetryPolicy,
        on_change: Callable[[DownstairsClient], None],
        logger: logging.Logger,
        cipher: BlockCipher | None = None,
        flaws: Flaws = NO_FLAWS,
    ) -> None:
        self.target = target
        self.flaws = flaws
        self.cipher = cipher  # the region's key: reads are opened (and so checked) with it
        self.client_id = client_id
        self.host, self.port = parse_target(target)
        self.session = session
        self.retry = retry
        self.state = ClientState.NEW
        self.connect_attempts = 0
        self.failed_attempts = 0
        self.last_error: str | None = None
        # Why it was last faulted: kept when later reconnect attempts overwrite last_error.
        self.last_fault: str | None = None
        self.fatal_error: StorageFatalError | None = None
        self.taken_over = False
        # Set by the upstairs for a hand-over activation: this many refused promotes in a row
        # are fatal (see _promote); None: refusals are retried forever, as Crucible does.
        self.refusals_fatal_after: int | None = None
        self.promote_refusals = 0  # in a row; a promote that succeeds resets it
        self.repair_addr: SocketAddr | None = None
        self.region_uuid: uuid.UUID | None = None  # the region it served when first negotiated
        self.extent_versions: tuple[list[int], list[int], list[bool]] | None = None
        # Counters for status and tests.
        self.offline_count = 0
        self.fault_count = 0
        self.replayed_jobs = 0
        self.repairs_done = 0
        self.hash_mismatches = 0
        self.error_reports = 0
        self.repair_upto = 0  # extents below this are repaired (meaningful while REPAIRING)
        self._offline_since: float | None = None
        self._on_change = on_change
        self._log = logger
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._writer: RecordWriter | None = None
        self._out: BatchedWriter | None = None
        self._jobs: dict[int, _Job] = {}  # sent (or held), awaiting a reply; job-id order
        self._unflushed: dict[int, _Job] = {}  # acknowledged, not yet covered by its flush
        self._backlog_bytes = 0
        self._holding = False  # OFFLINE: queue replayable jobs, send them on replay()
        self._known: set[int] = set()  # job ids this connection may name as dependencies
        self._last_flush: int | None = None  # the last flush (or barrier) this downstairs finished
        self._reconcile: _Reconcile | None = None
        self._last_rx = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"downstairs-client {self.target}"
            )

    async def stop(self) -> None:
        """Cancel the task and close the socket; idempotent."""
        task = self.disable("client stopped")
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def disable(self, reason: str) -> asyncio.Task[None] | None:
        """Synchronously: stop reconnecting, close the socket, fail every job."""
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._close_socket(reason)
        self._holding = False
        self._fail_jobs(reason, keep_replayable=False)
        self.state = ClientState.DISABLED
        return task

    def fault(self, reason: str) -> None:
        """This copy can no longer be trusted: drop the connection and the backlog."""
        if self.state is ClientState.DISABLED:
            return
        self._log.warning("downstairs %s faulted: %s", self.target, reason)
        self.last_error = self.last_fault = reason
        self.fault_count += 1
        self._close_socket(reason)
        self._fail_jobs(reason, keep_replayable=False)
        self._holding = False
        self._offline_since = None
        if self.state in (ClientState.ACTIVE, ClientState.OFFLINE, ClientState.REPAIRING):
            self.set_state(ClientState.FAULTED)

    def set_state(self, state: ClientState) -> None:
        self.state = state
        self._on_change(self)

    @property
    def replayable(self) -> bool:
        """Offline with a backlog that will be replayed on reconnection (no repair needed)."""
        return self._holding

    @property
    def backlog(self) -> int:
        return len(self._jobs) + len(self._unflushed)

    def status(self) -> dict[str, object]:
        return {
            "target": self.target,
            "state": self.state.value,
            "connect_attempts": self.connect_attempts,
            "failed_attempts": self.failed_attempts,
            "last_error": self.last_error,
            "last_fault": self.last_fault,
            "backlog": len(self._jobs),
            "unflushed": len(self._unflushed),
            "offline_count": self.offline_count,
            "fault_count": self.fault_count,
            "replayed_jobs": self.replayed_jobs,
            "repairs_done": self.repairs_done,
            "hash_mismatches": self.hash_mismatches,
            "error_reports": self.error_reports,
            "repair_progress": (
                [self.repair_upto, self.session.extent_count] if self.state is ClientState.REPAIRING else None
            ),
        }

    # -- connect loop ----------------------------------------------------------------------
    def _keep_state_while_reconnecting(self) -> bool:
        return self.state in (ClientState.OFFLINE, ClientState.FAULTED)

    def _stopped(self) -> bool:
        return self._task is not asyncio.current_task()

    async def _run(self) -> None:
        while not self._stopped():
            if not self._keep_state_while_reconnecting():
                self.set_state(ClientState.CONNECTING)
            self.connect_attempts += 1
            try:
                async with asyncio.timeout(self.retry.connect_timeout_s):
                    reader, writer = await open_stream(
                        self.host,
                        self.port,
                        FrameSplitter(NEGOTIATION_FRAME_CAP),
                        max_record=NEGOTIATION_FRAME_CAP,
                    )
            except (OSError, TimeoutError) as exc:
                self.failed_attempts += 1
                self.last_error = f"connect: {exc!r}"
                self._log.info(
                    "downstairs %s unreachable (%s attempts): %s",
                    self.target,
                    self.failed_attempts,
                    self.last_error,
                )
                self._check_offline_limits()
                await asyncio.sleep(self.retry.reconnect_delay_s)  # Crucible: fixed delay, no limit
                continue
            if self._stopped():
                writer.transport.abort()
                return
            self._writer = writer
            self._out = BatchedWriter(writer)
            self._last_rx = time.monotonic()
            try:
                if not self._keep_state_while_reconnecting():
                    self.set_state(ClientState.NEGOTIATING)
                await self._negotiate(reader)
                self._watchdog = asyncio.get_running_loop().create_task(
                    self._watch(writer), name=f"downstairs-watchdog {self.target}"
                )
                # the upstairs reacts to WAIT_QUORUM synchronously (activation member,
                # replay() or live repair) before any reply is read
                self.set_state(ClientState.WAIT_QUORUM)
                await self._read_replies(reader)
                if not self.taken_over and self._writer is writer:
                    self.last_error = "connection closed by the downstairs"
            except StorageFatalError as exc:
                self.fatal_error = exc
                self.last_error = str(exc)
                self._close_socket(str(exc))
                self._fail_jobs(str(exc), keep_replayable=False)
                self.set_state(ClientState.DISABLED)
                return
            except (OSError, ProtocolError, _Disconnected, TimeoutError, asyncio.IncompleteReadError) as exc:
                if self._writer is writer or self.last_error is None:
                    self.last_error = _short(f"{type(exc).__name__}: {exc}", 400)
                if isinstance(exc, ProtocolError):
                    self._untrusted(writer, self.last_error)
            except Exception as exc:  # noqa: BLE001 - hostile input we did not foresee, or a bug
                self._log.error("downstairs %s: unexpected %r; dropping the connection", self.target, exc)
                self.last_error = _short(f"unexpected {type(exc).__name__}: {exc}", 400)
                self._untrusted(writer, self.last_error)
            if self._stopped():
                return
            if self.taken_over:
                reason = self.last_error or "taken over"
                self.fatal_error = self.fatal_error or StorageFatalError(reason)
                self._close_socket(reason)
                self._fail_jobs(reason, keep_replayable=False)
                self._holding = False
                self.set_state(ClientState.DISABLED)
                return
            self._connection_lost(self.last_error or "disconnected")
            self.failed_attempts += 1
            await asyncio.sleep(self.retry.reconnect_delay_s)

    def _untrusted(self, writer: RecordWriter, reason: str) -> None:
        """The downstairs broke the protocol: a serving copy is faulted; during negotiation
        the attempt just fails."""
        if self._writer is writer and self.state in (ClientState.ACTIVE, ClientState.REPAIRING):
            self.fault(f"protocol violation: {reason}")

    def _connection_lost(self, reason: str) -> None:
        was = self.state
        self._close_socket(reason)
        if was is ClientState.ACTIVE or (was is ClientState.OFFLINE and self._holding):
            if not self._holding:
                self._holding = True
                self.offline_count += 1
                self._offline_since = time.monotonic()
                self._log.warning("downstairs %s offline: %s", self.target, reason)
            self._fail_jobs(reason, keep_replayable=True)
            self.set_state(ClientState.OFFLINE)
            self._check_offline_limits()
        elif was in (ClientState.REPAIRING, ClientState.FAULTED):
            self._fail_jobs(reason, keep_replayable=False)
            self.set_state(ClientState.FAULTED)
        else:
            self._fail_jobs(reason, keep_replayable=False)
            self.set_state(ClientState.OFFLINE)

    def _check_offline_limits(self) -> None:
        if not self._holding:
            return
        r = self.retry
        why = None
        if self.backlog > r.max_backlog_jobs:
            why = f"backlog of {self.backlog} jobs exceeds {r.max_backlog_jobs}"
        elif self._backlog_bytes > r.max_backlog_bytes:
            why = f"backlog of {self._backlog_bytes} bytes exceeds {r.max_backlog_bytes}"
        elif self._offline_since is not None and time.monotonic() - self._offline_since > r.offline_timeout_s:
            why = f"offline for more than {r.offline_timeout_s} s"
        if why is not None:
            self.fault(why)

    # -- negotiation -----------------------------------------------------------------------
    async def _negotiate(self, reader: RecordStream) -> None:
        s = self.session
        timeout = self.retry.connect_timeout_s
        hello = m.HereIAm(MESSAGE_VERSION, s.upstairs_id, s.session_id, s.gen, s.read_only, s.encrypted, ())
        reply = await self._exchange(reader, hello, timeout)
        if isinstance(reply, m.VersionMismatch):
            raise StorageFatalError(
                f"downstairs {self.target} speaks message version {reply.version}, we speak {MESSAGE_VERSION}"
            )
        if isinstance(reply, m.ReadOnlyMismatch):
            raise StorageFatalError(
                f"downstairs {self.target} read-only mode is {reply.expected}, the VCR asks for "
                f"{s.read_only}: run it with --mode {'ro' if s.read_only else 'rw'}"
            )
        if isinstance(reply, m.EncryptedMismatch):
            raise StorageFatalError(
                f"downstairs {self.target} region encrypted={reply.expected}, the VCR "
                f"{'has' if s.encrypted else 'has no'} key"
            )
        if not isinstance(reply, m.YesItsMe):
            raise ProtocolError(f"expected YesItsMe, got {type(reply).__name__}")
        if reply.version != MESSAGE_VERSION:
            # it accepted our version and then named another: nothing it says can be trusted
            raise StorageFatalError(
                f"downstairs {self.target} answered YesItsMe with message version {reply.version}, "
                f"we speak {MESSAGE_VERSION}"
            )
        self.repair_addr = reply.repair_addr
        reply = await self._promote(reader, timeout)
        if isinstance(reply, m.UuidMismatch):
            raise ProtocolError(f"downstairs {self.target} answered our promote with UuidMismatch")
        if not isinstance(reply, m.YouAreNowActive):
            raise ProtocolError(f"expected YouAreNowActive, got {type(reply).__name__}")
        promoted = (reply.upstairs_id, reply.session_id, reply.generation)
        if promoted != (s.upstairs_id, s.session_id, s.gen):
            # as Crucible's upstairs: a downstairs that promoted someone else did not promote us
            raise ProtocolError(
                f"YouAreNowActive for upstairs {reply.upstairs_id} session {reply.session_id} generation "
                f"{reply.generation}, not ours ({s.upstairs_id} {s.session_id} {s.gen})"
            )
        reader.negotiated(max(NEGOTIATION_FRAME_CAP, extent_versions_frame_len(s.extent_count)))
        reader.set_splitter(
            FrameSplitter(max(NEGOTIATION_FRAME_CAP, extent_versions_frame_len(s.extent_count)))
        )
        info = await self._exchange(reader, m.RegionInfoPlease(), timeout)
        if not isinstance(info, m.RegionInfo):
            raise ProtocolError(f"expected RegionInfo, got {type(info).__name__}")
        d = info.region_def
        got = (d.block_size, d.extent_size.value, d.extent_count, d.encrypted)
        want = (s.block_size, s.extent_size, s.extent_count, s.encrypted)
        if got != want:
            raise StorageFatalError(
                f"downstairs {self.target} region (block_size, extent_size, extent_count, encrypted)="
                f"{got} does not match the VCR's {want}"
            )
        if self.region_uuid is not None and d.uuid != self.region_uuid and self._holding:
            # Not the copy it left: what it missed cannot be replayed onto it (that would leave a
            # region holding only those writes, taken for a good copy). Crucible panics here; we
            # drop the backlog and let the upstairs repair it like any new downstairs.
            reason = f"came back with region {d.uuid}, not {self.region_uuid}: repaired instead of replayed"
            self._log.warning("downstairs %s %s", self.target, reason)
            self.last_error = self.last_fault = reason
            self.fault_count += 1
            self._holding = False
            self._fail_jobs(reason, keep_replayable=False)
        self.region_uuid = d.uuid
        self._known = set()
        if self._holding:
            # back after an outage: it keeps what it flushed; replay() sends the rest
            self._write(m.LastFlush(self._last_flush))
            if self._last_flush is not None:
                self._known.add(self._last_flush)
        else:
            versions = await self._exchange(reader, m.ExtentVersionsPlease(), timeout)
            if not isinstance(versions, m.ExtentVersions):
                raise ProtocolError(f"expected ExtentVersions, got {type(versions).__name__}")
            self.extent_versions = _extent_versions(versions, s.extent_count)
            self._last_flush = None
        reader.negotiated(MAX_FRAME)
        reader.set_splitter(FrameSplitter(MAX_FRAME))

    def _write(self, msg: Message) -> None:
        if self._out is None:
            raise _Disconnected(f"connection to {self.target} closed")
        head, data = encode_parts(msg)
        self._out.write(head)
        if data:
            self._out.write(data)

    async def _promote(self, reader: RecordStream, timeout: float) -> Message:
        """PromoteToActive and its reply. A downstairs refuses a promote at a generation not
        above its active upstairs' (another session's) by closing the connection: the loop
        retries, as Crucible does, unless ``refusals_fatal_after`` refusals came in a row.

        Why that limit exists: a migration target activates after the source's guest paused
        for good, at a generation above the source's, and so takes the disk over. A refusal
        there means the disk is held at our generation or above, which stays so: the source
        keeps its session until it is fenced. Retrying would only wait out the hand-over's
        deadline. More than one refusal is asked for, so a connection that merely dropped at
        that moment is retried still."""
        s = self.session
        try:
            promote = m.PromoteToActive(s.upstairs_id, s.session_id, s.gen)
            reply = await self._exchange(reader, promote, timeout)
        except (_Disconnected, ConnectionResetError, asyncio.IncompleteReadError) as exc:
            self.promote_refusals += 1
            refusal = (f"downstairs {self.target} refused our promote at generation {s.gen} "
                       f"({self.promote_refusals} in a row; it closed the connection after "
                       "PromoteToActive): a session at this generation or a higher one is active there")
            limit = self.refusals_fatal_after
            if limit is not None and self.promote_refusals >= limit:
                raise StorageFatalError(refusal) from exc
            raise _Disconnected(refusal) from exc
        self.promote_refusals = 0
        return reply

    async def _exchange(self, reader: RecordStream, msg: Message, timeout: float) -> Message:
        self._write(msg)
        if self._out is not None:
            await self._out.drain()
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel() that lands
        # as the read completes, and a stopped client would carry on negotiating
        async with asyncio.timeout(timeout):
            while True:
                record = await reader.read_record()
                if record is None:
                    raise _Disconnected(f"downstairs closed the connection after {type(msg).__name__}")
                reply = decode_record(*record)
                self._last_rx = time.monotonic()
                if not isinstance(reply, m.Imok):
                    break
        if isinstance(reply, m.YouAreNoLongerActive):
            self.taken_over = True
            raise StorageFatalError(f"downstairs {self.target}: taken over by generation {reply.new_gen}")
        return reply

    # -- replies ---------------------------------------------------------------------------
    async def _read_replies(self, reader: RecordStream) -> None:
        s = self.session
        while True:
            record = await reader.read_record()
            if record is None:
                return
            msg = decode_record(*record)
            self._last_rx = time.monotonic()
            if isinstance(msg, m.Imok):
                continue
            if isinstance(msg, m.YouAreNoLongerActive):
                self.taken_over = True
                self.last_error = f"taken over by upstairs {msg.new_upstairs_id} at generation {msg.new_gen}"
                self.fatal_error = StorageFatalError(self.last_error)
                return
            if isinstance(msg, m.RepairAckId | m.ExtentError):
                self._reconcile_reply(msg)
                continue
            if isinstance(msg, m.UuidMismatch):
                raise ProtocolError(f"downstairs says our ids are wrong (expected {msg.expected_id})")
            if isinstance(msg, m.ErrorReport):
                # the downstairs retries the job itself; its ack follows once it succeeds
                self.error_reports += 1
                self._log.info("downstairs %s: job %s reported %s", self.target, msg.job_id, msg.error)
                continue
            header = msg.header if isinstance(msg, m.ReadResponse) else msg
            if not isinstance(
                msg,
                m.WriteAck
                | m.WriteUnwrittenAck
                | m.FlushAck
                | m.BarrierAck
                | m.ReadResponse
                | m.ExtentLiveCloseAck
                | m.ExtentLiveRepairAckId
                | m.ExtentLiveAckId,
            ):
                raise ProtocolError(f"unexpected {type(msg).__name__} from an active downstairs")
            ids = (header.upstairs_id, header.session_id)  # type: ignore[union-attr]
            if ids != (s.upstairs_id, s.session_id):
                raise ProtocolError(f"{type(msg).__name__} for another session {ids}")
            job_id: int = header.job_id  # type: ignore[union-attr]
            job = self._jobs.pop(job_id, None)
            if job is None:
                continue  # a job failed or dropped meanwhile
            error = msg.header.blocks if isinstance(msg, m.ReadResponse) else msg.result
            if isinstance(error, CrucibleError):
                self._job_failed(job, msg, error)
                if isinstance(job.op, WriteOp | FlushOp | LiveCloseOp | LiveRepairOp | LiveReopenOp):
                    # this copy may now differ from the others: the replies behind it are moot
                    self.fault(f"{type(job.op).__name__} job {job_id} failed: {_short(error)}")
                    return
                continue
            wrong = self._misfit(job, msg)
            if wrong is not None:
                if not job.future.done():
                    job.future.set_exception(StorageError(f"downstairs {self.target}: {wrong}"))
                raise ProtocolError(wrong)
            msg, bad = self._verify_read(msg)
            if bad:
                self.hash_mismatches += 1
                text = (
                    f"read job {job_id}: blocks {bad[:8]} of {job.op.start}+{len(bad)} do not match their "  # type: ignore[union-attr]
                    "hashes"
                )
                if not job.future.done():
                    job.future.set_exception(StorageError(f"downstairs {self.target}: {text}"))
                self.fault(text)
                return
            self._retire(job)
            if not job.future.done():
                job.future.set_result(msg)

    def _job_failed(self, job: _Job, msg: Message, error: CrucibleError) -> None:
        if not job.future.done():
            job.future.set_exception(
                StorageError(f"downstairs {self.target} {type(job.op).__name__} failed: {_short(error)}")
            )

    def _misfit(self, job: _Job, msg: Message) -> str | None:
        """Why a successful reply does not fit its job (None if it does)."""
        expected = {
            WriteOp: m.WriteUnwrittenAck if isinstance(job.op, WriteOp) and job.op.unwritten else m.WriteAck,
            ReadOp: m.ReadResponse,
            FlushOp: m.FlushAck,
            BarrierOp: m.BarrierAck,
            LiveCloseOp: m.ExtentLiveCloseAck,
            LiveRepairOp: m.ExtentLiveRepairAckId,
            LiveNoOp: m.ExtentLiveAckId,
            LiveReopenOp: m.ExtentLiveAckId,
        }[type(job.op)]
        if not isinstance(msg, expected):
            return f"job {job.job_id} ({type(job.op).__name__}) answered with {type(msg).__name__}"
        if isinstance(msg, m.ReadResponse):
            assert isinstance(job.op, ReadOp)
            blocks = msg.header.blocks
            assert not isinstance(blocks, CrucibleError)
            if len(blocks) != job.op.count or len(msg.data) != job.op.count * self.session.block_size:
                return (
                    f"ReadResponse to a read of {job.op.count} blocks has {len(blocks)} block contexts and "
                    f"{len(msg.data)} bytes"
                )
        return None

    def _verify_read(self, msg: Message) -> tuple[Message, list[int]]:
        """A read's blocks checked against their contexts: (the reply, with plaintext if the
        region is encrypted; indices of the blocks that do not match)."""
        if not isinstance(msg, m.ReadResponse):
            return msg, []
        blocks = msg.header.blocks
        assert not isinstance(blocks, CrucibleError)
        bs = self.session.block_size
        if self.cipher is not None:
            plain, bad = self.cipher.open(blocks, msg.data, bs)
            return dataclasses.replace(msg, data=plain), [] if self.flaws.no_read_hash_check else bad
        if self.flaws.no_read_hash_check:
            return msg, []  # REGRESSION no-read-hash-check: whatever the copy says is the data
        if type(blocks) is PlainReadContexts:
            return msg, verify_unencrypted(blocks, msg.data, bs)
        view = memoryview(msg.data)
        zero = bytes(bs)
        bad = []
        for i, ctx in enumerate(blocks):
            block = view[i * bs : (i + 1) * bs]
            if isinstance(ctx, ReadBlockUnencrypted):
                ok = block_hash(block) == ctx.hash
            else:
                # an Encrypted context from an unencrypted region is as wrong as a bad hash
                ok = isinstance(ctx, ReadBlockEmpty) and block == zero
            if not ok:
                bad.append(i)
        return msg, bad

    def _retire(self, job: _Job) -> None:
        """Bookkeeping of a success: keep writes until a flush covers them."""
        if isinstance(job.op, _RESETS_DONE):
            if isinstance(job.op, FlushOp) and job.op.extent_limit is not None:
                # a live-repair flush covers only some extents: keep everything
                self._unflushed[job.job_id] = job
                return
            covered = [i for i in self._unflushed if i < job.job_id]
            for i in covered:
                self._backlog_bytes -= self._unflushed.pop(i).size
            # the downstairs forgot what completed before this job: so do we
            self._known = {i for i in self._known if i >= job.job_id}
            if isinstance(job.op, FlushOp):
                self._last_flush = job.job_id
            else:
                # a barrier does not make writes durable: keep them and the barrier for replay
                self._unflushed[job.job_id] = job
        elif isinstance(job.op, WriteOp):
            self._unflushed[job.job_id] = job

    async def _watch(self, writer: RecordWriter) -> None:
        """Keepalive + hang detection for one connection (a periodic timer, not a wait)."""
        try:
            while self._writer is writer:
                await asyncio.sleep(self.retry.keepalive_s)
                if self._writer is not writer or self._out is None:
                    return
                silent = time.monotonic() - self._last_rx
                if silent > self.retry.io_timeout_s:
                    reason = f"no reply for {silent:.1f} s (io_timeout_s={self.retry.io_timeout_s}): hung?"
                    self._log.warning("downstairs %s: %s", self.target, reason)
                    self.last_error = reason
                    self._close_socket(reason)
                    return
                self._write(m.Ruok())
        except (asyncio.CancelledError, _Disconnected):
            pass

    # -- jobs ------------------------------------------------------------------------------
    def submit(self, job_id: int, deps: tuple[int, ...], op: Op) -> asyncio.Future[Message]:
        """Send a job NOW (synchronously, preserving order) and return its reply future.

        While OFFLINE, replayable jobs are queued for the replay instead; others fail.
        """
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume_result)
        connected = not (self._writer is None or self._out is None or self._writer.is_closing())
        # An ACTIVE client whose socket just closed is about to go OFFLINE: its writes must be
        # kept for the replay, not failed, or this copy would silently miss them.
        lost = not connected and self.state is ClientState.ACTIVE
        job = _Job(job_id, deps, op, future)
        if (self._holding or lost) and isinstance(op, _REPLAYABLE):
            self._jobs[job_id] = job
            self._backlog_bytes += job.size
            self._check_offline_limits()
            return future
        if self._holding or not connected:
            future.set_exception(_Disconnected(f"downstairs {self.target} is not connected"))
            return future
        self._jobs[job_id] = job
        if isinstance(op, _REPLAYABLE):
            self._backlog_bytes += job.size
        self._send(job)
        return future

    def reserve(self, job_ids: tuple[int, ...]) -> None:
        """Jobs that will be sent on this connection later, which jobs sent before them may
        already name as dependencies (a live repair's steps go out one at a time)."""
        if self._out is not None:
            self._known.update(job_ids)

    def _send(self, job: _Job) -> None:
        deps = tuple(d for d in job.deps if d in self._known)
        self._known.add(job.job_id)
        self._write(self._message(job.job_id, deps, job.op))

    def _message(self, job_id: int, deps: tuple[int, ...], op: Op) -> Message:
        u, s = self.session.upstairs_id, self.session.session_id
        if isinstance(op, WriteOp):
            header = WriteHeader(u, s, job_id, deps, op.start, op.contexts)
            return m.WriteUnwritten(header, op.data) if op.unwritten else m.Write(header, op.data)
        if isinstance(op, ReadOp):
            return m.ReadRequest(u, s, job_id, deps, op.start, op.count)
        if isinstance(op, FlushOp):
            return m.Flush(u, s, job_id, deps, op.flush_number, op.gen, None, op.extent_limit)
        if isinstance(op, BarrierOp):
            return m.Barrier(u, s, job_id, deps)
        if isinstance(op, LiveCloseOp):
            if op.flush_number is None:
                return m.ExtentLiveClose(u, s, job_id, deps, op.extent_id)
            return m.ExtentLiveFlushClose(u, s, job_id, deps, op.extent_id, op.flush_number, op.gen)
        if isinstance(op, LiveRepairOp):
            return m.ExtentLiveRepair(
                u, s, job_id, deps, op.extent_id, op.source_client_id, op.source_repair_address
            )
        if isinstance(op, LiveReopenOp):
            return m.ExtentLiveReopen(u, s, job_id, deps, op.extent_id)
        return m.ExtentLiveNoOp(u, s, job_id, deps)

    def replay(self) -> int:
        """Send the kept backlog, in job order, ahead of anything new; back to serving."""
        if self._out is None:
            raise StorageError(f"downstairs {self.target}: replay without a connection")
        if self.flaws.no_replay:
            # REGRESSION no-replay: the backlog is dropped and the copy serves without it
            self._unflushed, self._jobs, self._backlog_bytes = {}, {}, 0
        kept = sorted({**self._unflushed, **self._jobs}.items())
        self._unflushed = {}
        self._jobs = dict(kept)
        for _, job in kept:
            self._send(job)
        self._holding = False
        self._offline_since = None
        self.replayed_jobs += len(kept)
        self._log.info(
            "downstairs %s back: replayed %s jobs after flush %s", self.target, len(kept), self._last_flush
        )
        return len(kept)

    async def reconcile(
        self, msg: m.ExtentFlush | m.ExtentClose | m.ExtentRepair | m.ExtentReopen, timeout_s: float
    ) -> None:
        """Send one reconciliation request and wait for its RepairAckId (ExtentError raises)."""
        pending = _Reconcile(msg.repair_id)
        self._reconcile = pending
        try:
            self._write(msg)
            async with asyncio.timeout(timeout_s):
                await pending.future
        finally:
            if self._reconcile is pending:
                self._reconcile = None

    def _reconcile_reply(self, msg: m.RepairAckId | m.ExtentError) -> None:
        pending = self._reconcile
        if pending is None or pending.repair_id != msg.repair_id or pending.future.done():
            raise ProtocolError(f"{type(msg).__name__} for repair {msg.repair_id}, which we did not ask for")
        if isinstance(msg, m.ExtentError):
            pending.future.set_exception(
                StorageError(
                    f"downstairs {self.target}: repair {msg.repair_id} of extent {msg.extent_id} "
                    f"failed: {_short(msg.error)}"
                )
            )
        else:
            pending.future.set_result(None)

    def _fail_jobs(self, reason: str, *, keep_replayable: bool) -> None:
        kept: dict[int, _Job] = dict(self._unflushed) if keep_replayable else {}
        self._unflushed = {}
        for job_id, job in self._jobs.items():
            if keep_replayable and isinstance(job.op, _REPLAYABLE) and not job.future.done():
                kept[job_id] = job
            elif not job.future.done():
                job.future.set_exception(_Disconnected(f"downstairs {self.target}: {reason}"))
        self._jobs = dict(sorted(kept.items()))
        self._backlog_bytes = sum(j.size for j in self._jobs.values())
        if not keep_replayable:
            self._last_flush = None
        pending = self._reconcile
        if pending is not None and not pending.future.done():
            pending.future.set_exception(_Disconnected(f"downstairs {self.target}: {reason}"))

    def _close_socket(self, reason: str) -> RecordWriter | None:
        writer, self._writer = self._writer, None
        self._out = None
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog is not asyncio.current_task():
            watchdog.cancel()
        if writer is not None:
            # abort, not close: close() waits for queued data a hung downstairs never takes
            writer.transport.abort()
        return writer


def _extent_versions(msg: m.ExtentVersions, extent_count: int) -> tuple[list[int], list[int], list[bool]]:
    gens, flushes, dirty = list(msg.gen_numbers), list(msg.flush_numbers), list(msg.dirty_bits)
    if not len(gens) == len(flushes) == len(dirty) == extent_count:
        raise ProtocolError(
            f"ExtentVersions describes {len(gens)}/{len(flushes)}/{len(dirty)} extents, "
            f"the region has {extent_count}"
        )
    return gens, flushes, dirty
