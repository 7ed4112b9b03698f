"""The downstairs: serves one region over TCP to (at most one active) upstairs.

CONTRACT command line (flags follow crucible-downstairs):
  python -m sut.storage.downstairs create -u UUID -d DIR --block-size B --extent-size BLOCKS
                                          --extent-count N [--encrypted]
  python -m sut.storage.downstairs run -d DIR -a ADDR -p PORT [--mode rw|ro] [--lossy]
                                       [--read-errors] [--write-errors] [--flush-errors]
                                       [--handshake-timeout S] [--max-connections N]

Generation arbitration at a read-write downstairs: one active upstairs. A lower generation is
refused; an equal generation only for the same session; a higher generation takes over and
the old upstairs is told ``YouAreNoLongerActive`` and disconnected.
Logs are JSON lines on stderr. SIGTERM/SIGINT stop the server cleanly (exit 0).

Anyone who can connect is a stranger until negotiated: frames are capped at 64 KiB, the
handshake must complete within ``--handshake-timeout`` seconds and at most
``--max-connections`` connections are open at once (sut.storage.stream). Every field of a job
is checked before it is used; a job out of range gets an error reply and the connection
serves on; a connection that breaks the protocol is closed with a ``protocol_error`` line;
anything unexpected is one ``connection_error`` line, never a traceback.
STDLIB ONLY: this runs in a minimal container with Debian's python3.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sut.storage.errors import ProtocolError
from sut.storage.protocol import (
    MAX_IO_BYTES,
    PROTOCOL_VERSION,
    BatchedWriter,
    FrameReader,
    Message,
    active_frame_limit,
    encode,
    read_message,
    start_server,
    write_message,
)
from sut.storage.region import Region, RegionError
from sut.storage.service import JsonLog, add_limit_flags, limits_from, serve_until_signal
from sut.storage.stream import ConnectionGuard, ConnectionLimits

__all__ = ["ConnectionLimits", "Downstairs", "FaultConfig", "main"]

# Probability of an injected failure per operation when an --*-errors flag is on. Small
# enough that an upstairs with three copies keeps working, large enough to show up quickly.
_ERROR_RATE = 0.05
_LOSSY_MAX_DELAY_S = 0.02
# Messages whose payload is only written to the region (its buffer can be reused at once).
_WRITES = frozenset({"Write", "WriteUnwritten", "ExtentPut"})
_U64 = 1 << 64
_MAX_ID = 128  # characters of an upstairs / session id


log = JsonLog("downstairs")


@dataclass(frozen=True)
class FaultConfig:
    lossy: bool = False
    read_errors: bool = False
    write_errors: bool = False
    flush_errors: bool = False


@dataclass
class _Session:
    upstairs_id: str
    session_id: str
    gen: int
    writer: asyncio.StreamWriter


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


class BadJob(Exception):
    """A job's field is missing, mistyped or out of range: the job gets an error reply."""


def _uint(msg: Message, name: str, limit: int = _U64, error: type[Exception] = BadJob) -> int:
    """Field ``name`` of ``msg`` as an integer in ``0..limit-1``, else ``error`` naming it."""
    value = msg.get(name)
    if type(value) is not int or not 0 <= value < limit:
        raise error(f"{msg.kind}.{name} must be an integer in 0..{limit - 1}, got {_short(value)}")
    return value


def _int_field(msg: Message, name: str) -> int:
    # A peer-supplied value that is not an integer must end the connection as a protocol
    # error (logged, connection closed), not escape as a ValueError traceback.
    return _uint(msg, name, error=ProtocolError)


def _id_field(msg: Message, name: str) -> str:
    # ids are logged and echoed: a short string (a UUID in practice), not any JSON value
    value = msg[name]
    if type(value) is not str or not 0 < len(value) <= _MAX_ID:
        raise ProtocolError(
            f"{msg.kind}.{name} must be a string of 1..{_MAX_ID} characters, got {_short(value)}"
        )
    return value



class Downstairs:
    """Serve ``region``; one instance per process (owns its listening socket)."""

    def __init__(
        self, region: Region, *, read_only: bool, faults: FaultConfig, limits: ConnectionLimits | None = None
    ) -> None:
        self.region = region
        self.read_only = read_only
        self.faults = faults
        self.limits = limits or ConnectionLimits()
        self._active: _Session | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._rng = random.Random()

    async def start(self, address: str, port: int) -> int:
        guard = ConnectionGuard(self.limits, log)
        self._server = await start_server(self._handle, address, port, guard=guard)
        bound = int(self._server.sockets[0].getsockname()[1])
        log(
            "listening",
            address=address,
            port=bound,
            uuid=self.region.info.uuid,
            mode="ro" if self.read_only else "rw",
            max_connections=self.limits.max_connections,
            handshake_timeout_s=self.limits.handshake_timeout_s,
            max_frame_bytes=active_frame_limit(self.region.info.extent_bytes),
        )
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()
        self.region.close()

    # -- connection handling ---------------------------------------------------------------
    async def _handle(self, reader: FrameReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self._writers.add(writer)
        session: _Session | None = None
        try:
            session = await self._negotiate(reader, writer, peer)
            if session is not None:
                await self._serve(reader, writer, session)
        except ProtocolError as exc:
            log("protocol_error", peer=peer, reason=str(exc))
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log("connection_lost", peer=peer, reason=repr(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must cost one connection, not a traceback
            log("connection_error", peer=peer, error=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            if session is not None and self._active is session:
                self._active = None
                log("deactivated", upstairs_id=session.upstairs_id, reason="disconnected")
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _send(self, writer: asyncio.StreamWriter, msg: Message) -> None:
        write_message(writer, msg)
        await writer.drain()

    async def _expect(self, reader: FrameReader, kind: str) -> Message:
        msg = await read_message(reader)
        if msg is None:
            raise ConnectionError(f"peer closed while we waited for {kind}")
        if msg.kind != kind:
            raise ProtocolError(f"expected {kind}, got {msg.kind}")
        return msg

    async def _negotiate(
        self, reader: FrameReader, writer: asyncio.StreamWriter, peer: object
    ) -> _Session | None:
        hello = await self._expect(reader, "HereIAm")
        info = self.region.info
        if hello["version"] != PROTOCOL_VERSION:
            await self._send(writer, Message("VersionMismatch", {"version": PROTOCOL_VERSION}))
            log("refused", peer=peer, reason=f"version {_short(hello['version'])}")
            return None
        if bool(hello["read_only"]) != self.read_only:
            await self._send(writer, Message("ReadOnlyMismatch", {"expected": self.read_only}))
            log("refused", peer=peer, reason="read-only mismatch")
            return None
        if bool(hello["encrypted"]) != info.encrypted:
            await self._send(writer, Message("EncryptedMismatch", {"expected": info.encrypted}))
            log("refused", peer=peer, reason="encryption mismatch")
            return None
        await self._send(writer, Message("YesItsMe", {"version": PROTOCOL_VERSION}))
        promote = await self._expect(reader, "PromoteToActive")
        session = _Session(
            _id_field(promote, "upstairs_id"),
            _id_field(promote, "session_id"),
            _int_field(promote, "gen"),
            writer,
        )
        refusal = self._arbitrate(session)
        if refusal is not None:
            await self._send(writer, Message("PromoteRefused", {"reason": refusal}))
            log("promote_refused", peer=peer, gen=session.gen, reason=refusal)
            return None
        # negotiated: no deadline any more, and frames up to the largest legitimate one (set
        # before the reply, so nothing the upstairs sends after it meets the handshake cap)
        reader.negotiated(active_frame_limit(info.extent_bytes))
        await self._send(
            writer,
            Message(
                "YouAreNowActive",
                {"upstairs_id": session.upstairs_id, "session_id": session.session_id, "gen": session.gen},
            ),
        )
        log("active", peer=peer, upstairs_id=session.upstairs_id, gen=session.gen)
        return session

    def _arbitrate(self, new: _Session) -> str | None:
        """Decide whether ``new`` may become active; evict the old session on takeover."""
        if self.read_only:
            return None  # any number of read-only upstairs may read
        old = self._active
        if old is not None:
            if new.gen < old.gen:
                return f"generation {new.gen} is lower than the active generation {old.gen}"
            if new.gen == old.gen and (new.upstairs_id, new.session_id) != (old.upstairs_id, old.session_id):
                return f"generation {new.gen} is already active for another session"
            if (new.upstairs_id, new.session_id) == (old.upstairs_id, old.session_id):
                # the same upstairs reconnecting (it gave up on the old connection): not a
                # takeover, just drop the stale connection
                old.writer.close()
                log("reconnected", gen=new.gen, session_id=new.session_id)
                self._active = new
                return None
            # takeover: tell the old upstairs, then drop its connection
            with contextlib.suppress(ConnectionError, ProtocolError):
                old.writer.write(
                    encode(
                        Message(
                            "YouAreNoLongerActive",
                            {
                                "new_upstairs_id": new.upstairs_id,
                                "new_session_id": new.session_id,
                                "new_gen": new.gen,
                            },
                        )
                    )
                )
            old.writer.close()
            log("taken_over", old_gen=old.gen, new_gen=new.gen)
        self._active = new
        return None

    async def _serve(
        self, reader: FrameReader, writer: asyncio.StreamWriter, session: _Session
    ) -> None:
        # Replies to requests that arrived together are sent together (one writev()); each
        # reply is queued only after its operation is done (e.g. fsync before FlushAck).
        out = BatchedWriter(writer)
        try:
            while True:
                msg = await read_message(reader)
                if msg is None:
                    return
                if self.faults.lossy:
                    await asyncio.sleep(self._rng.uniform(0, _LOSSY_MAX_DELAY_S))  # injected latency
                # checked after every await: once another session is active this connection
                # may do no more I/O (a stale write executed late would corrupt the region)
                if not self.read_only and self._active is not session:
                    return  # taken over: this connection may do no more I/O
                reply = await self._dispatch(msg)
                if msg.kind in _WRITES:
                    reader.recycle(msg.payload)  # it is in the extent file now; nobody holds it
                if reply is not None:
                    out.write_message(reply)
                    await writer.drain()  # backpressure for what earlier flushes handed over
        finally:
            out.flush()  # replies to completed operations still go out if the socket is open

    async def _dispatch(self, msg: Message) -> Message | None:
        kind = msg.kind
        info = self.region.info
        if kind == "Ruok":
            return Message("Imok")
        if kind == "RegionInfoPlease":
            return Message(
                "RegionInfo",
                {
                    "block_size": info.block_size,
                    "extent_size": info.extent_size,
                    "extent_count": info.extent_count,
                    "uuid": info.uuid,
                    "encrypted": info.encrypted,
                },
            )
        if kind == "ExtentVersionsPlease":
            gens, flushes, dirty = self.region.versions()
            return Message("ExtentVersions", {"gen": gens, "flush": flushes, "dirty": dirty})
        job = msg.get("job_id")
        try:
            return self._io(msg, job)
        except (BadJob, RegionError, OSError, KeyError, TypeError, ValueError) as exc:
            log("io_error", kind=kind, job_id=job, error=str(exc)[:300])
            reply_kind = {
                "Read": "ReadResponse",
                "Flush": "FlushAck",
                "ExtentFetch": "ExtentData",
                "ExtentPut": "ExtentPutAck",
            }.get(kind, "WriteAck")
            fields: dict[str, Any] = {"job_id": job, "error": str(exc)}
            if reply_kind == "ReadResponse":
                fields["written"] = ""
            if reply_kind == "ExtentData":
                fields.update(eid=msg.get("eid"), gen=0, flush=0, dirty=False, written="")
            return Message(reply_kind, fields)

    def _inject(self, enabled: bool, what: str) -> None:
        if enabled and self._rng.random() < _ERROR_RATE:
            raise RegionError(f"injected {what} error")

    def _eid(self, msg: Message) -> int:
        eid = msg.get("eid")
        if type(eid) is not int:
            raise BadJob(f"{msg.kind}.eid must be an integer, got {_short(eid)}")
        count = self.region.info.extent_count
        if not 0 <= eid < count:
            raise BadJob(f"extent {_short(eid)} does not exist (0..{count - 1})")
        return eid

    def _io(self, msg: Message, job: object) -> Message:
        # Every field is checked here, before anything uses it (no int() of whatever came:
        # "3", 1.5 and True are not block numbers); the region checks ranges again.
        kind = msg.kind
        if kind == "Read":
            block = _uint(msg, "block")
            count = _uint(msg, "count")
            if count * self.region.info.block_size > MAX_IO_BYTES:
                raise BadJob(f"Read.count {count} blocks is over the largest read ({MAX_IO_BYTES} bytes)")
            self._inject(self.faults.read_errors, "read")
            data, bits = self.region.read_bits(block, count)
            return Message("ReadResponse", {"job_id": job, "error": None, "written": bits}, data)
        if kind in ("Write", "WriteUnwritten"):
            block = _uint(msg, "block")
            if self.read_only:
                raise RegionError("this downstairs is read-only")
            self._inject(self.faults.write_errors, "write")
            self.region.write(block, msg.payload, only_unwritten=kind == "WriteUnwritten")
            return Message("WriteAck", {"job_id": job, "error": None})
        if kind == "Flush":
            flush_number, gen = _uint(msg, "flush_number"), _uint(msg, "gen")
            limit = None if msg.get("extent_limit") is None else _uint(
                msg, "extent_limit", self.region.info.extent_count + 1
            )
            self._inject(self.faults.flush_errors, "flush")
            if not self.read_only:
                self.region.flush(flush_number, gen, limit)
            return Message("FlushAck", {"job_id": job, "error": None})
        if kind == "ExtentFetch":
            eid = self._eid(msg)
            meta = self.region.meta(eid)
            return Message(
                "ExtentData",
                {
                    "job_id": job,
                    "error": None,
                    "eid": eid,
                    "gen": meta.gen,
                    "flush": meta.flush,
                    "dirty": meta.dirty,
                    "written": meta.written.hex(),
                },
                self.region.extent_data(eid),
            )
        if kind == "ExtentPut":
            eid = self._eid(msg)
            gen, flush = _uint(msg, "gen"), _uint(msg, "flush")
            written, dirty = msg.get("written"), msg.get("dirty", False)
            bitmap_hex = 2 * len(self.region.meta(eid).written)
            if type(written) is not str or len(written) != bitmap_hex:
                raise BadJob(f"ExtentPut.written must be {bitmap_hex} hex digits, got {_short(written)}")
            try:
                bitmap = bytes.fromhex(written)
            except ValueError:
                raise BadJob(f"ExtentPut.written must be hex digits, got {_short(written)}") from None
            if type(dirty) is not bool:
                raise BadJob(f"ExtentPut.dirty must be true or false, got {_short(dirty)}")
            if self.read_only:
                raise RegionError("this downstairs is read-only")
            self.region.put_extent(eid, msg.payload, gen=gen, flush=flush, written=bitmap, dirty=dirty)
            return Message("ExtentPutAck", {"job_id": job, "error": None})
        raise ProtocolError(f"unexpected message {kind} on an active connection")


# -- command line ----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sut.storage.downstairs", description="Crucible-style downstairs (reference SUT)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a new region in an empty directory")
    create.add_argument("-u", "--uuid", required=True)
    create.add_argument("-d", "--data", required=True, type=Path)
    create.add_argument("--block-size", type=int, default=512)
    create.add_argument("--extent-size", type=int, required=True, help="blocks per extent")
    create.add_argument("--extent-count", type=int, required=True)
    create.add_argument("--encrypted", action="store_true")
    run = sub.add_parser("run", help="serve an existing region")
    run.add_argument("-d", "--data", required=True, type=Path)
    run.add_argument("-a", "--address", default="127.0.0.1")
    run.add_argument("-p", "--port", type=int, required=True, help="TCP port (0 = any free)")
    run.add_argument("--mode", choices=("rw", "ro"), default="rw")
    run.add_argument("--lossy", action="store_true")
    run.add_argument("--read-errors", action="store_true")
    run.add_argument("--write-errors", action="store_true")
    run.add_argument("--flush-errors", action="store_true")
    add_limit_flags(run)
    return parser



async def _run(args: argparse.Namespace) -> None:
    region = Region.open(args.data)
    faults = FaultConfig(args.lossy, args.read_errors, args.write_errors, args.flush_errors)
    limits = limits_from(args)
    ds = Downstairs(region, read_only=args.mode == "ro", faults=faults, limits=limits)
    await serve_until_signal(ds, args.address, args.port, log)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "create":
            region = Region.create(
                args.data,
                region_uuid=args.uuid,
                block_size=args.block_size,
                extent_size=args.extent_size,
                extent_count=args.extent_count,
                encrypted=args.encrypted,
            )
            log("created", dir=str(args.data), uuid=region.info.uuid)
            region.close()
            return 0
        asyncio.run(_run(args))
        return 0
    except RegionError as exc:
        log("error", error=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        log("error", error=str(exc))
        print(f"error: {exc} (is the address/port free and the directory writable?)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
