"""A downstairs that speaks Crucible's protocol (message version 13) over Crucible's raw extents.

Issue 13 item 4. Facts from oxidecomputer/crucible 6d037cb (``downstairs/src/lib.rs``); the
behaviours of the real binary that its oracle tests pinned are listed at the end of
``sut/storage/README.md``.

Negotiation, per connection, in this order (anything out of order closes the connection;
I/O messages before the end are ignored; ``Ruok`` gets ``Imok`` at any time):

1. ``HereIAm`` -> ``YesItsMe{13, repair_addr = address:port+4000}``, or ``VersionMismatch`` /
   ``ReadOnlyMismatch`` / ``EncryptedMismatch`` and close (``wire.answer_here_i_am``).
2. ``PromoteToActive`` with other ids than the HereIAm's -> ``UuidMismatch`` and close. Read-
   write: one active upstairs; a LOWER generation than the active one's is refused by closing,
   an equal one only for the identical (upstairs, session); otherwise the active upstairs is
   told ``YouAreNoLongerActive{new ids, new gen}`` and dropped, with its pending jobs.
   Read-only: one session per upstairs id. Then ``YouAreNowActive``: the frame cap rises from
   64 KiB to 100 MiB and the handshake deadline stops.
3. ``RegionInfoPlease`` -> ``RegionInfo``; then ``ExtentVersionsPlease`` -> ``ExtentVersions``,
   or ``LastFlush{n}`` (no reply; job n counts as done).

I/O: every job message's ids must be the connection's, else ``UuidMismatch`` (the upstairs id
if that differs, else the session id) and the job is dropped. A job runs when all its
dependencies are done (a completed Flush or Barrier resets the done set to itself, as in
Crucible), not in arrival order. Where the real downstairs panics or spins we answer the job
with its ack's ``Err`` and serve on: I/O past the region's end (``OffsetInvalid``), a block
hash that does not match its data (``HashMismatch``; the real one retries forever), a Flush
whose ``extent_limit`` is beyond the region (``InvalidExtent``; the real one spins), a read
larger than a frame can carry (``InvalidNumberOfBlocks``). A failed job does not count as
done. A Write whose data is not one block per context closes the connection on arrival (as
the real one). ``--read/--write/--flush-errors``
behave as the real ones: ``ErrorReport{GenericError("test error")}`` for a quarter of the
attempts, then the job is retried until it succeeds. A write to a read-only downstairs
closes the connection (as the real one).

Repair (``sut.storage.repair_http``; facts from ``downstairs/src/lib.rs``, ``repair.rs``,
``region.rs``, ``extent.rs``, and from probing the real binary):

- The repair HTTP server listens on ``address:port+4000`` (the address YesItsMe names) and
  answers as the real one's (routes, statuses, JSON, content types: see ``repair_http``);
  ``/extent/{eid}/repair-ready`` is true while the extent is closed (always, read-only).
- Reconciliation messages are served only once negotiation is over (ExtentVersionsPlease or
  LastFlush answered); during negotiation they are ignored, as the real one does. They run at
  once, in arrival order, and are answered ``RepairAckId{repair_id}`` or
  ``ExtentError{repair_id, extent_id, error}``: ``ExtentFlush`` flushes that one extent with the
  given flush/gen if it is dirty (``client_id`` is ignored, as there), ``ExtentClose`` closes it,
  ``ExtentRepair`` downloads the SOURCE's file into ``NNN.copy`` (the file list must be exactly
  ``["NNN"]`` - RepairFilesInvalid; the file exactly the size the geometry gives -
  RepairStreamError; the source's extent still closed afterwards - RepairRequestError), renames
  it ``NNN.replace``, copies it over the extent, then ``NNN.completed`` and removed, syncing each
  step (``dest_clients`` is ignored). Opening an extent drops ``.copy`` / ``.completed`` and
  finishes a ``.replace``, so a crash mid-way recovers as on the real one. A failed download
  leaves ``NNN.copy`` behind, so a retry is IoError until ``ExtentReopen`` (as the real one).
- Live-repair jobs are ordered by dependencies like I/O: ``ExtentLiveClose`` /
  ``ExtentLiveFlushClose`` (flush, then close) -> ``ExtentLiveCloseAck(Ok((gen, flush, dirty)))``,
  ``ExtentLiveRepair`` (the download above) -> ``ExtentLiveRepairAckId``, ``ExtentLiveReopen`` ->
  ``ExtentLiveAckId``, ``ExtentLiveNoOp`` -> ``ExtentLiveAckId``. A failed ExtentLiveRepair is an
  ``ErrorReport`` and then the connection closes, as on the real one.
- Read-only: Write, WriteUnwritten, ExtentClose, ExtentLiveFlushClose, ExtentLiveRepair,
  ExtentLiveReopen and ExtentLiveNoOp close the connection (the real one's list; ExtentLiveClose
  is served).
- Where the real one panics (the process aborts) ours answers with an error and serves on: I/O
  touching a closed extent (IoError in the ack), a reconciliation or live-repair job on an extent
  past the region (InvalidExtent) or in the wrong state - closing a closed one, reopening,
  flushing or repairing an open/closed one (GenericError) - in ExtentError or the job's ack
  (a failed job is not done); a repair-ready past the region (400). ExtentVersionsPlease while
  an extent is closed reports its last versions (the real one aborts). A Flush skips closed
  extents; they are flushed after their reopen. Region I/O runs on the event loop thread; a
  download is asyncio, written in chunks of at most 1 MiB.

Hardening (``sut.storage.stream``): ``ConnectionGuard`` (connection cap, handshake deadline),
``RecordStream`` with the codec's ``FrameSplitter`` (64 KiB until active, then 100 MiB; bulk
data received in place), bounds on the jobs a connection may queue (count and bytes) and
on the jobs remembered as done between flushes, every range checked before the region is
touched. Malformed frames close the connection with one ``protocol_error`` JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import enum
import os
import random
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sut.storage.bincode import SocketAddr
from sut.storage.errors import ProtocolError
from sut.storage.extent_raw import (
    ExtentFailure,
    RawExtent,
    RawRegion,
    definition_dict,
    extent_file_name,
    extent_path,
)
from sut.storage.repair_http import FileType, HttpError, RepairClient, RepairClientError, RepairServer
from sut.storage.service import JsonLog, add_limit_flags, limits_from, serve_until_signal
from sut.storage.stream import ConnectionGuard, ConnectionLimits, RecordStream, RecordWriter, create_server
from sut.storage.wire import messages as m
from sut.storage.wire.crucible_error import CrucibleError, ErrorKind
from sut.storage.wire.fields import BlockContext, PlainReadContexts, ReadResponseHeader
from sut.storage.wire.framing import NEGOTIATION_FRAME_CAP, FrameSplitter
from sut.storage.wire.messages import MAX_FRAME, Message, decode_record, encode_parts
from sut.storage.wire.negotiation import REPAIR_PORT_OFFSET, answer_here_i_am

__all__ = ["Downstairs", "FaultConfig", "main"]

MAX_PENDING_JOBS = 4096
"""Jobs a connection may have waiting for their dependencies; more closes it."""
MAX_PENDING_BYTES = 512 * 1024 * 1024
"""Write data a connection may have waiting for dependencies; more closes it."""
MAX_DONE_SINCE_FLUSH = 262_144
"""Jobs completed since the last Flush or Barrier a connection may accumulate (their ids are
kept for dependency checks; an upstairs flushes far more often); more closes it."""
_READ_RESPONSE_OVERHEAD = 64 * 1024  # frame bytes besides the data, generously
_ERROR_RATE = 0.25  # as the real downstairs' --*-errors flags
_LOSSY_RATE = 0.25  # as the real downstairs' --lossy: skips and pauses
LOSSY_PAUSE_S = 0.1

_JOBS = (
    m.Write,
    m.WriteUnwritten,
    m.Flush,
    m.Barrier,
    m.ReadRequest,
    m.ExtentLiveNoOp,
)
_LIVE_REPAIR = (m.ExtentLiveClose, m.ExtentLiveFlushClose, m.ExtentLiveRepair, m.ExtentLiveReopen)
_RECONCILE = (m.ExtentFlush, m.ExtentClose, m.ExtentRepair, m.ExtentReopen)
_IO = _JOBS + _LIVE_REPAIR
# what a read-only downstairs refuses by closing the connection (the real one's list: note
# ExtentLiveClose, ExtentFlush, ExtentRepair and ExtentReopen are not on it)
_READ_ONLY_REFUSED = (
    m.Write,
    m.WriteUnwritten,
    m.ExtentClose,
    m.ExtentLiveFlushClose,
    m.ExtentLiveRepair,
    m.ExtentLiveReopen,
    m.ExtentLiveNoOp,
)


log = JsonLog("downstairs")


@dataclass(frozen=True)
class FaultConfig:
    read_errors: bool = False
    write_errors: bool = False
    flush_errors: bool = False
    # as the real one's --lossy: a ready job is put back behind the others a quarter of the
    # time (dependencies, not arrival order, must keep the results right), and a quarter of
    # the jobs wait LOSSY_PAUSE_S before they run
    lossy: bool = False


class Phase(enum.Enum):
    OPEN = "open"  # waiting for HereIAm
    CONNECTED = "connected"  # YesItsMe sent, waiting for PromoteToActive
    PROMOTED = "promoted"  # YouAreNowActive sent, waiting for RegionInfoPlease
    REGION_INFO = "region_info"  # RegionInfo sent, waiting for ExtentVersionsPlease / LastFlush
    RUNNING = "running"


_NIL = uuid.UUID(int=0)  # ids of a connection before its HereIAm


class _Close(Exception):
    """End this connection (the reason is logged)."""


@dataclass(eq=False)
class _Conn:
    peer: object
    stream: RecordStream
    writer: RecordWriter
    phase: Phase = Phase.OPEN
    upstairs_id: uuid.UUID = _NIL
    session_id: uuid.UUID = _NIL
    generation: int = 0
    evicted: bool = False
    pending: list[tuple[int, Message]] = field(default_factory=list)
    pending_bytes: int = 0
    done: set[int] = field(default_factory=set)
    worker: asyncio.Task[None] | None = None  # lossy only: runs the jobs apart from the reader

    def send(self, msg: Message) -> None:
        if self.evicted or self.writer.is_closing():
            return
        head, data = encode_parts(msg)
        self.writer.write(head)
        if data:
            self.writer.write(data)


def _deps(msg: Message) -> Sequence[int]:
    if isinstance(msg, m.Write | m.WriteUnwritten):
        return msg.header.dependencies
    return getattr(msg, "dependencies", ())


def _job_id(msg: Message) -> int:
    if isinstance(msg, m.Write | m.WriteUnwritten):
        return msg.header.job_id
    return int(getattr(msg, "job_id", 0))


def _ids(msg: Message) -> tuple[uuid.UUID, uuid.UUID]:
    if isinstance(msg, m.Write | m.WriteUnwritten):
        return msg.header.upstairs_id, msg.header.session_id
    return msg.upstairs_id, msg.session_id  # type: ignore[union-attr]


def _failure(kind: ErrorKind, text: str) -> ExtentFailure:
    return ExtentFailure(CrucibleError(kind, text), f"{kind.name}: {text}")


class _RepairView:
    """The repair server's view of this downstairs (``repair_http.RepairApi``): eids are range
    checked here (the real one aborts on a repair-ready past the end), file paths come from the
    integer eid only."""

    def __init__(self, ds: Downstairs) -> None:
        self.ds = ds

    @property
    def _count(self) -> int:
        return self.ds.region.definition.extent_count

    def _check(self, eid: int) -> None:
        if eid >= self._count:
            raise HttpError(400, f"extent {eid} is not in this region of {self._count} extents")

    def region_info(self) -> dict[str, Any]:
        return definition_dict(self.ds.region.definition)

    def region_mode(self) -> bool:
        return self.ds.read_only

    def work(self) -> bool:
        pending = sum(len(c.pending) for c in self.ds._conns)
        log(
            "work",
            connections=len(self.ds._conns),
            pending_jobs=pending,
            closed=sorted(self.ds.region.closed),
        )
        return True

    def extent_files(self, eid: int) -> list[str]:
        if eid >= self._count:
            raise HttpError(400, "EBADF")
        path = extent_path(self.ds.region.dir, eid)
        if path.is_symlink() or not path.is_file():
            raise HttpError(400, "EBADF")
        return [extent_file_name(eid)]

    def extent_repair_ready(self, eid: int) -> bool:
        self._check(eid)
        return self.ds.read_only or eid in self.ds.region.closed

    def extent_file(self, eid: int, file_type: FileType) -> Path:
        self._check(eid)
        if file_type is not FileType.data:
            raise HttpError(400, f"extent {eid} has no {file_type.name} file (a raw region)")
        return extent_path(self.ds.region.dir, eid)


class Downstairs:
    """Serve one raw region over Crucible's protocol; one instance per process."""

    def __init__(
        self,
        region: RawRegion,
        *,
        read_only: bool,
        limits: ConnectionLimits | None = None,
        faults: FaultConfig | None = None,
    ) -> None:
        self.region = region
        self.read_only = read_only
        self.limits = limits or ConnectionLimits()
        self.faults = faults or FaultConfig()
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._active: dict[uuid.UUID, _Conn] = {}  # upstairs id -> its active connection
        self._repair_addr = SocketAddr.parse("127.0.0.1", 0)
        self._repair_server = RepairServer(
            _RepairView(self), log, request_deadline_s=self.limits.handshake_timeout_s
        )
        self._rng = random.Random()

    async def start(self, address: str, port: int) -> int:
        guard = ConnectionGuard(self.limits, log)
        self._server = await create_server(
            self._handle, address, port, FrameSplitter(NEGOTIATION_FRAME_CAP), guard=guard
        )
        bound = int(self._server.sockets[0].getsockname()[1])
        repair_port = bound + REPAIR_PORT_OFFSET
        if repair_port > 0xFFFF:
            self._server.close()
            raise OSError(f"port {bound} + {REPAIR_PORT_OFFSET} (the repair port) is above 65535")
        self._repair_addr = SocketAddr.parse(address, repair_port)
        try:
            await self._repair_server.start(address, repair_port)
        except OSError:
            self._server.close()
            raise
        d = self.region.definition
        log(
            "listening",
            address=address,
            port=bound,
            repair_port=repair_port,
            uuid=str(d.uuid),
            mode="ro" if self.read_only else "rw",
            encrypted=d.encrypted,
            message_version=m.MESSAGE_VERSION,
            max_connections=self.limits.max_connections,
            handshake_timeout_s=self.limits.handshake_timeout_s,
            max_frame_bytes=MAX_FRAME,
        )
        return bound

    async def stop(self) -> None:
        await self._repair_server.stop()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.writer.close()
        if self._server is not None:
            await self._server.wait_closed()
        self.region.close()

    # -- connections ---------------------------------------------------------------------------
    async def _handle(self, stream: RecordStream, writer: RecordWriter) -> None:
        conn = _Conn(writer.get_extra_info("peername"), stream, writer)
        self._conns.add(conn)
        try:
            while not conn.evicted:
                record = await stream.read_record()
                if record is None:
                    log("connection_closed", peer=conn.peer, phase=conn.phase.value)
                    break
                head, data = record
                msg = decode_record(head, data)
                if conn.phase is Phase.RUNNING:
                    await self._running(conn, msg)
                else:
                    self._negotiation_step(conn, msg)
                await writer.drain()
        except _Close as exc:
            log("closed", peer=conn.peer, phase=conn.phase.value, reason=str(exc))
        except ProtocolError as exc:
            log("protocol_error", peer=conn.peer, phase=conn.phase.value, reason=str(exc))
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log("connection_lost", peer=conn.peer, reason=repr(exc)[:300])
        except Exception as exc:  # noqa: BLE001 - a bug costs one connection, not the process
            log("connection_error", peer=conn.peer, error=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            if conn.worker is not None:
                conn.worker.cancel()
            self._conns.discard(conn)
            if self._active.get(conn.upstairs_id) is conn:
                del self._active[conn.upstairs_id]
                log("deactivated", upstairs_id=str(conn.upstairs_id), reason="disconnected")
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    # -- negotiation -----------------------------------------------------------------------------
    def _negotiation_step(self, conn: _Conn, msg: Message) -> None:
        if isinstance(msg, m.Ruok):
            conn.send(m.Imok())
        elif isinstance(msg, m.HereIAm):
            if conn.phase is not Phase.OPEN:
                raise _Close("HereIAm out of order")
            reply = answer_here_i_am(
                msg,
                repair_addr=self._repair_addr,
                read_only=self.read_only,
                encrypted=self.region.definition.encrypted,
            )
            conn.send(reply)
            if not isinstance(reply, m.YesItsMe):
                raise _Close(f"refused HereIAm: {type(reply).__name__}")
            conn.phase = Phase.CONNECTED
            conn.upstairs_id, conn.session_id, conn.generation = (
                msg.upstairs_id,
                msg.session_id,
                msg.generation,
            )
            log("connected", peer=conn.peer, upstairs_id=str(msg.upstairs_id), generation=msg.generation)
        elif isinstance(msg, m.PromoteToActive):
            if conn.phase is not Phase.CONNECTED:
                raise _Close(f"PromoteToActive out of order ({conn.phase.value})")
            if (msg.upstairs_id, msg.session_id) != (conn.upstairs_id, conn.session_id):
                conn.send(m.UuidMismatch(conn.upstairs_id))
                raise _Close("PromoteToActive with other ids than HereIAm's")
            # as the real one: the HereIAm's generation is compared (and named to a displaced
            # upstairs); the Promote's is echoed and kept
            self._promote(conn)
            conn.generation = msg.generation
            conn.phase = Phase.PROMOTED
            conn.stream.negotiated(MAX_FRAME)
            conn.stream.set_splitter(FrameSplitter(MAX_FRAME))
            conn.send(m.YouAreNowActive(msg.upstairs_id, msg.session_id, msg.generation))
            log("active", peer=conn.peer, upstairs_id=str(conn.upstairs_id), generation=conn.generation)
        elif isinstance(msg, m.RegionInfoPlease):
            if conn.phase is not Phase.PROMOTED:
                raise _Close(f"RegionInfoPlease out of order ({conn.phase.value})")
            conn.phase = Phase.REGION_INFO
            conn.send(m.RegionInfo(self.region.definition))
        elif isinstance(msg, m.ExtentVersionsPlease):
            if conn.phase is not Phase.REGION_INFO:
                raise _Close(f"ExtentVersionsPlease out of order ({conn.phase.value})")
            conn.phase = Phase.RUNNING
            self._reopen_abandoned(conn)
            conn.send(m.ExtentVersions(*self.region.versions()))
        elif isinstance(msg, m.LastFlush):
            if conn.phase is not Phase.REGION_INFO:
                raise _Close(f"LastFlush out of order ({conn.phase.value})")
            conn.phase = Phase.RUNNING
            self._reopen_abandoned(conn)
            if msg.last_flush_number is not None:
                conn.done.add(msg.last_flush_number)
            log("last_flush", peer=conn.peer, last_flush_number=msg.last_flush_number)
        else:
            log("ignored", peer=conn.peer, phase=conn.phase.value, message=type(msg).__name__)

    def _reopen_abandoned(self, conn: _Conn) -> None:
        """A read-write session starts with every extent open: one still closed was left by a
        repair whose upstairs went away half way (its session is over; ours is the only one).
        Without this the next repair's close fails for good (the real downstairs aborts on the
        ExtentVersionsPlease instead)."""
        if self.read_only:
            return
        for eid in sorted(self.region.closed):
            try:
                self.region.reopen_extent(eid)
            except ExtentFailure as exc:
                log("reopen_error", peer=conn.peer, extent=eid, error=str(exc))
            else:
                log("reopened_abandoned", peer=conn.peer, extent=eid)

    def _promote(self, conn: _Conn) -> None:
        """Make ``conn`` the active upstairs (read-write: the only one), or raise _Close."""
        old = (
            self._active.get(conn.upstairs_id) if self.read_only else next(iter(self._active.values()), None)
        )
        if old is not None and not self.read_only:
            if conn.generation < old.generation:
                raise _Close(f"generation {conn.generation} is lower than the active {old.generation}")
            same = (conn.upstairs_id, conn.session_id, conn.generation) == (
                old.upstairs_id,
                old.session_id,
                old.generation,
            )
            if conn.generation == old.generation and not same:
                raise _Close(f"generation {conn.generation} is already active for another session")
        if old is not None:
            old.send(m.YouAreNoLongerActive(conn.upstairs_id, conn.session_id, conn.generation))
            old.evicted = True
            old.pending.clear()
            old.writer.close()  # what was queued (the message above) still goes out
            self._active.pop(old.upstairs_id, None)
            log(
                "taken_over",
                old_upstairs_id=str(old.upstairs_id),
                old_generation=old.generation,
                new_upstairs_id=str(conn.upstairs_id),
                new_generation=conn.generation,
            )
        self._active[conn.upstairs_id] = conn

    # -- running ------------------------------------------------------------------------------
    async def _running(self, conn: _Conn, msg: Message) -> None:
        if isinstance(msg, m.Ruok):
            conn.send(m.Imok())
            return
        if isinstance(msg, _RECONCILE):
            if self.read_only and isinstance(msg, _READ_ONLY_REFUSED):
                raise _Close(f"{type(msg).__name__} to a read-only downstairs")
            await self._reconcile(conn, msg)
            return
        if not isinstance(msg, _IO):
            raise _Close(f"unexpected {type(msg).__name__} after negotiation")
        upstairs_id, session_id = _ids(msg)
        if upstairs_id != conn.upstairs_id:
            conn.send(m.UuidMismatch(conn.upstairs_id))
            return
        if session_id != conn.session_id:
            conn.send(m.UuidMismatch(conn.session_id))
            return
        if self.read_only and isinstance(msg, _READ_ONLY_REFUSED):
            raise _Close(f"{type(msg).__name__} to a read-only downstairs")
        if isinstance(msg, m.Write | m.WriteUnwritten):
            blocks, extra = divmod(len(msg.data), self.region.block_size)
            if extra or blocks != len(msg.header.contexts):
                # as the real one: a malformed write ends the connection when it arrives
                raise _Close(f"{len(msg.data)} bytes of data for {len(msg.header.contexts)} block contexts")
        job_id = _job_id(msg)
        if not self.faults.lossy and all(d in conn.done for d in _deps(msg)):
            await self._run(conn, job_id, msg)
            await self._run_ready(conn)
            return
        size = len(msg.data) if isinstance(msg, m.Write | m.WriteUnwritten) else 0
        if len(conn.pending) >= MAX_PENDING_JOBS or conn.pending_bytes + size > MAX_PENDING_BYTES:
            raise ProtocolError(
                f"more than {MAX_PENDING_JOBS} jobs or {MAX_PENDING_BYTES} bytes waiting for dependencies"
            )
        conn.pending.append((job_id, msg))
        conn.pending_bytes += size
        if self.faults.lossy and (conn.worker is None or conn.worker.done()):
            # lossy: the jobs run in a task of their own, so frames keep arriving (and queue
            # up behind a paused job) as they do on the real one
            conn.worker = asyncio.get_running_loop().create_task(self._lossy_worker(conn))

    async def _lossy_worker(self, conn: _Conn) -> None:
        try:
            await self._run_ready(conn)
        except Exception as exc:  # noqa: BLE001 - as in _handle: a bug costs one connection
            log("connection_error", peer=conn.peer, error=f"{type(exc).__name__}: {exc}"[:300])
            conn.writer.close()

    # -- reconciliation (after negotiation, before I/O; done at once, in arrival order) ----------
    async def _reconcile(
        self, conn: _Conn, msg: m.ExtentFlush | m.ExtentClose | m.ExtentRepair | m.ExtentReopen
    ) -> None:
        eid = msg.extent_id
        try:
            if isinstance(msg, m.ExtentFlush):
                # client_id names the source the upstairs sent this to; the real one ignores it
                self.region.flush_one(eid, msg.flush_number, msg.gen_number)
            elif isinstance(msg, m.ExtentClose):
                self.region.close_extent(eid)
            elif isinstance(msg, m.ExtentRepair):
                # dest_clients and source_client_id are the upstairs' business, as on the real one
                await self._repair_extent(eid, msg.source_repair_address)
            else:
                self.region.reopen_extent(eid)
        except ExtentFailure as exc:
            log("reconcile_error", op=type(msg).__name__, repair_id=msg.repair_id, extent=eid, error=str(exc))
            conn.send(m.ExtentError(msg.repair_id, eid, exc.error))
            return
        log("reconciled", op=type(msg).__name__, repair_id=msg.repair_id, extent=eid)
        conn.send(m.RepairAckId(msg.repair_id))

    async def _repair_extent(self, eid: int, source: SocketAddr) -> None:
        """Replace closed extent ``eid``'s file with the source downstairs' copy, as Crucible:
        ``NNN.copy`` <- the download (checked: one file, the expected size, the source's extent
        still closed afterwards), renamed ``NNN.replace``, copied over the extent, retired via
        ``NNN.completed``. A crash at any step is recovered when the extent is next opened."""
        copy_dir = self.region.begin_repair(eid)
        client = RepairClient(str(source.ip), source.port)
        name = extent_file_name(eid)
        try:
            files = await client.get_json(f"/extent/{eid}/files")
        except RepairClientError as exc:
            raise _failure(ErrorKind.RepairRequestError, f"Failed to get repair files: {exc}") from exc
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            # not a Vec<String>: the real one's client fails to decode it
            raise _failure(ErrorKind.RepairRequestError, f"Failed to get repair files: {str(files)[:200]}")
        if sorted(files) != [name]:
            raise _failure(ErrorKind.RepairFilesInvalid, f"Invalid repair file list: {str(files)[:200]}")
        expected = RawExtent.file_size(self.region.block_size, self.region.extent_blocks)
        try:
            got = await self._download(client, eid, copy_dir / name, expected)
        except OSError as exc:
            raise _failure(ErrorKind.IoError, f"extent {eid}: saving the download: {exc}") from exc
        try:
            ready = await client.get_json(f"/extent/{eid}/repair-ready")
        except RepairClientError as exc:
            raise _failure(
                ErrorKind.RepairRequestError, f"Failed to verify extent is still valid for repair {exc}"
            ) from exc
        if ready is not True:
            raise _failure(
                ErrorKind.RepairRequestError, f"Extent {eid} on remote repair server is in incorrect state"
            )
        self.region.commit_repair(eid)
        log("extent_repaired", extent=eid, source=str(source), bytes=got)

    @staticmethod
    async def _download(client: RepairClient, eid: int, dest: Path, expected: int) -> int:
        """The source's extent file into ``dest`` (new), exactly ``expected`` bytes, synced."""
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:

            async def save(data: bytes) -> None:
                view = memoryview(data)
                while view:  # chunks of at most 1 MiB: a short stall of the loop each
                    view = view[os.write(fd, view) :]

            try:
                got = await client.download(f"/newextent/{eid}/data", save, expected)
            except RepairClientError as exc:
                kind = ErrorKind.RepairStreamError if exc.in_body else ErrorKind.RepairRequestError
                raise _failure(kind, f"extent {eid} data file: {exc}") from exc
            if got != expected:
                raise _failure(
                    ErrorKind.RepairStreamError, f"extent {eid}: got {got} bytes, expected {expected}"
                )
            os.fsync(fd)
            return got
        finally:
            os.close(fd)

    async def _run_ready(self, conn: _Conn) -> None:
        """Run waiting jobs whose dependencies are now done, oldest first, until none is.

        Lossy (the real one's ``--lossy``): a ready job is moved behind the others a quarter of
        the time, to run after them in this same pass."""
        put_back: collections.deque[tuple[int, Message]] = collections.deque()
        while not conn.evicted:
            job = self._next_ready(conn) or (put_back.popleft() if put_back else None)
            if job is None:
                return
            if self.faults.lossy and self._rng.random() < _LOSSY_RATE:
                put_back.append(job)
                continue
            await self._run(conn, *job)

    @staticmethod
    def _next_ready(conn: _Conn) -> tuple[int, Message] | None:
        for i, (job_id, msg) in enumerate(conn.pending):
            if all(d in conn.done for d in _deps(msg)):
                del conn.pending[i]
                if isinstance(msg, m.Write | m.WriteUnwritten):
                    conn.pending_bytes -= len(msg.data)
                return job_id, msg
        return None

    def _injected(self, conn: _Conn, job_id: int, enabled: bool) -> bool:
        if enabled and self._rng.random() < _ERROR_RATE:
            error = CrucibleError(ErrorKind.GenericError, "test error")
            conn.send(m.ErrorReport(conn.upstairs_id, conn.session_id, job_id, error))
            return True
        return False

    async def _run(self, conn: _Conn, job_id: int, msg: Message) -> None:
        """Do one job and send its reply; a success marks it done."""
        if len(conn.done) >= MAX_DONE_SINCE_FLUSH and not isinstance(msg, m.Flush | m.Barrier):
            raise ProtocolError(f"more than {MAX_DONE_SINCE_FLUSH} jobs without a Flush or Barrier")
        if self.faults.lossy and self._rng.random() < _LOSSY_RATE:
            await asyncio.sleep(LOSSY_PAUSE_S)  # lossy: a slow job, as the real one pauses
        u, s = conn.upstairs_id, conn.session_id
        ok = True
        if isinstance(msg, m.Write | m.WriteUnwritten):
            while self._injected(conn, job_id, self.faults.write_errors):
                pass
            error = self._write(
                msg.header.start, msg.data, msg.header.contexts, isinstance(msg, m.WriteUnwritten)
            )
            ack = m.WriteAck if isinstance(msg, m.Write) else m.WriteUnwrittenAck
            conn.send(ack(u, s, job_id, error))
            ok = error is None
        elif isinstance(msg, m.ReadRequest):
            while self._injected(conn, job_id, self.faults.read_errors):
                pass
            try:
                self._check_read_size(msg.count)
                data, contexts = self.region.read(msg.start, msg.count)
            except ExtentFailure as exc:
                log("io_error", job_id=job_id, op="read", error=str(exc))
                conn.send(m.ReadResponse(ReadResponseHeader(u, s, job_id, exc.error), b""))
                ok = False
            else:
                if type(contexts) is not PlainReadContexts:  # a packed one is encoded in bulk
                    contexts = tuple(contexts)
                conn.send(m.ReadResponse(ReadResponseHeader(u, s, job_id, contexts), data))
        elif isinstance(msg, m.Flush):
            while self._injected(conn, job_id, self.faults.flush_errors):
                pass
            error = self._flush(msg)
            conn.send(m.FlushAck(u, s, job_id, error))
            ok = error is None
        elif isinstance(msg, m.Barrier):
            conn.send(m.BarrierAck(u, s, job_id, None))
        elif isinstance(msg, m.ExtentLiveNoOp):
            conn.send(m.ExtentLiveAckId(u, s, job_id, None))
        elif isinstance(msg, _LIVE_REPAIR):
            ok = await self._live_repair(conn, job_id, msg)
        if not ok:
            return
        if isinstance(msg, m.Flush | m.Barrier):
            conn.done.clear()  # as Crucible: later jobs depend on the flush, not on what it covers
        conn.done.add(job_id)

    async def _live_repair(
        self,
        conn: _Conn,
        job_id: int,
        msg: m.ExtentLiveClose | m.ExtentLiveFlushClose | m.ExtentLiveRepair | m.ExtentLiveReopen,
    ) -> bool:
        """One live-repair job (ordered by its dependencies like I/O); True if it succeeded."""
        u, s, eid = conn.upstairs_id, conn.session_id, msg.extent_id
        try:
            if isinstance(msg, m.ExtentLiveClose | m.ExtentLiveFlushClose):
                if isinstance(msg, m.ExtentLiveFlushClose):
                    self.region.flush_one(eid, msg.flush_number, msg.gen_number)
                versions = self.region.close_extent(eid)
                conn.send(m.ExtentLiveCloseAck(u, s, job_id, versions))
            elif isinstance(msg, m.ExtentLiveRepair):
                await self._repair_extent(eid, msg.source_repair_address)
                conn.send(m.ExtentLiveRepairAckId(u, s, job_id, None))
            else:
                self.region.reopen_extent(eid)
                conn.send(m.ExtentLiveAckId(u, s, job_id, None))
        except ExtentFailure as exc:
            log("live_repair_error", op=type(msg).__name__, job_id=job_id, extent=eid, error=str(exc))
            if isinstance(msg, m.ExtentLiveRepair):
                # as the real one: the failure is reported, then this connection ends (the
                # upstairs must start over with this downstairs)
                conn.send(m.ErrorReport(u, s, job_id, exc.error))
                raise _Close(f"live repair of extent {eid} failed") from exc
            # the real one panics here (a bad or closed/open extent); we ack with the error
            if isinstance(msg, m.ExtentLiveClose | m.ExtentLiveFlushClose):
                conn.send(m.ExtentLiveCloseAck(u, s, job_id, exc.error))
            else:
                conn.send(m.ExtentLiveAckId(u, s, job_id, exc.error))
            return False
        log("live_repair", op=type(msg).__name__, job_id=job_id, extent=eid)
        return True

    def _check_read_size(self, count: int) -> None:
        limit = (MAX_FRAME - _READ_RESPONSE_OVERHEAD) // self.region.block_size
        if count > limit:
            raise ExtentFailure(
                CrucibleError(
                    ErrorKind.InvalidNumberOfBlocks,
                    f"a read of {count} blocks exceeds {limit}, a frame's worth",
                )
            )

    def _write(
        self, start: int, data: bytes, contexts: Sequence[BlockContext], only_unwritten: bool
    ) -> CrucibleError | None:
        try:
            self.region.check_range(start, len(contexts))
            self.region.write(start, data, contexts, only_unwritten)
        except ExtentFailure as exc:
            log("io_error", op="write", start=start, blocks=len(contexts), error=str(exc))
            return exc.error
        return None

    def _flush(self, msg: m.Flush) -> CrucibleError | None:
        try:
            if self.read_only and msg.snapshot_details is not None:
                raise ExtentFailure(CrucibleError(ErrorKind.ModifyingReadOnlyRegion))
            self.region.flush(msg.flush_number, msg.gen_number, msg.extent_limit)
        except ExtentFailure as exc:
            log("io_error", op="flush", job_id=msg.job_id, error=str(exc))
            return exc.error
        return None


# -- command line ----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sut.storage.downstairs",
        description="downstairs speaking Crucible's protocol (version 13) over raw extents",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a region (as crucible-downstairs create)")
    create.add_argument("-u", "--uuid", required=True, type=uuid.UUID)
    create.add_argument("-d", "--data", required=True, type=Path)
    create.add_argument("--block-size", type=int, default=512)
    create.add_argument("--extent-size", type=int, default=100, help="blocks per extent")
    create.add_argument("--extent-count", type=int, default=15)
    create.add_argument("--encrypted", action="store_true")
    run = sub.add_parser("run", help="serve an existing region")
    run.add_argument("-d", "--data", required=True, type=Path)
    run.add_argument("-a", "--address", default="127.0.0.1")
    run.add_argument("-p", "--port", type=int, default=9000)
    run.add_argument("--mode", choices=("rw", "ro"), default="rw")
    run.add_argument("--read-errors", action="store_true")
    run.add_argument("--write-errors", action="store_true")
    run.add_argument("--flush-errors", action="store_true")
    run.add_argument(
        "--lossy", action="store_true", help="test flag: reorder ready jobs, pause some (as Crucible)"
    )
    add_limit_flags(run)
    return parser


async def _run(args: argparse.Namespace) -> None:
    read_only = args.mode == "ro"
    region = RawRegion.open(args.data, read_only=read_only)
    limits = limits_from(args)
    faults = FaultConfig(args.read_errors, args.write_errors, args.flush_errors, args.lossy)
    ds = Downstairs(region, read_only=read_only, limits=limits, faults=faults)
    await serve_until_signal(ds, args.address, args.port, log)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "create":
            region = RawRegion.create(
                args.data,
                args.uuid,
                block_size=args.block_size,
                extent_size=args.extent_size,
                extent_count=args.extent_count,
                encrypted=args.encrypted,
            )
            region.close()
            log("created", dir=str(args.data), uuid=str(args.uuid))
            return 0
        asyncio.run(_run(args))
        return 0
    except (ExtentFailure, ValueError, OSError) as exc:
        log("error", error=f"{type(exc).__name__}: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
