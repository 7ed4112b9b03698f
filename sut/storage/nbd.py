"""NBD server on a UNIX socket: fixed newstyle handshake, simple replies.

QEMU opens its block devices while the VM is still paused, before the upstairs is active, so
the handshake is answered AT ONCE with the size from the VCR geometry, and I/O requests are
held until the volume is active. Requests of one connection run concurrently (QEMU keeps
many in flight); they are submitted to the upstairs in arrival order.

The connection is a :class:`~sut.storage.stream.RecordStream`: raw reads for the handshake,
then one record per request, a write's payload received straight into its own buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import struct
from pathlib import Path
from typing import Protocol, cast

from sut.storage.errors import ProtocolError, StorageError
from sut.storage.stream import BatchedWriter, RecordStream, RecordWriter, create_unix_server

__all__ = ["NbdExport", "NbdServer"]

NBD_MAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
CLIENT_FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_INVALID = 2**31 + 1, 2**31 + 3
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3

TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_TRIM = 1, 2, 4, 32
TF_SEND_WRITE_ZEROES = 64
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6

_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_MAX_IO = 32 * 1024 * 1024  # refuse larger requests (QEMU's NBD limit is 32 MiB)
_MAX_INFLIGHT = 64  # per connection: bounds memory held by concurrent requests


class NbdExport(Protocol):
    """What the NBD server needs from a volume."""

    size_bytes: int
    block_size: int
    read_only: bool

    async def wait_ready(self) -> None: ...
    async def read(self, offset: int, length: int) -> bytes: ...
    async def write(self, offset: int, data: bytes) -> None: ...
    async def flush(self) -> None: ...


class _Disconnect(Exception):
    pass


def _split_request(data: memoryview) -> tuple[int, int] | None:
    """Record boundaries of the transmission phase: a request, plus its data for a write."""
    if len(data) < _REQUEST.size:
        return None
    magic, _flags, cmd, _handle, _offset, length = _REQUEST.unpack_from(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad NBD request magic {magic:#x}")
    if cmd != CMD_WRITE:
        return _REQUEST.size, 0
    if length > _MAX_IO:
        raise ProtocolError(f"NBD write of {length} bytes exceeds {_MAX_IO}")
    return _REQUEST.size, length


class NbdServer:
    """Serve ``export`` on ``socket_path``; :meth:`close` stops it and removes the socket."""

    def __init__(self, export: NbdExport, socket_path: Path, logger: logging.Logger) -> None:
        self.export = export
        self.socket_path = socket_path
        self.log = logger
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.socket_path.exists() or self.socket_path.is_symlink():
            self.socket_path.unlink()  # stale socket from a dead process; ours is unique
        self._server = await create_unix_server(self._accept, str(self.socket_path))

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if server is not None:
            await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    async def _accept(self, reader: RecordStream, writer: RecordWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if await self._handshake(reader, writer):
                await self._transmission(reader, writer)
        except (_Disconnect, ProtocolError, asyncio.IncompleteReadError, ConnectionError) as exc:
            self.log.debug("nbd client gone: %r", exc)
        except asyncio.CancelledError:
            # Only close() cancels these tasks. Ending normally matters on Python 3.11: the
            # streams callback calls task.exception() on a cancelled task and logs an error.
            self.log.debug("nbd connection closed by the export")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    # -- handshake -------------------------------------------------------------------------
    def _tflags(self) -> int:
        flags = TF_HAS_FLAGS | TF_SEND_FLUSH
        if self.export.read_only:
            flags |= TF_READ_ONLY
        else:
            flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
        return flags

    def _opt_reply(self, writer: RecordWriter, opt: int, rtype: int, data: bytes = b"") -> None:
        writer.write(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)

    async def _handshake(self, reader: RecordStream, writer: RecordWriter) -> bool:
        writer.write(NBD_MAGIC + struct.pack(">QH", IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        await writer.drain()
        (client_flags,) = struct.unpack(">I", await reader.readexactly(4))
        while True:
            magic, opt, length = struct.unpack(">QII", await reader.readexactly(16))
            if magic != IHAVEOPT:
                raise _Disconnect(f"bad option magic {magic:#x}")
            if length > 65536:
                raise _Disconnect(f"option {opt} data of {length} bytes is too long")
            data = await reader.readexactly(length)
            if opt == OPT_EXPORT_NAME:
                writer.write(struct.pack(">QH", self.export.size_bytes, self._tflags()))
                if not client_flags & CLIENT_FLAG_NO_ZEROES:
                    writer.write(bytes(124))
                await writer.drain()
                return True
            if opt == OPT_ABORT:
                self._opt_reply(writer, opt, REP_ACK)
                await writer.drain()
                return False
            if opt == OPT_LIST:
                self._opt_reply(writer, opt, REP_SERVER, struct.pack(">I", 0))
                self._opt_reply(writer, opt, REP_ACK)
            elif opt in (OPT_INFO, OPT_GO):
                if len(data) < 6 or len(data) < 6 + struct.unpack_from(">I", data)[0]:
                    self._opt_reply(writer, opt, REP_ERR_INVALID)
                else:
                    self._info_replies(writer, opt)
                    if opt == OPT_GO:
                        await writer.drain()
                        return True
            else:
                # STARTTLS, STRUCTURED_REPLY, META_CONTEXT...: QEMU falls back gracefully
                self._opt_reply(writer, opt, REP_ERR_UNSUP)
            await writer.drain()

    def _info_replies(self, writer: RecordWriter, opt: int) -> None:
        # any export name is accepted: one socket serves exactly one disk
        bs = self.export.block_size
        self._opt_reply(
            writer, opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.export.size_bytes, self._tflags())
        )
        self._opt_reply(
            writer, opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, bs, max(bs, 4096), _MAX_IO)
        )
        self._opt_reply(writer, opt, REP_ACK)

    # -- transmission ----------------------------------------------------------------------
    async def _transmission(self, reader: RecordStream, writer: RecordWriter) -> None:
        slots = asyncio.Semaphore(_MAX_INFLIGHT)
        out = BatchedWriter(writer)
        inflight: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            inflight.discard(task)
            slots.release()

        reader.negotiated(_REQUEST.size + _MAX_IO)  # the handshake is done: writes may be large
        reader.set_splitter(_split_request)
        try:
            while True:
                record = await reader.read_record()
                if record is None:
                    return  # the client closed the connection
                head, received = record
                _magic, _flags, cmd, handle, offset, length = _REQUEST.unpack(head)
                if cmd == CMD_DISC:
                    # finish what was asked before the disconnect, as the protocol requires
                    await asyncio.gather(*inflight, return_exceptions=True)
                    out.flush()
                    return
                # A large payload is the bytearray the kernel wrote into (sut.storage.stream
                # receives it in place); the export only reads it.
                payload = cast(bytes, received)
                await slots.acquire()
                task = asyncio.create_task(self._request(out, cmd, handle, offset, length, payload))
                inflight.add(task)
                task.add_done_callback(done)
        finally:
            for task in list(inflight):
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
            out.flush()  # replies already queued (a no-op once the socket is closing)

    async def _request(
        self, out: BatchedWriter, cmd: int, handle: int, offset: int, length: int, payload: bytes
    ) -> None:
        error, data = 0, b""
        export = self.export
        try:
            if offset + length > export.size_bytes:
                error = errno.ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else errno.EINVAL
            elif cmd == CMD_READ:
                if length > _MAX_IO:
                    error = errno.EINVAL
                else:
                    await export.wait_ready()
                    data = await export.read(offset, length)
            elif cmd in (CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM):
                if export.read_only:
                    error = errno.EPERM
                else:
                    await export.wait_ready()
                    await self._write(cmd, offset, length, payload)
            elif cmd == CMD_FLUSH:
                await export.wait_ready()
                await export.flush()
            else:
                error = errno.EINVAL
        except StorageError as exc:
            self.log.warning("nbd cmd %s at %s+%s failed: %s", cmd, offset, length, exc)
            error = errno.EIO
        # Replies never interleave: each is queued whole (header, then data) with no await in
        # between. Replies completing in the same loop iteration leave in one writev(); a
        # large read is not copied behind its 16-byte header (see BatchedWriter).
        out.write(_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle))
        if error == 0 and data:
            out.write(data)

    async def _write(self, cmd: int, offset: int, length: int, payload: bytes) -> None:
        if cmd == CMD_WRITE:
            await self.export.write(offset, payload)
            return
        # TRIM and WRITE_ZEROES both leave zeros (TRIM may discard; zeros are a valid result)
        chunk = 1024 * 1024
        pos = 0
        while pos < length:
            n = min(chunk, length - pos)
            await self.export.write(offset + pos, bytes(n))
            pos += n
