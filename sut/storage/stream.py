"""Byte streams of the data path: records received into their own buffers, parts sent by writev.

asyncio's StreamReader allocates a fresh object per recv() and copies every byte twice more
in user space (into its buffer, then out into the bytes it returns); its writer sends a frame
header and its payload in two send() calls and copies whatever the socket did not take at
once. For 1 MiB blocks those copies and the page faults of the short-lived buffers cost more
than the kernel's own work (perf, sequential write: memmove + clear_page ~25 % of all CPU).

:class:`RecordStream` is a BufferedProtocol: the kernel writes into a staging buffer, a
*splitter* finds record boundaries (a record is a head plus a payload whose length the head
tells), and once the head of a large record is known the rest of its payload is received
straight into the buffer that is handed to the consumer (recv_into, no copy); on TCP,
SO_RCVLOWAT makes that one wake-up per payload instead of one per 64 KiB segment. A consumer
that is done with a payload may recycle it (no zeroing of a new buffer). Before a splitter is
set the stream is in raw mode and :meth:`RecordStream.readexactly` serves handshakes.
:class:`BatchedWriter` sends everything queued in one loop iteration with one writev().

Rules for input from anyone who can connect (whatever protocol runs on top; they outlive it):

- Record cap: until the connection's owner calls :meth:`RecordStream.negotiated`, a record
  (head + payload) may be at most ``HANDSHAKE_MAX_RECORD`` (64 KiB); a head declaring more is
  a ProtocolError before a byte of its payload is stored. Negotiation raises the cap to what
  the protocol needs once the peer is known (for Crucible's wire: its largest frame,
  ``sut.storage.wire.MAX_FRAME``).
- Memory follows bytes that ARRIVED, not bytes a head declares: a large payload's buffer
  starts at 64 KiB and doubles as it fills (still received in place). A size the peer has
  already delivered on this connection (or a recycled buffer of that size) is allocated
  whole at once, so real traffic pays the growth once per connection and size.
- Server side (:class:`ConnectionGuard`, shared by a server's connections): at most
  ``max_connections`` at once (the excess is closed at once and reported), and a connection
  not negotiated within ``handshake_timeout_s`` is closed; its consumer sees a ProtocolError
  naming the deadline.
Stdlib only: the downstairs image imports this module.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

from sut.storage.errors import ProtocolError

__all__ = [
    "DIRECT_PAYLOAD",
    "HANDSHAKE_MAX_RECORD",
    "SOCKET_BUFFER",
    "BatchedWriter",
    "ConnectionGuard",
    "ConnectionLimits",
    "Data",
    "Record",
    "RecordStream",
    "RecordWriter",
    "Splitter",
    "create_server",
    "create_unix_server",
    "open_stream",
]

# A record payload at least this big is received into its own buffer (no staging copy).
DIRECT_PAYLOAD = 64 * 1024
# Staging buffer: must hold the largest head plus a payload below DIRECT_PAYLOAD (JSON
# headers go up to 256 KiB); one recv() into it reads at most _RECV_CHUNK bytes so that little
# of a following large payload is copied through it. Until negotiation records are small, so
# a connection starts with a small stage (memory per idle stranger) and grows it then.
_STAGE_BYTES = 512 * 1024
_RECV_CHUNK = 64 * 1024
_STAGE_HANDSHAKE = 3 * _RECV_CHUNK
# The record cap until the owner declares the connection negotiated: every handshake message
# of our protocols fits many times over.
HANDSHAKE_MAX_RECORD = 64 * 1024
# A payload buffer sized by what arrived starts this big and doubles as it fills.
_GROW_FROM = DIRECT_PAYLOAD
# Reading pauses while this much is parsed but not yet consumed (backpressure on the peer).
_QUEUE_HIGH = 16 * 1024 * 1024
_QUEUE_LOW = 4 * 1024 * 1024
# Payload buffers handed back with RecordStream.recycle() are reused for records of the same
# size: zeroing a new 1 MiB bytearray cost a downstairs as much CPU as receiving into it.
_SPARE_BUFFERS = 4
_SPARE_MAX_BYTES = 4 * 1024 * 1024
# SO_SNDBUF for data connections: a 1 MiB payload then fits in one writev(); with the default
# (~200 KiB on unix sockets, autotuned from 16 KiB on TCP) the rest is copied into the
# transport's buffer and sent piecewise.
SOCKET_BUFFER = 4 * 1024 * 1024
_IOV_MAX = 1024  # Linux UIO_MAXIOV

Record = tuple[bytes, "bytes | bytearray"]
"""(head, payload); a large payload is the bytearray the kernel filled (reused only if the
consumer hands it back with :meth:`RecordStream.recycle`)."""
Data = bytes | bytearray | memoryview

Splitter = Callable[[memoryview], "tuple[int, int] | None"]
"""Given the bytes available at the start of a record, return ``(head_len, payload_len)`` once
they are known, None if more bytes are needed; raise ProtocolError for an invalid record."""

ConnectedCallback = Callable[["RecordStream", "RecordWriter"], Coroutine[Any, Any, None]]
EventLog = Callable[..., None]
"""``on_event(event, **fields)``: how a :class:`ConnectionGuard` reports (e.g. a JSON log line)."""


@dataclass(frozen=True)
class ConnectionLimits:
    """What a server grants a connection from anyone, before it has proven anything."""

    # Concurrent connections; a real downstairs has one upstairs (a few while one reconnects).
    max_connections: int = 64
    # Connect-to-negotiated; an upstairs needs milliseconds (it gives up on a step after 2 s).
    handshake_timeout_s: float = 10.0
    handshake_max_record: int = HANDSHAKE_MAX_RECORD


class ConnectionGuard:
    """One server's connection bookkeeping: the connection cap and the handshake deadline.

    Pass one to :func:`create_server`; every connection it accepts is counted here until
    it is lost. ``on_event`` hears about connections refused over the cap.
    """

    def __init__(self, limits: ConnectionLimits | None = None, on_event: EventLog | None = None) -> None:
        self.limits = limits or ConnectionLimits()
        self._on_event = on_event
        self.connections = 0
        self.refused = 0

    def admit(self, peer: object) -> bool:
        if self.connections >= self.limits.max_connections:
            self.refused += 1
            if self._on_event is not None:
                self._on_event(
                    "connection_refused",
                    peer=peer,
                    reason=f"{self.connections} connections open, the limit of "
                    f"{self.limits.max_connections} is reached; closed at once",
                )
            return False
        self.connections += 1
        return True

    def release(self) -> None:
        self.connections -= 1


class RecordStream(asyncio.BufferedProtocol):
    """The receiving half of a connection (and the protocol behind its :class:`RecordWriter`).

    Written on asyncio's public protocol API only: the write-side flow control a
    StreamWriter would take from asyncio's private FlowControlMixin is our own
    (:meth:`pause_writing` / :meth:`resume_writing` / :meth:`writable`)."""

    def __init__(
        self,
        splitter: Splitter | None = None,
        on_connect: ConnectedCallback | None = None,
        *,
        max_record: int = HANDSHAKE_MAX_RECORD,
        guard: ConnectionGuard | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._event_loop = loop
        self._write_paused = False  # the transport's buffer is over its high-water mark
        self._drain_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._lost = False
        self._splitter = splitter
        self._on_connect = on_connect
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._guard = guard
        self._admitted = False
        self._deadline: asyncio.TimerHandle | None = None
        self._negotiated = False
        self._max_record = guard.limits.handshake_max_record if guard is not None else max_record
        self._stage = bytearray(_STAGE_BYTES if self._max_record > _STAGE_HANDSHAKE else _STAGE_HANDSHAKE)
        self._lo = 0  # stage[_lo:_hi] is received but not yet consumed
        self._hi = 0
        self._direct: bytearray | None = None  # payload being received in place
        self._direct_pos = 0
        self._direct_size = 0  # the payload's length; _direct grows towards it
        self._direct_head = b""
        self._delivered = 0  # the largest payload the peer delivered in place so far
        self._spare: list[bytearray] = []  # recycled payload buffers
        self._sock: Any = None  # set for TCP, where SO_RCVLOWAT saves wake-ups
        self._lowat = 1
        self._records: collections.deque[Record] = collections.deque()
        self._queued = 0  # bytes in self._records
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._error: BaseException | None = None
        self._closed: asyncio.Future[None] = loop.create_future()

    # -- protocol callbacks ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's do not subclass asyncio.Transport, hence no isinstance)
        self._transport = cast(asyncio.Transport, transport)
        guard = self._guard
        if guard is not None:
            if not guard.admit(transport.get_extra_info("peername")):
                self._eof = True
                transport.close()  # over the cap: no handler, no buffers, no deadline
                return
            self._admitted = True
            timeout = guard.limits.handshake_timeout_s
            if timeout > 0:
                self._deadline = self._event_loop.call_later(timeout, self._handshake_expired, timeout)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _set_send_buffer(sock)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                self._sock = sock
        if self._on_connect is not None:
            writer = RecordWriter(self._transport, self)
            self._task = self._event_loop.create_task(self._on_connect(self, writer))
            self._task.add_done_callback(self._connection_task_done)

    def _connection_task_done(self, task: asyncio.Task[None]) -> None:
        # The callback owns the connection; if it crashed, nobody else will close it.
        if not task.cancelled() and task.exception() is not None and self._transport is not None:
            self._event_loop.call_exception_handler(
                {"message": "connection handler failed", "exception": task.exception(), "protocol": self}
            )
            self._transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._direct is not None:
            return memoryview(self._direct)[self._direct_pos :]
        if len(self._stage) - self._hi < _RECV_CHUNK and self._lo:
            self._compact()
        if self._hi == len(self._stage):
            # only reachable through data_received (a loop that pushes bytes ignores our
            # pause): make room rather than lose them
            self._stage.extend(bytes(_RECV_CHUNK))
        return memoryview(self._stage)[self._hi : self._hi + _RECV_CHUNK]

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct is not None:
            self._direct_pos += nbytes
            remaining = self._direct_size - self._direct_pos
            if not remaining:
                self._set_lowat(1)
                record = (self._direct_head, self._direct)
                self._delivered = max(self._delivered, self._direct_size)
                self._direct, self._direct_head = None, b""
                self._emit(record)
                return
            if self._direct_pos == len(self._direct):
                self._grow()
            self._set_lowat(min(remaining, len(self._direct) - self._direct_pos))
            return
        self._hi += nbytes
        if self._splitter is not None:
            self._split()
            self._room_for_a_long_head()
        self._wake()
        self._maybe_pause()

    def data_received(self, data: bytes) -> None:
        # A loop that does not support buffered protocols hands over bytes instead of asking
        # for a buffer: copy them in the same way.
        view = memoryview(data)
        while view:
            target = self.get_buffer(len(view))
            n = min(len(target), len(view))
            target[:n] = view[:n]
            target.release()  # the staging buffer may have to grow for the next piece
            self.buffer_updated(n)
            view = view[n:]

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # keep the transport open so replies to what was received still go out

    def _handshake_expired(self, timeout: float) -> None:
        self._deadline = None
        if self._negotiated or self._transport is None:
            return
        received = self._hi - self._lo + self.payload_received
        if self._error is None:
            self._error = ProtocolError(
                f"handshake not completed within {timeout:g} s ({received} bytes received); closed"
            )
        self._transport.abort()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._admitted and self._guard is not None:
            self._admitted = False
            self._guard.release()
        self._eof = True
        if exc is not None and self._error is None:
            self._error = exc
        self._wake()
        if not self._closed.done():
            self._closed.set_result(None)
        self._lost = True
        while self._drain_waiters:
            waiter = self._drain_waiters.popleft()
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)

    # -- write-side flow control (the transport calls these) ---------------------------------
    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        while self._drain_waiters:
            waiter = self._drain_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def writable(self) -> None:
        """Return once the transport takes more data; ConnectionResetError once it is gone."""
        if self._lost:
            raise ConnectionResetError("Connection lost")
        if not self._write_paused:
            return
        waiter = self._event_loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    async def closed(self) -> None:
        """Return once the connection is closed."""
        await asyncio.shield(self._closed)

    # -- limits ------------------------------------------------------------------------------
    @property
    def max_record(self) -> int:
        """The largest record (head + payload) this connection accepts now."""
        return self._max_record

    @property
    def payload_buffer_bytes(self) -> int:
        """Bytes of buffer held for the payload being received in place (0 if none)."""
        return len(self._direct) if self._direct is not None else 0

    @property
    def payload_received(self) -> int:
        """Bytes of the payload being received in place that arrived so far."""
        return self._direct_pos if self._direct is not None else 0

    def negotiated(self, max_record: int) -> None:
        """The owner's word that the peer completed its handshake: the deadline no longer
        applies and records up to ``max_record`` bytes are accepted from now on."""
        self._negotiated = True
        self._max_record = max_record
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if len(self._stage) < _STAGE_BYTES:
            stage = bytearray(_STAGE_BYTES)
            n = self._hi - self._lo
            stage[:n] = memoryview(self._stage)[self._lo : self._hi]
            self._stage, self._lo, self._hi = stage, 0, n

    # -- parsing -----------------------------------------------------------------------------
    def set_splitter(self, splitter: Splitter) -> None:
        """Leave raw mode: what is staged already and everything after is split into records."""
        self._splitter = splitter
        self._split()
        self._maybe_pause()

    def _split(self) -> None:
        splitter = self._splitter
        assert splitter is not None
        stage = self._stage
        while self._lo < self._hi and self._error is None:
            view = memoryview(stage)[self._lo : self._hi]
            try:
                known = splitter(view)
            except ProtocolError as exc:
                self._error = exc  # raised to the consumer after the records before it
                if self._transport is not None:
                    self._transport.pause_reading()
                return
            if known is None:
                return
            head_len, payload_len = known
            total = head_len + payload_len
            if total > self._max_record:
                when = "" if self._negotiated else " before negotiation"
                self._error = ProtocolError(
                    f"a record of {total} bytes exceeds this connection's limit of "
                    f"{self._max_record} bytes{when}"
                )
                if self._transport is not None:
                    self._transport.pause_reading()
                return
            if len(view) >= total:
                self._lo += total
                self._emit((bytes(view[:head_len]), bytes(view[head_len:total])))
            elif payload_len >= DIRECT_PAYLOAD and len(view) >= head_len:
                got = len(view) - head_len
                payload = self._buffer(payload_len, got)
                payload[:got] = view[head_len:]
                self._direct, self._direct_pos, self._direct_head = payload, got, bytes(view[:head_len])
                self._direct_size = payload_len
                self._lo = self._hi = 0
                if got == len(payload):
                    self._grow()
                self._set_lowat(min(payload_len - got, len(self._direct) - got))
                return
            else:
                return
        if self._lo == self._hi:
            self._lo = self._hi = 0
            if len(stage) > _STAGE_BYTES:
                self._stage = bytearray(_STAGE_BYTES)  # a long head has passed: give it back

    def _room_for_a_long_head(self) -> None:
        """Grow the staging buffer when it is full of ONE record whose head is not complete.

        A record's head must be staged whole before the splitter can place its payload, and a
        head can outgrow the stage (Crucible's Write carries a 9-byte context per block: 590 KB
        for 32 MiB). Pausing then would wait forever for a consumer with nothing to consume.
        The stage doubles as the bytes arrive, never past the record cap, and shrinks back
        once the record is split (see :meth:`_split`). A new buffer, not ``extend``: the
        transport may still hold a view of the old one.
        """
        staged = self._hi - self._lo
        if self._records or self._direct is not None or staged <= len(self._stage) - 2 * _RECV_CHUNK:
            return
        limit = self._max_record + _RECV_CHUNK
        if len(self._stage) >= limit:
            return
        stage = bytearray(min(limit, 2 * len(self._stage)))
        stage[:staged] = memoryview(self._stage)[self._lo : self._hi]
        self._stage, self._lo, self._hi = stage, 0, staged

    def _set_lowat(self, nbytes: int) -> None:
        """Wake up only once ``nbytes`` have arrived (the rest of an in-place payload).

        The peer sends whole frames, so they do arrive; without this a 1 MiB payload wakes
        the receiver once per 64 KiB loopback segment. The kernel caps the value at half the
        receive buffer. TCP only: on unix sockets epoll ignores SO_RCVLOWAT.
        """
        if self._sock is None or (nbytes == self._lowat) or (nbytes < DIRECT_PAYLOAD and self._lowat == 1):
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
        except OSError:
            self._sock = None  # not supported here: keep waking up per segment
            return
        self._lowat = nbytes

    def _buffer(self, size: int, have: int) -> bytearray:
        """A buffer for a ``size``-byte payload of which ``have`` bytes are here: whole if the
        peer earned it (a recycled buffer, or a size it delivered before), else sized by what
        arrived (see :meth:`_grow`)."""
        for i, spare in enumerate(self._spare):
            if len(spare) == size:
                return self._spare.pop(i)
        if size <= self._delivered:
            return bytearray(size)
        return bytearray(min(size, max(_GROW_FROM, have)))

    def _grow(self) -> None:
        """The in-place payload buffer is full and more is due: double it (a new buffer; the
        old one may still be exported to the transport's recv_into)."""
        old = self._direct
        assert old is not None
        new = bytearray(min(self._direct_size, 2 * len(old)))
        new[: self._direct_pos] = memoryview(old)[: self._direct_pos]
        self._direct = new

    def _compact(self) -> None:
        n = self._hi - self._lo
        self._stage[:n] = self._stage[self._lo : self._hi]
        self._lo, self._hi = 0, n

    def _emit(self, record: Record) -> None:
        self._records.append(record)
        self._queued += len(record[0]) + len(record[1])
        self._wake()
        self._maybe_pause()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _maybe_pause(self) -> None:
        if self._reading_paused or self._transport is None:
            return
        staged = self._hi - self._lo
        if self._queued > _QUEUE_HIGH or staged > len(self._stage) - _RECV_CHUNK:
            self._reading_paused = True
            self._transport.pause_reading()

    def _maybe_resume(self) -> None:
        if not self._reading_paused or self._transport is None or self._error is not None:
            return
        if self._queued < _QUEUE_LOW and self._hi - self._lo <= len(self._stage) - 2 * _RECV_CHUNK:
            self._reading_paused = False
            self._transport.resume_reading()

    async def _wait(self) -> None:
        self._waiter = self._event_loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- consumer API ------------------------------------------------------------------------
    def _partial(self) -> bytes:
        """The bytes of an incomplete record received so far (for error reports)."""
        if self._direct is not None:
            return self._direct_head + bytes(memoryview(self._direct)[: self._direct_pos])
        return bytes(memoryview(self._stage)[self._lo : self._hi])

    async def read_record(self) -> Record | None:
        """The next record; None on EOF between records.

        Raises the splitter's ProtocolError, the connection's error, or
        ``asyncio.IncompleteReadError`` when the peer closed in the middle of a record.
        """
        while not self._records:
            if self._error is not None:
                raise self._error
            if self._eof:
                partial = self._partial()
                if partial:
                    raise asyncio.IncompleteReadError(partial, None)
                return None
            await self._wait()
        record = self._records.popleft()
        self._queued -= len(record[0]) + len(record[1])
        self._maybe_resume()
        return record

    def recycle(self, payload: bytes | bytearray) -> None:
        """Offer a payload this stream returned for reuse by a later record of the same size.

        Only for a payload nobody holds any more (not even a memoryview of it): the next
        record's bytes overwrite it. Anything else (bytes, big buffers) is ignored.
        """
        if (
            type(payload) is bytearray
            and DIRECT_PAYLOAD <= len(payload) <= _SPARE_MAX_BYTES
            and len(self._spare) < _SPARE_BUFFERS
        ):
            self._spare.append(payload)

    async def readexactly(self, n: int) -> bytes:
        """Raw mode only (before :meth:`set_splitter`): exactly ``n`` bytes (n <= 128 KiB
        before :meth:`negotiated`, 448 KiB after)."""
        if self._splitter is not None:
            raise RuntimeError("readexactly() is for raw mode; this stream splits records")
        if n > len(self._stage) - _RECV_CHUNK:
            raise ValueError(f"readexactly({n}) exceeds the staging buffer")
        while self._hi - self._lo < n:
            if self._error is not None:
                raise self._error
            if self._eof:
                raise asyncio.IncompleteReadError(self._partial(), n)
            await self._wait()
        data = bytes(memoryview(self._stage)[self._lo : self._lo + n])
        self._lo += n
        if self._lo == self._hi:
            self._lo = self._hi = 0
        self._maybe_resume()
        return data


def _set_send_buffer(sock: Any) -> None:
    # ``sock`` is the transport's TransportSocket (which forwards setsockopt)
    with contextlib.suppress(OSError):  # a smaller buffer only costs speed
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)


async def open_stream(
    host: str, port: int, splitter: Splitter | None = None, *, max_record: int = HANDSHAKE_MAX_RECORD
) -> tuple[RecordStream, RecordWriter]:
    """``asyncio.open_connection`` for a :class:`RecordStream` (records up to ``max_record``
    bytes until :meth:`RecordStream.negotiated`)."""
    loop = asyncio.get_running_loop()
    transport, stream = await loop.create_connection(
        lambda: RecordStream(splitter, max_record=max_record), host, port
    )
    return stream, RecordWriter(transport, stream)


async def create_server(
    on_connect: ConnectedCallback,
    host: str,
    port: int,
    splitter: Splitter | None = None,
    *,
    guard: ConnectionGuard | None = None,
) -> asyncio.Server:
    """``asyncio.start_server`` for :class:`RecordStream` connections, limited by ``guard``."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: RecordStream(splitter, on_connect, guard=guard), host, port)


async def create_unix_server(
    on_connect: ConnectedCallback,
    path: str,
    splitter: Splitter | None = None,
    *,
    guard: ConnectionGuard | None = None,
) -> asyncio.Server:
    """``asyncio.start_unix_server`` for :class:`RecordStream` connections, limited by ``guard``."""
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(lambda: RecordStream(splitter, on_connect, guard=guard), path)


class RecordWriter:
    """The sending half of a :class:`RecordStream` connection: the part of
    ``asyncio.StreamWriter`` this package uses, on public transport API only."""

    def __init__(self, transport: asyncio.Transport, stream: RecordStream) -> None:
        self._transport = transport
        self._stream = stream

    @property
    def transport(self) -> asyncio.Transport:
        return self._transport

    def write(self, data: Data) -> None:
        self._transport.write(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._transport.close()

    async def wait_closed(self) -> None:
        await self._stream.closed()

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark; raise
        ConnectionResetError (or the connection's error) once the connection is lost."""
        if self._transport.is_closing():
            # let connection_lost run first, so a lost connection raises instead of hanging
            await asyncio.sleep(0)
        await self._stream.writable()


class BatchedWriter:
    """Sends the parts queued during one event-loop iteration together, in one writev().

    Profiling 4 KiB random I/O showed ``socket.send`` as the top cost (~60 us per call: on
    loopback the sender also runs the receiver's network path). Several jobs are usually
    submitted in the same iteration (QEMU keeps several requests in flight; a downstairs reply
    carries several job replies), so they leave together on the next iteration, headers and
    payloads alike, without joining them into a new buffer. Parts keep their order (one FIFO
    per connection), so submission order is still execution order at every downstairs. Parts
    queued for a writer that has since closed are dropped; their jobs' futures are failed by
    the connection's owner.
    """

    def __init__(self, writer: RecordWriter) -> None:
        self.writer = writer
        self._parts: list[Data] = []
        self._scheduled = False
        sock = writer.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        if sock is not None:
            _set_send_buffer(sock)

    def write(self, data: Data) -> None:
        if not data:
            return
        self._parts.append(data)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Hand everything queued to the socket now (what it does not take, to the transport)."""
        self._scheduled = False
        parts, self._parts = self._parts, []
        writer = self.writer
        if not parts or writer.is_closing():
            return
        transport = writer.transport
        # Writing to the socket directly keeps the byte order only while the transport has
        # nothing buffered; otherwise everything goes through the transport.
        while parts and self._fd >= 0 and transport.get_write_buffer_size() == 0:
            batch = parts[:_IOV_MAX]
            try:
                sent = os.writev(self._fd, batch)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # the transport's own write reports the error and closes the connection
            parts = _skip(parts, sent)
            if sum(len(p) for p in batch) > sent:
                break  # the socket is full
        _hand_to_transport(transport, parts)

    async def drain(self) -> None:
        self.flush()
        await self.writer.drain()


def _skip(parts: list[Data], sent: int) -> list[Data]:
    """``parts`` without their first ``sent`` bytes (a partly sent part becomes a view)."""
    i = 0
    while i < len(parts) and sent >= len(parts[i]):
        sent -= len(parts[i])
        i += 1
    rest = parts[i:]
    if rest and sent:
        rest[0] = memoryview(rest[0])[sent:]
    return rest


def _hand_to_transport(transport: asyncio.WriteTransport, parts: list[Data]) -> None:
    small: list[Data] = []
    for part in parts:
        if len(part) >= DIRECT_PAYLOAD:
            if small:
                transport.write(b"".join(small))
                small = []
            transport.write(part)  # never copied into a joined buffer
        else:
            small.append(part)
    if small:
        transport.write(b"".join(small))
