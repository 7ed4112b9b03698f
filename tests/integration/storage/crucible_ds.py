"""Crucible-protocol downstairs processes for tests: the REAL ``crucible-downstairs`` and ours
(``python -m sut.storage.downstairs``), behind one interface, plus a raw upstairs-side
``Peer`` that speaks only through our codec (sut.storage.wire).

The real binary is looked up at ``$PHD_DOWNSTAIRS_BINARY``, else ``<repo>/../shared/crucible/
crucible-downstairs``; tests that need it are marked ``needs_binary`` and skip without it.
Never send the real one a Write with a wrong block hash: it never answers and logs in a tight
loop (crucible-wire.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sut.storage import wire
from sut.storage.wire import messages as m
from tests.unit.storage.test_wire import ORACLE_REGION, ORACLE_SESSION, ORACLE_UPSTAIRS, SENT_FRAMES

REPO = Path(__file__).resolve().parents[3]
BINARY = Path(os.environ.get("PHD_DOWNSTAIRS_BINARY") or REPO.parent / "shared/crucible/crucible-downstairs")
BLOCK_SIZE = 512
EXTENT_SIZE = 64  # blocks per extent
EXTENT_COUNT = 4
START_TIMEOUT_S = 20.0
REPLY_TIMEOUT_S = 10.0

HAVE_BINARY = BINARY.is_file() and os.access(BINARY, os.X_OK)
needs_binary = pytest.mark.skipif(
    not HAVE_BINARY,
    reason=(
        f"no real crucible-downstairs at {BINARY}: build it from oxidecomputer/crucible commit "
        "6d037cb60304413302e3f3658e4850980cee77b0 (cargo build --release -p crucible-downstairs; "
        "needs libsqlite3) and set PHD_DOWNSTAIRS_BINARY to it, or place it at "
        "<repo>/../shared/crucible/crucible-downstairs"
    ),
)


@dataclass
class CrucibleDownstairs:
    """One downstairs ``run`` on 127.0.0.1:port over ``root/region`` (repair port = port + 4000;
    ``start`` returns once both listen).

    A context manager: exit kills the process (if any) and always removes ``root``.
    """

    root: Path
    flags: tuple[str, ...] = ()  # extra `run` flags, e.g. ("--write-errors",)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    log_path: Path = field(init=False)
    kind: str = "?"

    def __post_init__(self) -> None:
        self.log_path = self.root / "downstairs.log"

    def __enter__(self) -> CrucibleDownstairs:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def region_dir(self) -> Path:
        return self.root / "region"

    # the command line: overridden per implementation
    def argv(self) -> list[str]:
        raise NotImplementedError

    def create(
        self,
        region_id: uuid.UUID,
        *,
        extent_size: int = EXTENT_SIZE,
        extent_count: int = EXTENT_COUNT,
        encrypted: bool = False,
    ) -> None:
        done = subprocess.run(
            [
                *self.argv(),
                "create",
                "-u",
                str(region_id),
                "-d",
                str(self.region_dir),
                "--block-size",
                str(BLOCK_SIZE),
                "--extent-size",
                str(extent_size),
                "--extent-count",
                str(extent_count),
                *(("--encrypted",) if encrypted else ()),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
            cwd=REPO,
        )
        if done.returncode:
            raise AssertionError(
                f"{self.kind} create exited {done.returncode}: "
                f"{done.stdout[-2000:]!r} {done.stderr[-2000:]!r}"
            )

    def start(self) -> None:
        """Start on a port whose +4000 is free too; a lost race for a port is retried."""
        for _attempt in range(5):
            self.port = port_pair()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [
                        *self.argv(),
                        "run",
                        "-d",
                        str(self.region_dir),
                        "-a",
                        "127.0.0.1",
                        "-p",
                        str(self.port),
                        *self.flags,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                )
            if self._wait_listening(self.port) and self._wait_listening(
                self.port + wire.negotiation.REPAIR_PORT_OFFSET
            ):
                return
        raise AssertionError(f"{self.kind} downstairs never listened; log tail:\n{self.log_tail()}")

    def _wait_listening(self, port: int | None = None) -> bool:
        """Poll a connect to ``port`` (default: the downstairs'; then its repair server's) until
        it succeeds (True), the process exits (False) or the deadline."""
        assert self.proc is not None
        port = self.port if port is None else port
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
            try:
                self.proc.wait(timeout=0.02)  # the pause between connect attempts; ends early if it died
            except subprocess.TimeoutExpired:
                continue
            return False
        self.stop()
        raise AssertionError(
            f"{self.kind} downstairs not listening after {START_TIMEOUT_S}s:\n{self.log_tail()}"
        )

    def wait_for_log(self, text: str, timeout_s: float = REPLY_TIMEOUT_S) -> None:
        """Poll the log until ``text`` appears (the real one's logger is asynchronous)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while text not in self.log_path.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout_s}s:\n{self.log_tail()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0.02)  # the pause between polls

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def connect(self) -> Peer:
        return Peer(socket.create_connection(("127.0.0.1", self.port), timeout=REPLY_TIMEOUT_S), self)

    @property
    def repair_addr(self) -> wire.SocketAddr:
        return wire.SocketAddr.parse("127.0.0.1", self.port + wire.negotiation.REPAIR_PORT_OFFSET)


@dataclass
class RealDownstairs(CrucibleDownstairs):
    """Crucible's own ``crucible-downstairs``."""

    kind: str = "real"

    def argv(self) -> list[str]:
        return [str(BINARY)]


@dataclass
class OurDownstairs(CrucibleDownstairs):
    """``python -m sut.storage.downstairs``: ours, speaking Crucible's protocol."""

    kind: str = "ours"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "sut.storage.downstairs"]


KINDS: dict[str, type[CrucibleDownstairs]] = {"real": RealDownstairs, "ours": OurDownstairs}


def start_downstairs(
    where: Path, kind: str, flags: tuple[str, ...] = (), region: uuid.UUID = ORACLE_REGION
) -> CrucibleDownstairs:
    """A started downstairs of ``kind`` ("real" or "ours") over a new region in a fresh
    directory below ``where``; removed again if it does not start."""
    root = Path(tempfile.mkdtemp(prefix=f"{kind}-ds-", dir=where))
    ds = KINDS[kind](root, flags=flags)
    try:
        ds.create(region)
        ds.start()
    except BaseException:
        ds.__exit__(None, None, None)
        raise
    return ds


def port_pair() -> int:
    """A free loopback port p with p + 4000 free as well (the repair server's port)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port + wire.negotiation.REPAIR_PORT_OFFSET > 0xFFFF:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + wire.negotiation.REPAIR_PORT_OFFSET))
                except OSError:
                    continue
                return int(port)
    raise AssertionError("no free loopback port pair")


class Peer:
    """A raw upstairs-side connection that speaks only through our codec."""

    def __init__(self, sock: socket.socket, ds: CrucibleDownstairs) -> None:
        self.sock = sock
        self.ds = ds
        self.splitter = wire.FrameSplitter(wire.MAX_FRAME)
        self.buf = bytearray()
        self.received: list[bytes] = []  # every frame, raw

    def send(self, msg: wire.Message) -> bytes:
        head, data = wire.encode_parts(msg)
        self.sock.sendall(head)
        if data:
            self.sock.sendall(data)
        return head + data

    def recv_frame(self, timeout_s: float = REPLY_TIMEOUT_S) -> bytes | None:
        """The next whole frame; None if the downstairs closed the connection between frames."""
        deadline = time.monotonic() + timeout_s
        while True:
            with memoryview(self.buf) as view:
                known = self.splitter(view)
            if known is not None and len(self.buf) >= sum(known):
                frame = bytes(self.buf[: sum(known)])
                del self.buf[: sum(known)]
                self.received.append(frame)
                return frame
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no reply within {timeout_s}s; {self.ds.kind} downstairs log:\n{self.ds.log_tail()}"
                )
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert not self.buf, f"connection closed mid-frame after {len(self.buf)} bytes"
                return None
            self.buf += chunk

    def recv(self, timeout_s: float = REPLY_TIMEOUT_S) -> wire.Message:
        frame = self.recv_frame(timeout_s)
        if frame is None:
            raise AssertionError(
                f"{self.ds.kind} downstairs closed the connection; log:\n{self.ds.log_tail()}"
            )
        return wire.decode(frame)

    def expect_closed(self) -> None:
        frame = self.recv_frame()
        assert frame is None, f"expected the connection to close, got {wire.decode(frame)}"

    def close(self) -> None:
        self.sock.close()


HELLO = m.HereIAm(wire.MESSAGE_VERSION, ORACLE_UPSTAIRS, ORACLE_SESSION, 1, False, False, ())


def hello(**overrides: object) -> m.HereIAm:
    return dataclasses.replace(HELLO, **overrides)  # type: ignore[arg-type]


@contextlib.contextmanager
def negotiated(ds: CrucibleDownstairs, *args: Any, **kwargs: Any) -> Iterator[Peer]:
    """:func:`negotiate` (same arguments), as a context manager that closes the connection."""
    peer, _ = negotiate(ds, *args, **kwargs)
    try:
        yield peer
    finally:
        peer.close()


def negotiate(
    ds: CrucibleDownstairs,
    upstairs: uuid.UUID = ORACLE_UPSTAIRS,
    session: uuid.UUID = ORACLE_SESSION,
    generation: int = 1,
    *,
    read_only: bool = False,
    encrypted: bool = False,
) -> tuple[Peer, m.ExtentVersions]:
    """HereIAm .. ExtentVersions: the connection is then ready for I/O."""
    peer = ds.connect()
    try:
        peer.send(
            hello(
                upstairs_id=upstairs,
                session_id=session,
                generation=generation,
                read_only=read_only,
                encrypted=encrypted,
            )
        )
        assert isinstance(peer.recv(), m.YesItsMe)
        peer.send(m.PromoteToActive(upstairs, session, generation))
        assert peer.recv() == m.YouAreNowActive(upstairs, session, generation)
        peer.send(m.RegionInfoPlease())
        assert isinstance(peer.recv(), m.RegionInfo)
        peer.send(m.ExtentVersionsPlease())
        versions = peer.recv()
        assert isinstance(versions, m.ExtentVersions)
    except BaseException:
        peer.close()
        raise
    return peer, versions


# -- malformed frames (shared by the oracle and the conformance tests) -------------------------
def refit(frame: bytes | bytearray) -> bytes:
    """``frame`` with its length prefix set to its length."""
    out = bytearray(frame)
    struct.pack_into("<I", out, 0, len(out))
    return bytes(out)


def _here_i_am_with(offset: int, value: bytes) -> bytes:
    frame = bytearray(SENT_FRAMES["HereIAm"])
    frame[offset : offset + len(value)] = value
    return bytes(frame)


# (frame, what the real downstairs does with it before negotiation)
PRE_NEGOTIATION_CASES = {
    "bool-2": (_here_i_am_with(68, b"\x02"), "closes"),
    "uuid-length-15": (_here_i_am_with(12, b"\x0f"), "closes"),
    "alternates-2^60": (_here_i_am_with(70, (1 << 60).to_bytes(8, "little")), "closes"),
    "variant-42": (struct.pack("<II", 8, 42), "closes"),
    "above-100MiB": (struct.pack("<II", wire.MAX_FRAME + 1, 0), "closes"),
    # bincode's deserialize ignores what follows a message: the real one ACCEPTS this
    "trailing-byte": (refit(SENT_FRAMES["HereIAm"] + b"\x00"), "answers"),
    # a length prefix below 4: the real downstairs panics and the whole process aborts
    "length-0": (struct.pack("<I", 0) + bytes(12), "dies"),
    "length-3": (struct.pack("<I", 3) + bytes(12), "dies"),
}


# -- the repair HTTP server (port + 4000) ---------------------------------------------------------
@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def repair_get(ds: CrucibleDownstairs, path: str, method: str = "GET") -> HttpAnswer:
    """One request to ``ds``'s repair server, the path sent exactly as given."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", ds.port + wire.negotiation.REPAIR_PORT_OFFSET, timeout=REPLY_TIMEOUT_S
    )
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read()
        return HttpAnswer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


def exchange(peer: Peer, msg: wire.Message) -> wire.Message:
    """Send ``msg`` and return the next reply."""
    peer.send(msg)
    return peer.recv()


def region_snapshot(
    ds: CrucibleDownstairs, generation: int, upstairs: uuid.UUID, session: uuid.UUID, blocks: int
) -> tuple[m.ExtentVersions, m.ReadResponse]:
    """A new upstairs (taking over at ``generation``): its ExtentVersions and a read of the
    first ``blocks`` blocks (data and contexts)."""
    peer, versions = negotiate(ds, upstairs, session, generation)
    try:
        peer.send(m.ReadRequest(upstairs, session, 1, (), 0, blocks))
        read = peer.recv()
        assert isinstance(read, m.ReadResponse), read
        return versions, read
    finally:
        peer.close()
