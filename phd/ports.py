"""Per-worker loopback port allocation.

Every pytest-xdist worker owns a disjoint range derived from its worker id, so parallel
workers never hand out the same port; within a range a port is only handed out after a
bind probe shows it free (another program may hold it). `PHD_PORT_BASE` moves the whole
block, which lets a nested pytest run (the regression checks) stay clear of its parent.

Crucible-protocol downstairs listen on a second port, their repair server's, at port +
PAIR_OFFSET (4000, fixed by Crucible), and the OTHER downstairs connect to it. So a worker's
range is two blocks: its own ports [start, end) and their partners [start+4000, end+4000);
`allocate_pair()` hands out a port whose partner is free as well and holds both. Ten workers'
blocks (4000 / 400) sit side by side below the partner blocks; workers 10..19 start 8000
higher, and so on, so no worker's partner block ever meets another worker's ports.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Literal

from phd.errors import HarnessError

__all__ = ["PAIR_OFFSET", "PortAllocator", "worker_id", "worker_index"]

# Below Linux's ephemeral range (ip_local_port_range, 32768-60999 by default): a port in that
# range can be taken between our bind probe and its real use by any socket the kernel numbers
# itself - an outgoing connection's local end, a listener on port 0 - and hundreds of those
# open in the hostile-input and interop tests. Seen: Docker failing to publish a downstairs
# on 42422 ("address already in use") while such a test ran on the other worker.
DEFAULT_BASE = 20000
PORTS_PER_WORKER = 400
PAIR_OFFSET = 4000  # Crucible's repair server listens on the downstairs port + 4000
LOOPBACK = "127.0.0.1"


def worker_id() -> str:
    """`gw0`, `gw1`, ... under pytest-xdist, `master` otherwise (xdist's own convention)."""
    return os.environ.get("PYTEST_XDIST_WORKER", "master")


def worker_index() -> int:
    wid = worker_id()
    return int(wid[2:]) if wid.startswith("gw") and wid[2:].isdigit() else 0


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


class PortAllocator:
    """Hands out free loopback ports from this worker's range, round robin."""

    def __init__(self, base: int | None = None, index: int | None = None,
                 size: int = PORTS_PER_WORKER) -> None:
        if base is None:
            base = int(os.environ.get("PHD_PORT_BASE", DEFAULT_BASE))
        if index is None:
            index = worker_index()
        # Workers whose blocks fit below the partner blocks share a group of 2 * PAIR_OFFSET.
        per_group = max(1, PAIR_OFFSET // size)
        self.start = base + (index // per_group) * 2 * PAIR_OFFSET + (index % per_group) * size
        self.end = self.start + size
        if self.end > 65535:
            raise HarnessError(f"port range {self.start}..{self.end} exceeds 65535: lower PHD_PORT_BASE")
        self._next = self.start
        self._given: set[int] = set()
        self._partners: dict[int, int] = {}  # port -> its partner, for pairs
        self._lock = threading.Lock()

    @property
    def partner_range(self) -> range:
        """Where the partners of `allocate_pair()` come from: this worker's ports + 4000."""
        return range(self.start + PAIR_OFFSET, self.end + PAIR_OFFSET)

    def allocate(self) -> int:
        with self._lock:
            for _ in range(self.end - self.start):
                port = self._next
                self._next = self.start + (self._next + 1 - self.start) % (self.end - self.start)
                if port in self._given or not _port_is_free(port):
                    continue
                self._given.add(port)
                return port
        raise HarnessError(
            f"no free loopback port in {self.start}..{self.end - 1}; release ports or set PHD_PORT_BASE"
        )

    def allocate_pair(self) -> int:
        """A port p whose partner p + 4000 (a Crucible downstairs' repair port) is free too;
        both are held until `release(p)`. The partner lies in this worker's partner block, so
        parallel workers never hand out the same one."""
        if self.end + PAIR_OFFSET > 65536:
            raise HarnessError(f"partner ports {self.start + PAIR_OFFSET}..{self.end + PAIR_OFFSET - 1} "
                               "exceed 65535: lower PHD_PORT_BASE")
        with self._lock:
            for _ in range(self.end - self.start):
                port = self._next
                self._next = self.start + (self._next + 1 - self.start) % (self.end - self.start)
                partner = port + PAIR_OFFSET
                if port in self._given or partner in self._given:
                    continue
                if not _port_is_free(port) or not _port_is_free(partner):
                    continue
                self._given.update((port, partner))
                self._partners[port] = partner
                return port
        raise HarnessError(
            f"no free loopback port pair (p, p+{PAIR_OFFSET}) with p in {self.start}..{self.end - 1}; "
            "release ports or set PHD_PORT_BASE"
        )

    def release(self, port: int) -> None:
        """Give a port back (with its partner, when it came from `allocate_pair`)."""
        with self._lock:
            self._given.discard(port)
            partner = self._partners.pop(port, None)
            if partner is not None:
                self._given.discard(partner)

    def black_hole(self, kind: BlackHoleKind = "refused") -> BlackHole:
        """A loopback address where nothing answers (see BlackHole for the two kinds)."""
        return BlackHole(self, kind)


BlackHoleKind = Literal["refused", "silent"]
BLACK_HOLE_KINDS: tuple[BlackHoleKind, ...] = ("refused", "silent")


class BlackHole:
    """A loopback address where no downstairs answers, held for the whole test so no other
    process can start answering there.

    - "refused": the port is bound but not listening, so a connect is refused at once.
    - "silent": the port listens but never accepts or reads: the kernel completes the TCP
      handshake, then nothing ever answers (a hung peer; the client's own timeout must act).
    """

    def __init__(self, allocator: PortAllocator, kind: BlackHoleKind = "refused") -> None:
        if kind not in BLACK_HOLE_KINDS:
            raise HarnessError(f"black hole kind must be one of {BLACK_HOLE_KINDS}, got {kind!r}")
        self._allocator = allocator
        self.kind = kind
        self.port = allocator.allocate()
        self._sock: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._sock.bind((LOOPBACK, self.port))
            if kind == "silent":
                self._sock.listen(64)
        except OSError:
            self.close()
            raise

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._allocator.release(self.port)
