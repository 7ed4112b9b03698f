"""Loopback port allocation, disjoint between pytest sessions and between their workers.

Every allocating process (a pytest run, or each of its pytest-xdist workers) owns a *slot*: a
block of PORTS_PER_WORKER ports. Within it a port is only handed out after a bind probe shows
it free (another program may hold it).

Slots are claimed, not assumed: a claim is an exclusive `flock` on `slot-<k>.lock` in a lock
directory every session on the machine shares (`PHD_PORT_LOCK_DIR`, default
/tmp/phd-ports - a fixed path on purpose, since nested runs move TMPDIR), held for the life of
the allocator. So two sessions started independently never share a slot, nor do two workers
of one session, and the claims of a session that was killed (SIGKILL, OOM) vanish with its
processes - the kernel drops their locks - so its slots are free again with nothing to clean
up. A process tries the slot of its worker index first (gw3 -> slot 3), so a lone session is
laid out as it always was; a slot another session holds is skipped. The lock file names its
holder (pid, worker, owner) for the error when every slot is taken.

`PHD_PORT_BASE=B` (or `PortAllocator(base=B)`) is the explicit override: no claim, the worker's
block is derived from B and its worker index alone, and whoever sets it keeps concurrent runs
apart.

Crucible-protocol downstairs listen on a second port, their repair server's, at port +
PAIR_OFFSET (4000, fixed by Crucible), and the OTHER downstairs connect to it. So a slot is two
blocks: its own ports [start, end) and their partners [start+4000, end+4000);
`allocate_pair()` hands out a port whose partner is free as well and holds both. Ten slots'
blocks (4000 / 400) sit side by side below their partner blocks in a group of 8000 ports, so
no slot's partner block ever meets another slot's ports.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import threading
import weakref
from pathlib import Path
from types import TracebackType
from typing import Literal

from phd.core.errors import HarnessError

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
SLOTS_PER_GROUP = PAIR_OFFSET // PORTS_PER_WORKER
# Where claimed slots lie: a group of ten slots (ports, then their partners) at each base, all
# below the ephemeral range. 20000 first: a lone session uses the ports it always did.
SLOT_GROUP_BASES = (DEFAULT_BASE, DEFAULT_BASE - 2 * PAIR_OFFSET)
SLOT_COUNT = SLOTS_PER_GROUP * len(SLOT_GROUP_BASES)
DEFAULT_LOCK_DIR = Path("/tmp/phd-ports")  # fixed: the rendezvous of every session here


def worker_id() -> str:
    """`gw0`, `gw1`, ... under pytest-xdist, `master` otherwise (xdist's own convention)."""
    return os.environ.get("PYTEST_XDIST_WORKER", "master")


def worker_index() -> int:
    wid = worker_id()
    return int(wid[2:]) if wid.startswith("gw") and wid[2:].isdigit() else 0


def slot_start(slot: int) -> int:
    """The first port of claimable slot `slot` (0 <= slot < SLOT_COUNT)."""
    group, within = divmod(slot, SLOTS_PER_GROUP)
    return SLOT_GROUP_BASES[group] + within * PORTS_PER_WORKER


def lock_dir_from_env() -> Path:
    return Path(os.environ.get("PHD_PORT_LOCK_DIR") or DEFAULT_LOCK_DIR)


class SlotClaim:
    """An exclusive claim on one slot: an flock held until `release()` (or the process ends)."""

    def __init__(self, slot: int, fd: int, path: Path) -> None:
        self.slot = slot
        self.path = path
        # Closing the descriptor drops the lock. A finalizer, so that an allocator dropped
        # without close() does not hold its slot until the process ends.
        self._finalizer = weakref.finalize(self, os.close, fd)

    @classmethod
    def acquire(cls, lock_dir: Path, preferred: int, owner: str = "") -> SlotClaim:
        """The first free slot from `preferred` on (wrapping); HarnessError naming the holders
        when every slot is claimed."""
        _make_shared_dir(lock_dir)
        for k in range(SLOT_COUNT):
            slot = (preferred + k) % SLOT_COUNT
            path = lock_dir / f"slot-{slot}.lock"
            fd = _open_lock_file(path)
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    continue  # another live process holds it
                raise HarnessError(f"cannot lock {path}: {exc}") from exc
            _write_holder(fd, owner)
            return cls(slot, fd, path)
        holders = "; ".join(f"slot {k}: {_holder(lock_dir / f'slot-{k}.lock')}" for k in range(SLOT_COUNT))
        raise HarnessError(
            f"all {SLOT_COUNT} loopback port slots are claimed by live processes ({holders}); "
            f"end some of those runs, or set PHD_PORT_BASE to a block you keep free yourself")

    @property
    def held(self) -> bool:
        return self._finalizer.alive

    def release(self) -> None:
        """Drop the claim; idempotent (a finalizer runs once). The lock file stays: unlinking
        a lock file races with another process opening it."""
        self._finalizer()


def _make_shared_dir(path: Path) -> None:
    """The lock directory, writable by every user's sessions (sticky, like /tmp)."""
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        return
    except OSError as exc:
        raise HarnessError(f"cannot create the port lock directory {path}: {exc}; "
                           "set PHD_PORT_LOCK_DIR") from exc
    with contextlib.suppress(OSError):
        path.chmod(0o1777)


def _open_lock_file(path: Path) -> int | None:
    """A descriptor to flock (not inherited by child processes); None if another user's file
    is closed to us."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # flock works on a read-only fd
        except OSError:
            return None
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666)  # another user's session may claim this slot later
    return fd


def _write_holder(fd: int, owner: str) -> None:
    with contextlib.suppress(OSError):  # only a diagnosis; a read-only fd cannot write
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} worker {worker_id()} {owner}".strip().encode() + b"\n", 0)


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now. The probe binds the way every program we
    hand ports to binds (asyncio and uvicorn servers, QEMU's host forwards, Rust's std and
    tokio listeners: all with SO_REUSEADDR): a port whose last connections linger in TIME_WAIT
    is free to them, and a busy machine keeps hundreds of those; without the flag the probe
    took such ports for taken and a slot could run out of ports that were not in use."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _base_from_env() -> int | None:
    raw = os.environ.get("PHD_PORT_BASE", "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise HarnessError(f"PHD_PORT_BASE must be a port number, got {raw!r}") from None


class PortAllocator:
    """Hands out free loopback ports from this process's slot, round robin.

    With no `base` (and no PHD_PORT_BASE) it claims a slot (see the module docstring), trying
    slot `index` (default: the xdist worker index) first, and uses its first `size` ports; with
    a `base` its block is derived from `base` and `index` alone. `close()` (or leaving the
    `with` block) gives the slot back.
    """

    def __init__(self, base: int | None = None, index: int | None = None,
                 size: int = PORTS_PER_WORKER, *, lock_dir: Path | None = None, owner: str = "") -> None:
        if index is None:
            index = worker_index()
        if base is None:
            base = _base_from_env()
        self._claim: SlotClaim | None = None
        if base is None:
            if not 1 <= size <= PORTS_PER_WORKER:
                raise HarnessError(f"a claimed slot has {PORTS_PER_WORKER} ports; size={size} "
                                   "needs an explicit base")
            self._claim = SlotClaim.acquire(lock_dir or lock_dir_from_env(), index, owner)
            self.start = slot_start(self._claim.slot)
        else:
            # Blocks that fit below the partner blocks share a group of 2 * PAIR_OFFSET.
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
    def slot(self) -> int | None:
        """The claimed slot, or None for an explicit base."""
        return None if self._claim is None else self._claim.slot

    def close(self) -> None:
        """Give the slot back; idempotent. Ports handed out before stay the caller's."""
        if self._claim is not None:
            self._claim.release()

    def __enter__(self) -> PortAllocator:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._claim is not None and not self._claim.held:
            raise HarnessError(f"port allocator of slot {self._claim.slot} is closed")

    @property
    def partner_range(self) -> range:
        """Where the partners of `allocate_pair()` come from: this slot's ports + 4000."""
        return range(self.start + PAIR_OFFSET, self.end + PAIR_OFFSET)

    def allocate(self) -> int:
        self._check_open()
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
        both are held until `release(p)`. The partner lies in this slot's partner block, so
        no other worker or session hands out the same one."""
        if self.end + PAIR_OFFSET > 65536:
            raise HarnessError(f"partner ports {self.start + PAIR_OFFSET}..{self.end + PAIR_OFFSET - 1} "
                               "exceed 65535: lower PHD_PORT_BASE")
        self._check_open()
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
            # as the allocator's probe binds (see _port_is_free): the port may be in TIME_WAIT
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
