"""One upstairs' connection to one downstairs: connect loop, negotiation, job multiplexing.

The client connects FOREVER (an unreachable target is retried on a fixed delay, as Crucible
does) until it reaches ``WAIT_QUORUM``; the owning :class:`~sut.storage.upstairs.Upstairs`
decides what happens next. Jobs are matched to replies by ``job_id`` so many can be in
flight; frames are written synchronously, so the order in which the upstairs submits jobs
is the order every downstairs executes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sut.storage.errors import ProtocolError, StorageError, StorageFatalError
from sut.storage.protocol import PROTOCOL_VERSION, STREAM_LIMIT, BatchedWriter, Message, read_message
from sut.storage.vcr import parse_target

__all__ = ["ClientState", "DownstairsClient", "RetryPolicy", "SessionInfo"]


@dataclass(frozen=True)
class RetryPolicy:
    """How the upstairs retries a downstairs: Crucible uses 10 s + 10 s, no limit."""

    connect_timeout_s: float = 2.0
    reconnect_delay_s: float = 1.0


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
    WAIT_QUORUM = "wait_quorum"
    REPAIRING = "repairing"
    ACTIVE = "active"
    OFFLINE = "offline"
    DISABLED = "disabled"  # fatal: will not reconnect (refused, taken over, removed)


class _Disconnected(StorageError):
    pass


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
        self._on_change = on_change
        self._log = logger
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._out: BatchedWriter | None = None  # all frames to self._writer go through it
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._job_ids = itertools.count(1)
        self._lost = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"downstairs-client {self.target}"
            )

    async def stop(self) -> None:
        """Cancel the task and close the socket; idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        writer = self._close_socket("client stopped")
        if writer is not None:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if self.state is not ClientState.DISABLED:
            self.state = ClientState.DISABLED

    def fault(self, reason: str) -> None:
        """Drop the connection (e.g. after a failed write); the loop reconnects and repairs."""
        self._log.warning("downstairs %s faulted: %s", self.target, reason)
        self.last_error = reason
        self._close_socket(reason)

    def set_state(self, state: ClientState) -> None:
        self.state = state
        self._on_change(self)

    def status(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "state": self.state.value,
            "connect_attempts": self.connect_attempts,
            "failed_attempts": self.failed_attempts,
            "last_error": self.last_error,
        }

    # -- connect loop ----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            self.set_state(ClientState.CONNECTING)
            self.connect_attempts += 1
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port, limit=STREAM_LIMIT),
                    self.retry.connect_timeout_s,
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
                # Crucible's policy: a fixed delay, no backoff, no limit.
                await asyncio.sleep(self.retry.reconnect_delay_s)
                continue
            self._writer = writer
            self._out = BatchedWriter(writer)
            self._lost.clear()
            try:
                self.set_state(ClientState.NEGOTIATING)
                await self._negotiate(reader)
                self.set_state(ClientState.WAIT_QUORUM)
                await self._read_replies(reader)
                if not self.taken_over:
                    self.last_error = "connection closed by the downstairs"
            except StorageFatalError as exc:
                self.fatal_error = exc
                self.last_error = str(exc)
                self._close_socket(str(exc))
                self.set_state(ClientState.DISABLED)
                return
            except (OSError, ProtocolError, _Disconnected, TimeoutError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
            self._close_socket(self.last_error or "disconnected")
            if self.taken_over:
                self.set_state(ClientState.DISABLED)
                return
            self.failed_attempts += 1
            self.set_state(ClientState.OFFLINE)
            await asyncio.sleep(self.retry.reconnect_delay_s)

    async def _negotiate(self, reader: asyncio.StreamReader) -> None:
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
        self.extent_versions = (list(versions["gen"]), list(versions["flush"]), list(versions["dirty"]))

    async def _exchange(self, reader: asyncio.StreamReader, msg: Message, timeout: float) -> Message:
        assert self._out is not None
        self._out.write_message(msg)
        await self._out.drain()
        reply = await asyncio.wait_for(read_message(reader), timeout)
        if reply is None:
            raise _Disconnected(f"downstairs closed the connection after {msg.kind}")
        if reply.kind == "YouAreNoLongerActive":
            self.taken_over = True
            raise StorageFatalError(f"downstairs {self.target}: taken over by generation {reply['new_gen']}")
        return reply

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                msg = await read_message(reader)
                if msg is None:
                    return
                if msg.kind == "YouAreNoLongerActive":
                    self.taken_over = True
                    self.last_error = (
                        f"taken over by upstairs {msg['new_upstairs_id']} at generation {msg['new_gen']}"
                    )
                    self.fatal_error = StorageFatalError(self.last_error)
                    return
                future = self._pending.pop(int(msg.get("job_id", -1)), None)
                if future is not None and not future.done():
                    future.set_result(msg)
        finally:
            self._fail_pending("connection lost")

    # -- jobs ------------------------------------------------------------------------------
    def submit(self, msg_kind: str, fields: dict[str, Any], payload: bytes = b"") -> asyncio.Future[Message]:
        """Send a job NOW (synchronously, preserving order) and return its reply future."""
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        if self._writer is None or self._out is None or self._writer.is_closing():
            future.set_exception(_Disconnected(f"downstairs {self.target} is not connected"))
            return future
        job_id = next(self._job_ids)
        self._pending[job_id] = future
        # queued in order; sent together with other jobs submitted in this loop iteration
        self._out.write_message(Message(msg_kind, {"job_id": job_id, **fields}, payload))
        return future

    async def call(self, msg_kind: str, fields: dict[str, Any], payload: bytes = b"") -> Message:
        reply = await self.submit(msg_kind, fields, payload)
        if reply.get("error"):
            raise StorageError(f"downstairs {self.target} {msg_kind} failed: {reply['error']}")
        return reply

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(_Disconnected(f"downstairs {self.target}: {reason}"))

    def _close_socket(self, reason: str) -> asyncio.StreamWriter | None:
        writer, self._writer = self._writer, None
        self._out = None  # frames still queued for this socket are dropped with it
        if writer is not None:
            writer.close()
        self._fail_pending(reason)
        return writer
