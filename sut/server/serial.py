"""The guest serial console: a bounded history fanned out to live readers.

QEMU serves the serial port on a unix socket (``server=on,wait=off``); the
server connects before ``cont`` so no guest output is lost, keeps the last
``capacity`` bytes (absolute byte offsets, as Propolis does) and copies new
output to every subscriber (the websocket readers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CAPACITY = 1 << 20
# A reader this many chunks behind is dropped rather than letting memory grow
# without bound; it can reconnect with from_start= and replay the history.
_MAX_BACKLOG_CHUNKS = 4096


class SerialError(Exception):
    """Root of serial console errors."""


class SerialNotConnectedError(SerialError):
    """Input was sent while no guest console is attached."""


@dataclass(frozen=True)
class HistorySlice:
    data: bytes
    start_offset: int

    @property
    def end_offset(self) -> int:
        return self.start_offset + len(self.data)


class Subscription:
    """Replayed history followed by live output; ends when the console closes."""

    def __init__(self, console: SerialConsole, replay: HistorySlice) -> None:
        self.replay = replay
        self._console = console
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.replay.data:
            yield self.replay.data
        while (chunk := await self.queue.get()) is not None:
            yield chunk

    def close(self) -> None:
        self._console.unsubscribe(self)


class SerialConsole:
    def __init__(self, capacity: int = DEFAULT_CAPACITY, logger: logging.Logger | None = None):
        self._capacity = capacity
        self._history = bytearray()
        self._history_start = 0
        self._subscribers: set[Subscription] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._closed = False
        self._log = logger or logging.getLogger(__name__)

    @property
    def total_bytes(self) -> int:
        return self._history_start + len(self._history)

    @property
    def closed(self) -> bool:
        return self._closed

    async def attach(self, socket_path: Path) -> None:
        """Connect to QEMU's serial socket and start copying its output."""
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        self._writer = writer
        self._reader_task = asyncio.create_task(self._pump(reader), name="serial-reader")

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(65536):
                self.feed(chunk)
        except (ConnectionError, OSError) as exc:
            self._log.info("serial console connection ended", extra={"error": str(exc)})

    def feed(self, chunk: bytes) -> None:
        """Append guest output (public for unit tests of the fan-out)."""
        self._history += chunk
        excess = len(self._history) - self._capacity
        if excess > 0:
            del self._history[:excess]
            self._history_start += excess
        for sub in list(self._subscribers):
            if sub.queue.qsize() >= _MAX_BACKLOG_CHUNKS:
                self._log.warning("dropping a serial reader that fell too far behind")
                self.unsubscribe(sub)
                continue
            sub.queue.put_nowait(chunk)

    def history(
        self,
        *,
        from_start: int | None = None,
        most_recent: int | None = None,
        max_bytes: int | None = None,
    ) -> HistorySlice:
        """Bytes from absolute offset ``from_start`` or the last ``most_recent``."""
        if most_recent is not None:
            start = max(self.total_bytes - most_recent, self._history_start)
        else:
            start = max(from_start or 0, self._history_start)
        begin = min(start - self._history_start, len(self._history))
        data = bytes(self._history[begin:])
        if max_bytes is not None:
            data = data[:max_bytes]
        return HistorySlice(data, self._history_start + begin)

    def snapshot(self) -> HistorySlice:
        """The whole retained history with its absolute start offset (a migration source sends it)."""
        return HistorySlice(bytes(self._history), self._history_start)

    def take_over(self, data: bytes, start_offset: int) -> None:
        """Begin this console's history with a migration source's: offsets continue where
        the source's ended, so a reader's ``from_start`` means the same byte on both servers.
        Output this console already has (none, normally: the guest has not run here yet)
        follows the taken-over bytes."""
        own = bytes(self._history)
        self._history = bytearray(data)
        self._history_start = start_offset
        for sub in list(self._subscribers):
            sub.queue.put_nowait(data)
        if own:
            self._history += own
        excess = len(self._history) - self._capacity
        if excess > 0:
            del self._history[:excess]
            self._history_start += excess

    def subscribe(self, *, from_start: int | None = None, most_recent: int | None = None) -> Subscription:
        # Replay and registration happen in one synchronous step, so no byte
        # falls between the history and the live stream.
        sub = Subscription(self, self.history(from_start=from_start, most_recent=most_recent))
        if self._closed:
            sub.queue.put_nowait(None)
        else:
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.discard(sub)
            sub.queue.put_nowait(None)

    async def write(self, data: bytes) -> None:
        """Type ``data`` into the guest."""
        if self._writer is None or self._writer.is_closing():
            raise SerialNotConnectedError("no guest serial console is attached (VM not running)")
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        """Detach from QEMU and end every subscription; idempotent."""
        self._closed = True
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
            self._reader_task = None
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
            self._writer = None
        for sub in list(self._subscribers):
            self.unsubscribe(sub)
