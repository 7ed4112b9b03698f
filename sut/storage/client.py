"""One upstairs' connection to one downstairs: connect loop, negotiation, jobs, replay.

The client connects FOREVER (an unreachable target is retried on a fixed delay, as Crucible
does) until it reaches ``WAIT_QUORUM``; the owning :class:`~sut.storage.upstairs.Upstairs`
decides what happens next (join an activation, replay a backlog, or live-repair).

Jobs are matched to replies by ``job_id`` so many can be in flight; frames are written
synchronously, so the order in which the upstairs submits jobs is the order every downstairs
executes them.

Writes a downstairs acknowledged are KEPT until a later flush is acknowledged by it: until
then they carry no durability promise there (a killed downstairs loses its in-memory
per-block "written" marks, a crashed machine its page cache), exactly as in Crucible.

Losing an ACTIVE downstairs (it died, it was restarted, or it stopped answering - a paused
container - for ``io_timeout_s``) makes the client OFFLINE: its writes since its last flush
(acknowledged or not) and its pending flushes are kept, new ones are queued behind them,
and on reconnection the whole backlog is replayed in order before anything new (writes and
flushes are idempotent when replayed in order). A backlog that outgrows the policy's
limits, or an outage longer than ``offline_timeout_s``, FAULTS the client instead: the
backlog is dropped and the downstairs must be live-repaired when it returns. Crucible draws
the same line between "offline" and "faulted".

A downstairs is input from outside too: its frames are capped (64 KiB until it promoted us,
then :func:`~sut.storage.protocol.active_frame_limit`), buffers grow with the bytes that
arrive (sut.storage.stream), and every reply is checked against its job before it is used.
A reply that breaks the protocol FAULTS that downstairs (the copy cannot be trusted; it is
live-repaired when it returns); a connection that merely ends mid-frame is a lost connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sut.storage.errors import ProtocolError, StorageError, StorageFatalError, TruncatedFrameError
from sut.storage.protocol import (
    PROTOCOL_VERSION,
    BatchedWriter,
    FrameReader,
    Message,
    active_frame_limit,
    open_connection,
    read_message,
)
from sut.storage.vcr import parse_target

__all__ = ["ClientState", "DownstairsClient", "RetryPolicy", "SessionInfo"]


@dataclass(frozen=True)
class RetryPolicy:
    """How the upstairs treats an unreachable or silent downstairs.

    Crucible connects with a 10 s timeout and retries every 10 s, without limit; the defaults
    here are shorter because test disks are small and tests want answers quickly.
    """

    connect_timeout_s: float = 2.0
    reconnect_delay_s: float = 1.0
    # A connected downstairs that sends nothing (not even the answer to a keepalive) for this
    # long while we wait for it is treated as gone: a paused container keeps its TCP
    # connection open forever, so silence is the only sign.
    io_timeout_s: float = 10.0
    keepalive_s: float = 1.0
    # Limits of an OFFLINE downstairs' backlog; beyond them it is faulted (live repair).
    max_backlog_jobs: int = 20_000
    max_backlog_bytes: int = 256 * 1024 * 1024
    offline_timeout_s: float = 60.0


@dataclass(frozen=True)
class SessionInfo:
    upstairs_id: str
    session_id: str
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


# Jobs that are replayed after a reconnection. Everything else (reads, keepalives, repair
# transfers) is failed when the connection drops and retried by its owner if it still matters.
_REPLAYABLE = frozenset({"Write", "WriteUnwritten", "Flush"})
# An error reply to one of these means the copy may now differ from the others: fault it.
_FAULT_ON_ERROR = frozenset({"Write", "WriteUnwritten", "Flush", "ExtentPut"})


class _Disconnected(StorageError):
    pass


def _short(value: object, limit: int = 200) -> str:
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass
class _Job:
    kind: str
    fields: dict[str, Any]
    payload: bytes
    future: asyncio.Future[Message]
    sent: bool = False


def _consume_result(future: asyncio.Future[Message]) -> None:
    # Nobody may await a job that was acknowledged by enough other downstairs already;
    # retrieving its exception here keeps asyncio from logging it as "never retrieved".
    if not future.cancelled():
        future.exception()


class DownstairsClient:
    """Owns one task and at most one socket; :meth:`stop` releases both."""

    def __init__(
        self,
        target: str,
        session: SessionInfo,
        retry: RetryPolicy,
        on_change: Callable[[DownstairsClient], None],
        logger: logging.Logger,
    ) -> None:
        self.target = target
        self.host, self.port = parse_target(target)
        self.session = session
        self.retry = retry
        self.state = ClientState.NEW
        self.connect_attempts = 0
        self.failed_attempts = 0
        self.last_error: str | None = None
        self.fatal_error: StorageFatalError | None = None
        self.taken_over = False
        self.extent_versions: tuple[list[int], list[int], list[bool]] | None = None
        # Counters for status and tests: how often this downstairs went offline / was
        # faulted, how many jobs were replayed, how many live repairs completed.
        self.offline_count = 0
        self.fault_count = 0
        self.replayed_jobs = 0
        self.repairs_done = 0
        self.repair_upto = 0  # extents below this are repaired (meaningful while REPAIRING)
        self._offline_since: float | None = None
        self._on_change = on_change
        self._log = logger
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._out: BatchedWriter | None = None  # all frames to self._writer go through it
        self._jobs: dict[int, _Job] = {}  # awaiting a reply; insertion order = submission order
        # writes acknowledged by this downstairs but not yet covered by its flush
        self._unflushed: dict[int, _Job] = {}
        self._backlog_bytes = 0  # payload bytes of replayable jobs in both dicts
        self._holding = False  # OFFLINE: queue jobs, send them on replay()
        self._job_ids = itertools.count(1)
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
        """Synchronously: stop reconnecting, close the socket, fail every job.

        Returns the (cancelled) task so an async caller can wait for it to end.
        """
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._close_socket(reason)
        self._holding = False
        self._fail_jobs(reason, keep_replayable=False)
        self.state = ClientState.DISABLED
        return task

    def fault(self, reason: str) -> None:
        """This copy can no longer be trusted: drop the connection and the backlog.

        The connect loop reconnects and the upstairs live-repairs the downstairs.
        """
        if self.state is ClientState.DISABLED:
            return
        self._log.warning("downstairs %s faulted: %s", self.target, reason)
        self.last_error = reason
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

    def status(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "state": self.state.value,
            "connect_attempts": self.connect_attempts,
            "failed_attempts": self.failed_attempts,
            "last_error": self.last_error,
            "backlog": len(self._jobs),
            "unflushed": len(self._unflushed),
            "offline_count": self.offline_count,
            "fault_count": self.fault_count,
            "replayed_jobs": self.replayed_jobs,
            "repairs_done": self.repairs_done,
            "repair_progress": (
                [self.repair_upto, self.session.extent_count] if self.state is ClientState.REPAIRING else None
            ),
        }

    # -- connect loop ----------------------------------------------------------------------
    def _keep_state_while_reconnecting(self) -> bool:
        # An OFFLINE or FAULTED downstairs stays so in status while it reconnects, so a
        # reader sees WHY it is not serving rather than a bare "connecting".
        return self.state in (ClientState.OFFLINE, ClientState.FAULTED)

    def _stopped(self) -> bool:
        return self._task is not asyncio.current_task()  # disable() let go of this task

    async def _run(self) -> None:
        while not self._stopped():
            if not self._keep_state_while_reconnecting():
                self.set_state(ClientState.CONNECTING)
            self.connect_attempts += 1
            try:
                async with asyncio.timeout(self.retry.connect_timeout_s):
                    reader, writer = await open_connection(self.host, self.port)
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
                # Crucible's policy: a fixed delay, no backoff, no limit.
                await asyncio.sleep(self.retry.reconnect_delay_s)
                continue
            if self._stopped():
                writer.transport.abort()  # stopped while connecting: own no socket
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
            except (OSError, ProtocolError, _Disconnected, TimeoutError) as exc:
                if self._writer is writer or self.last_error is None:
                    self.last_error = _short(f"{type(exc).__name__}: {exc}", 400)
                if isinstance(exc, ProtocolError) and not isinstance(exc, TruncatedFrameError):
                    self._untrusted(writer, self.last_error)
            except Exception as exc:  # noqa: BLE001 - hostile input we did not foresee, or a bug
                self._log.error("downstairs %s: unexpected %r; dropping the connection", self.target, exc)
                self.last_error = _short(f"unexpected {type(exc).__name__}: {exc}", 400)
                self._untrusted(writer, self.last_error)
            if self._stopped():
                return  # disable() already closed the socket and failed every job
            if self.taken_over:
                # another upstairs owns the region now: never reconnect, replay nothing
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

    def _untrusted(self, writer: asyncio.StreamWriter, reason: str) -> None:
        """The downstairs broke the protocol: a serving copy is faulted (its replies, and so
        what it stored, cannot be trusted); during negotiation the attempt just fails."""
        if self._writer is writer and self.state in (ClientState.ACTIVE, ClientState.REPAIRING):
            self.fault(f"protocol violation: {reason}")

    def _connection_lost(self, reason: str) -> None:
        was = self.state
        self._close_socket(reason)
        if was is ClientState.ACTIVE or (was is ClientState.OFFLINE and self._holding):
            # keep the writes it has not acknowledged; they are replayed on reconnection
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

    async def _negotiate(self, reader: FrameReader) -> None:
        s = self.session
        timeout = self.retry.connect_timeout_s
        reply = await self._exchange(
            reader,
            Message(
                "HereIAm",
                {
                    "version": PROTOCOL_VERSION,
                    "upstairs_id": s.upstairs_id,
                    "session_id": s.session_id,
                    "gen": s.gen,
                    "read_only": s.read_only,
                    "encrypted": s.encrypted,
                },
            ),
            timeout,
        )
        if reply.kind != "YesItsMe":
            raise StorageFatalError(
                f"downstairs {self.target} refused negotiation: {reply.kind} {reply.fields}"
            )
        reply = await self._exchange(
            reader,
            Message(
                "PromoteToActive", {"upstairs_id": s.upstairs_id, "session_id": s.session_id, "gen": s.gen}
            ),
            timeout,
        )
        if reply.kind == "PromoteRefused":
            raise StorageFatalError(
                f"downstairs {self.target} refused promotion at generation {s.gen}: {reply['reason']}"
            )
        if reply.kind != "YouAreNowActive":
            raise ProtocolError(f"expected YouAreNowActive, got {reply.kind}")
        # the downstairs accepted us: frames up to the largest legitimate one from now on
        reader.negotiated(active_frame_limit(s.block_size * s.extent_size))
        info = await self._exchange(reader, Message("RegionInfoPlease"), timeout)
        got = (info.get("block_size"), info.get("extent_size"), info.get("extent_count"))
        want = (s.block_size, s.extent_size, s.extent_count)
        if got != want:
            raise StorageFatalError(
                f"downstairs {self.target} region geometry (block_size, extent_size, "
                f"extent_count)={got} does not match the VCR's {want}"
            )
        versions = await self._exchange(reader, Message("ExtentVersionsPlease"), timeout)
        if versions.kind != "ExtentVersions":
            raise ProtocolError(f"expected ExtentVersions, got {versions.kind}")
        self.extent_versions = _extent_versions(versions, s.extent_count)

    async def _exchange(self, reader: FrameReader, msg: Message, timeout: float) -> Message:
        if self._out is None:  # stopped or faulted while the previous step was in flight
            raise _Disconnected(f"connection to {self.target} closed during negotiation")
        self._out.write_message(msg)
        await self._out.drain()
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel() that lands
        # as the read completes, and a stopped client would carry on negotiating
        async with asyncio.timeout(timeout):
            reply = await read_message(reader)
        if reply is None:
            raise _Disconnected(f"downstairs closed the connection after {msg.kind}")
        self._last_rx = time.monotonic()
        if reply.kind == "YouAreNoLongerActive":
            self.taken_over = True
            raise StorageFatalError(f"downstairs {self.target}: taken over by generation {reply['new_gen']}")
        return reply

    async def _read_replies(self, reader: FrameReader) -> None:
        while True:
            msg = await read_message(reader)
            if msg is None:
                return
            self._last_rx = time.monotonic()
            if msg.kind == "YouAreNoLongerActive":
                self.taken_over = True
                self.last_error = (
                    f"taken over by upstairs {msg['new_upstairs_id']} at generation {msg['new_gen']}"
                )
                self.fatal_error = StorageFatalError(self.last_error)
                return
            job_id = msg.get("job_id", -1)
            if type(job_id) is not int:
                raise ProtocolError(f"{msg.kind}: job_id must be an integer, got {_short(job_id, 60)}")
            job = self._jobs.pop(job_id, None)
            if job is None:
                continue  # keepalive answer, or a job failed/dropped meanwhile
            if not msg.get("error"):
                wrong = self._misfit(job, msg)
                if wrong is not None:
                    if not job.future.done():
                        job.future.set_exception(StorageError(f"downstairs {self.target}: {wrong}"))
                    raise ProtocolError(wrong)
                self._retire(job_id, job)
            if msg.get("error") and job.kind in _FAULT_ON_ERROR:
                # the replies behind this one must not be used: this copy now differs
                if not job.future.done():
                    job.future.set_result(msg)
                self.fault(f"{job.kind} failed: {_short(msg['error'])}")
                return
            if not job.future.done():
                job.future.set_result(msg)

    def _misfit(self, job: _Job, msg: Message) -> str | None:
        """Why a successful reply does not fit its job (None if it does)."""
        s = self.session
        if job.kind == "Read":
            count = int(job.fields["count"])
            written = msg.get("written")
            if (
                len(msg.payload) != count * s.block_size
                or type(written) is not str
                or written.count("0") + written.count("1") != count
            ):
                size = len(written) if isinstance(written, str) else _short(written, 40)
                return (
                    f"{msg.kind} to a read of {count} blocks has {len(msg.payload)} bytes and a "
                    f"written map of {size} blocks"
                )
        elif job.kind == "ExtentFetch":
            extent_bytes = s.block_size * s.extent_size
            written = msg.get("written")
            if (
                msg.kind != "ExtentData"
                or len(msg.payload) != extent_bytes
                or type(written) is not str
                or len(written) != 2 * ((s.extent_size + 7) // 8)
                or any(type(msg.get(k)) is not int for k in ("gen", "flush"))
                or type(msg.get("dirty")) is not bool
            ):
                return f"{msg.kind} does not describe one extent of {extent_bytes} bytes"
        return None

    def _retire(self, job_id: int, job: _Job) -> None:
        """Bookkeeping of a successful reply: keep writes until a flush covers them."""
        if job.kind == "Flush":
            if "extent_limit" in job.fields:
                return  # a live-repair flush covers only some extents: keep everything
            self._backlog_bytes -= len(job.payload)
            covered = [i for i in self._unflushed if i < job_id]
            for i in covered:
                self._backlog_bytes -= len(self._unflushed.pop(i).payload)
        elif job.kind in _REPLAYABLE:
            self._unflushed[job_id] = job  # bytes stay counted

    async def _watch(self, writer: asyncio.StreamWriter) -> None:
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
                    self._close_socket(reason)  # the read loop ends; offline/faulted follows
                    return
                self._out.write_message(Message("Ruok"))
        except asyncio.CancelledError:
            pass

    # -- jobs ------------------------------------------------------------------------------
    def submit(self, msg_kind: str, fields: dict[str, Any], payload: bytes = b"") -> asyncio.Future[Message]:
        """Send a job NOW (synchronously, preserving order) and return its reply future.

        While OFFLINE, writes and flushes are queued for replay instead.
        """
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume_result)
        connected = not (self._writer is None or self._out is None or self._writer.is_closing())
        # An ACTIVE client whose socket just closed (the watchdog, or a close we have not
        # processed yet) is about to go OFFLINE: its writes must be kept for the replay,
        # not failed, or this copy would silently miss them.
        lost = not connected and self.state is ClientState.ACTIVE
        if (self._holding or lost) and msg_kind in _REPLAYABLE:
            job = _Job(msg_kind, fields, payload, future)
            self._jobs[next(self._job_ids)] = job
            self._backlog_bytes += len(payload)
            self._check_offline_limits()
            return future
        if self._holding or not connected:
            future.set_exception(_Disconnected(f"downstairs {self.target} is not connected"))
            return future
        assert self._out is not None
        job_id = next(self._job_ids)
        self._jobs[job_id] = _Job(msg_kind, fields, payload, future, sent=True)
        if msg_kind in _REPLAYABLE:
            self._backlog_bytes += len(payload)
        # queued in order; sent together with other jobs submitted in this loop iteration
        self._out.write_message(Message(msg_kind, {"job_id": job_id, **fields}, payload))
        return future

    def replay(self) -> int:
        """Send the kept backlog, in order, ahead of anything new; back to serving."""
        if self._out is None:
            raise StorageError(f"downstairs {self.target}: replay without a connection")
        count = 0
        for job_id, job in self._jobs.items():
            self._out.write_message(Message(job.kind, {"job_id": job_id, **job.fields}, job.payload))
            job.sent = True
            count += 1
        self._holding = False
        self._offline_since = None
        self.replayed_jobs += count
        self._log.info("downstairs %s back: replayed %s jobs", self.target, count)
        return count

    async def call(self, msg_kind: str, fields: dict[str, Any], payload: bytes = b"") -> Message:
        reply = await self.submit(msg_kind, fields, payload)
        if reply.get("error"):
            raise StorageError(f"downstairs {self.target} {msg_kind} failed: {reply['error']}")
        return reply

    def _fail_jobs(self, reason: str, *, keep_replayable: bool) -> None:
        kept: dict[int, _Job] = dict(self._unflushed) if keep_replayable else {}
        self._unflushed = {}
        for job_id, job in self._jobs.items():
            if keep_replayable and job.kind in _REPLAYABLE and not job.future.done():
                kept[job_id] = job
            elif not job.future.done():
                job.future.set_exception(_Disconnected(f"downstairs {self.target}: {reason}"))
        # replay order = original submission order (job ids grow monotonically)
        self._jobs = dict(sorted(kept.items()))
        for job in self._jobs.values():
            job.sent = False
        self._backlog_bytes = sum(len(j.payload) for j in self._jobs.values())

    def _close_socket(self, reason: str) -> asyncio.StreamWriter | None:
        writer, self._writer = self._writer, None
        self._out = None  # frames still queued for this socket are dropped with it
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog is not asyncio.current_task():
            watchdog.cancel()
        if writer is not None:
            # abort, not close: close() keeps the socket open until queued data has been
            # sent, which never happens to a hung (paused) downstairs - the read loop would
            # not see the loss and the client would look active while it is cut off
            writer.transport.abort()
        return writer


def _extent_versions(msg: Message, extent_count: int) -> tuple[list[int], list[int], list[bool]]:
    """ExtentVersions as (gens, flushes, dirty), checked to describe ``extent_count`` extents."""
    gens, flushes, dirty = msg.get("gen"), msg.get("flush"), msg.get("dirty")
    if (
        not isinstance(gens, list)
        or not isinstance(flushes, list)
        or not isinstance(dirty, list)
        or not len(gens) == len(flushes) == len(dirty) == extent_count
        or any(type(v) is not int or v < 0 for v in gens + flushes)
        or any(type(v) is not bool for v in dirty)
    ):
        raise ProtocolError(
            f"ExtentVersions does not describe {extent_count} extents: "
            f"{_short({'gen': gens, 'flush': flushes, 'dirty': dirty}, 120)}"
        )
    return gens, flushes, dirty
