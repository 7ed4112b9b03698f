from __future__ import annotations

import contextlib
import gc
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from phd.core.errors import HarnessError
from phd.core.ports import PortAllocator

Ports = Callable[[int], PortAllocator]


@pytest.fixture
def ports(monkeypatch: pytest.MonkeyPatch) -> Iterator[Ports]:
    """Allocators of `size` ports in slots claimed as a session claims them (this machine's lock
    directory): the ports these tests bind are never another session's."""
    monkeypatch.delenv("PHD_PORT_BASE", raising=False)
    made: list[PortAllocator] = []

    def make(size: int) -> PortAllocator:
        made.append(PortAllocator(size=size))
        return made[-1]

    yield make
    for alloc in made:
        alloc.close()


def _reusable_listener(port: int) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as every server we start does
    server.bind(("127.0.0.1", port))
    server.listen()
    return server


def test_workers_get_disjoint_ranges() -> None:
    a = PortAllocator(base=30000, index=0, size=50)
    b = PortAllocator(base=30000, index=1, size=50)
    assert a.end <= b.start


def test_skips_ports_in_use_and_never_repeats(ports: Ports) -> None:
    alloc = ports(20)
    with _reusable_listener(alloc.start):  # a server holds it
        ports = [alloc.allocate() for _ in range(5)]
    assert alloc.start not in ports
    assert len(set(ports)) == 5


def test_a_port_left_in_time_wait_is_free_but_a_listening_one_is_not(ports: Ports) -> None:
    """A server's port keeps its closed connections in TIME_WAIT for a minute; the servers we
    hand ports to bind it again regardless (SO_REUSEADDR), so the allocator must too: on a busy
    machine a slot would otherwise run out of ports nobody uses (seen in a loaded CI run)."""
    alloc = ports(2)
    lingering, listening = alloc.start, alloc.start + 1
    with _reusable_listener(lingering) as server:
        client = socket.create_connection(("127.0.0.1", lingering))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end of the port goes to TIME_WAIT
        assert client.recv(1) == b""
        client.close()
    with socket.socket() as plain, pytest.raises(OSError):  # the state the probe sees through
        plain.bind(("127.0.0.1", lingering))
    with _reusable_listener(listening):
        got = alloc.allocate()
        assert got == lingering
        with pytest.raises(HarnessError, match="no free loopback port"):
            alloc.allocate()  # the listening port is never handed out


def test_exhaustion_is_a_clear_error(ports: Ports) -> None:
    alloc = ports(3)
    for _ in range(3):
        alloc.allocate()
    with pytest.raises(HarnessError, match="no free loopback port"):
        alloc.allocate()


def test_black_hole_refuses_connections(ports: Ports) -> None:
    alloc = ports(10)
    hole = alloc.black_hole()
    try:
        assert hole.address.startswith("127.0.0.1:")
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", hole.port))
    finally:
        hole.close()


def test_silent_black_hole_accepts_the_handshake_then_never_answers(ports: Ports) -> None:
    alloc = ports(10)
    hole = alloc.black_hole("silent")
    try:
        with socket.create_connection(("127.0.0.1", hole.port), timeout=2) as s:
            s.sendall(b"HereIAm")  # a client's first message lands in a queue nobody reads
            s.settimeout(0.5)
            with pytest.raises(TimeoutError):
                s.recv(1)  # no answer and no close: a hung peer
    finally:
        hole.close()


def test_unknown_black_hole_kind_is_a_clear_error(ports: Ports) -> None:
    alloc = ports(10)
    with pytest.raises(HarnessError, match="black hole kind must be one of"):
        alloc.black_hole("dropped")  # type: ignore[arg-type]


def test_default_ranges_stay_below_the_kernels_ephemeral_ports() -> None:
    # Ports the kernel hands out itself (outgoing connections, port-0 listeners) must never
    # land in a range we probed and handed out: see DEFAULT_BASE.
    from phd.core.ports import DEFAULT_BASE, PORTS_PER_WORKER

    low = 32768
    with contextlib.suppress(OSError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert low >= DEFAULT_BASE + 8 * PORTS_PER_WORKER, (DEFAULT_BASE, low)


def test_pairs_have_their_partner_in_the_workers_partner_block_and_hold_both(ports: Ports) -> None:
    from phd.core.ports import PAIR_OFFSET

    alloc = ports(10)
    assert alloc.partner_range == range(alloc.start + PAIR_OFFSET, alloc.end + PAIR_OFFSET)
    with _reusable_listener(alloc.start + PAIR_OFFSET):  # the first port's partner is taken: skipped
        port = alloc.allocate_pair()
    assert port != alloc.start
    assert alloc.start <= port < alloc.end
    assert port + PAIR_OFFSET in alloc.partner_range
    others = [alloc.allocate() for _ in range(9)]  # every port of the block but the pair's
    assert port not in others
    with pytest.raises(HarnessError, match="no free loopback port"):
        alloc.allocate()
    alloc.release(port)  # gives the partner back too
    assert alloc.allocate_pair() == port
    assert port + PAIR_OFFSET in alloc._given  # the partner is held


def test_pair_exhaustion_is_a_clear_error(ports: Ports) -> None:
    alloc = ports(2)
    alloc.allocate_pair()
    alloc.allocate_pair()
    with pytest.raises(HarnessError, match=r"no free loopback port pair \(p, p\+4000\)"):
        alloc.allocate_pair()


def test_workers_ports_and_partners_never_meet() -> None:
    # 24 workers of the default size: ten per group of 8000, partners 4000 above their ports.
    blocks = []
    for index in range(24):
        alloc = PortAllocator(base=10000, index=index)
        blocks.append(range(alloc.start, alloc.end))
        blocks.append(alloc.partner_range)
    taken: set[int] = set()
    for block in blocks:
        assert taken.isdisjoint(block), block
        taken.update(block)


def test_default_partner_blocks_stay_below_the_kernels_ephemeral_ports() -> None:
    from phd.core.ports import DEFAULT_BASE, PAIR_OFFSET, PORTS_PER_WORKER

    low = 32768
    with contextlib.suppress(OSError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert low >= DEFAULT_BASE + PAIR_OFFSET + 8 * PORTS_PER_WORKER, (DEFAULT_BASE, low)
    assert PortAllocator(base=DEFAULT_BASE, index=7).partner_range.stop <= low


# --- slots claimed per session (no PHD_PORT_BASE) ---------------------------------------------
@pytest.fixture
def claims(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A lock directory of this test's own, and no PHD_PORT_BASE override."""
    monkeypatch.delenv("PHD_PORT_BASE", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    return tmp_path / "locks"


def _ranges(alloc: PortAllocator) -> set[int]:
    return {*range(alloc.start, alloc.end), *alloc.partner_range}


def test_two_sessions_get_disjoint_slots(claims: Path) -> None:
    # Two sessions started independently: both are "master" (worker index 0) and prefer slot 0.
    with PortAllocator(lock_dir=claims) as first, PortAllocator(lock_dir=claims) as second:
        assert first.slot == 0
        assert second.slot not in (None, 0)
        assert _ranges(first).isdisjoint(_ranges(second))


def test_the_workers_of_two_sessions_are_all_disjoint(claims: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    held = []
    try:
        for _session in range(2):
            for wid in ("gw0", "gw1", "gw2"):
                monkeypatch.setenv("PYTEST_XDIST_WORKER", wid)
                held.append(PortAllocator(lock_dir=claims))
        assert [a.slot for a in held[:3]] == [0, 1, 2]  # a lone session's layout is unchanged
        taken: set[int] = set()
        for alloc in held:
            assert taken.isdisjoint(_ranges(alloc)), alloc.slot
            taken |= _ranges(alloc)
    finally:
        for alloc in held:
            alloc.close()


def test_a_closed_or_dropped_allocator_gives_its_slot_back(claims: Path) -> None:
    alloc = PortAllocator(lock_dir=claims)
    alloc.close()
    alloc.close()  # idempotent
    with pytest.raises(HarnessError, match="closed"):
        alloc.allocate()
    dropped = PortAllocator(lock_dir=claims)
    assert dropped.slot == 0
    del dropped
    gc.collect()
    with PortAllocator(lock_dir=claims) as again:
        assert again.slot == 0


def test_a_killed_sessions_claim_is_reclaimed(claims: Path) -> None:
    # Another session's process: claims a slot, says which, then holds it until killed.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from phd.core.ports import PortAllocator; "
         "a = PortAllocator(lock_dir=Path(sys.argv[1]), owner='session dead'); "
         "print(a.slot, flush=True); sys.stdin.read()", str(claims)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k not in ("PHD_PORT_BASE", "PYTEST_XDIST_WORKER")})
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "0"
        assert f"pid {holder.pid} worker master session dead" in (claims / "slot-0.lock").read_text()
        with PortAllocator(lock_dir=claims) as beside:
            assert beside.slot == 1  # the live session keeps its slot
    finally:
        holder.kill()  # SIGKILL: nothing of the session runs its cleanup
        holder.wait()
        for pipe in (holder.stdin, holder.stdout):
            if pipe is not None:
                pipe.close()
    with PortAllocator(lock_dir=claims) as after:
        assert after.slot == 0  # the kernel dropped the dead session's lock


def test_when_every_slot_is_claimed_the_error_names_the_holders(claims: Path) -> None:
    from phd.core.ports import SLOT_COUNT

    held = [PortAllocator(lock_dir=claims, owner=f"session s{k}") for k in range(SLOT_COUNT)]
    try:
        assert sorted(a.slot for a in held if a.slot is not None) == list(range(SLOT_COUNT))
        with pytest.raises(HarnessError,
                           match=r"all \d+ loopback port slots are claimed.*session s0.*PHD_PORT_BASE"):
            PortAllocator(lock_dir=claims)
    finally:
        for alloc in held:
            alloc.close()


def test_phd_port_base_overrides_the_claim(claims: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHD_PORT_BASE", "30000")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    alloc = PortAllocator(lock_dir=claims)
    assert alloc.slot is None
    assert (alloc.start, alloc.end) == (30400, 30800)  # the worker's block, derived as before
    assert not claims.exists()
    monkeypatch.setenv("PHD_PORT_BASE", "lots")
    with pytest.raises(HarnessError, match="PHD_PORT_BASE must be a port number"):
        PortAllocator(lock_dir=claims)


def test_a_claimed_slot_holds_at_most_a_slots_ports(claims: Path) -> None:
    from phd.core.ports import PORTS_PER_WORKER

    with PortAllocator(lock_dir=claims, size=10) as small:
        assert small.end - small.start == 10
    with pytest.raises(HarnessError, match="needs an explicit base"):
        PortAllocator(lock_dir=claims, size=PORTS_PER_WORKER + 1)


def test_claimable_slots_never_meet_and_stay_below_the_kernels_ephemeral_ports() -> None:
    from phd.core.ports import PAIR_OFFSET, PORTS_PER_WORKER, SLOT_COUNT, slot_start

    low = 32768
    with contextlib.suppress(OSError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    taken: set[int] = set()
    for slot in range(SLOT_COUNT):
        start = slot_start(slot)
        block = {*range(start, start + PORTS_PER_WORKER),
                 *range(start + PAIR_OFFSET, start + PAIR_OFFSET + PORTS_PER_WORKER)}
        assert taken.isdisjoint(block), slot
        taken |= block
    assert min(taken) >= 1024 and max(taken) < low, (min(taken), max(taken), low)
