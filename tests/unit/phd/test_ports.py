from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest

from phd.errors import HarnessError
from phd.ports import PortAllocator


def test_workers_get_disjoint_ranges() -> None:
    a = PortAllocator(base=30000, index=0, size=50)
    b = PortAllocator(base=30000, index=1, size=50)
    assert a.end <= b.start


def test_skips_ports_in_use_and_never_repeats() -> None:
    alloc = PortAllocator(base=31000, index=0, size=20)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", alloc.start))
        ports = [alloc.allocate() for _ in range(5)]
    assert alloc.start not in ports
    assert len(set(ports)) == 5


def test_exhaustion_is_a_clear_error() -> None:
    alloc = PortAllocator(base=31100, index=0, size=3)
    for _ in range(3):
        alloc.allocate()
    with pytest.raises(HarnessError, match="no free loopback port"):
        alloc.allocate()


def test_black_hole_refuses_connections() -> None:
    alloc = PortAllocator(base=31200, index=0, size=10)
    hole = alloc.black_hole()
    try:
        assert hole.address.startswith("127.0.0.1:")
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", hole.port))
    finally:
        hole.close()


def test_silent_black_hole_accepts_the_handshake_then_never_answers() -> None:
    alloc = PortAllocator(base=31200, index=0, size=10)
    hole = alloc.black_hole("silent")
    try:
        with socket.create_connection(("127.0.0.1", hole.port), timeout=2) as s:
            s.sendall(b"HereIAm")  # a client's first message lands in a queue nobody reads
            s.settimeout(0.5)
            with pytest.raises(TimeoutError):
                s.recv(1)  # no answer and no close: a hung peer
    finally:
        hole.close()


def test_unknown_black_hole_kind_is_a_clear_error() -> None:
    alloc = PortAllocator(base=31200, index=0, size=10)
    with pytest.raises(HarnessError, match="black hole kind must be one of"):
        alloc.black_hole("dropped")  # type: ignore[arg-type]


def test_default_ranges_stay_below_the_kernels_ephemeral_ports() -> None:
    # Ports the kernel hands out itself (outgoing connections, port-0 listeners) must never
    # land in a range we probed and handed out: see DEFAULT_BASE.
    from phd.ports import DEFAULT_BASE, PORTS_PER_WORKER

    low = 32768
    with contextlib.suppress(OSError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert low >= DEFAULT_BASE + 8 * PORTS_PER_WORKER, (DEFAULT_BASE, low)


def test_pairs_have_their_partner_in_the_workers_partner_block_and_hold_both() -> None:
    from phd.ports import PAIR_OFFSET

    alloc = PortAllocator(base=30000, index=1, size=10)
    assert alloc.partner_range == range(alloc.start + PAIR_OFFSET, alloc.end + PAIR_OFFSET)
    with socket.socket() as busy:  # the first port's partner is taken: that port is skipped
        busy.bind(("127.0.0.1", alloc.start + PAIR_OFFSET))
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


def test_pair_exhaustion_is_a_clear_error() -> None:
    alloc = PortAllocator(base=31400, index=0, size=2)
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
    from phd.ports import DEFAULT_BASE, PAIR_OFFSET, PORTS_PER_WORKER

    low = 32768
    with contextlib.suppress(OSError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert low >= DEFAULT_BASE + PAIR_OFFSET + 8 * PORTS_PER_WORKER, (DEFAULT_BASE, low)
    assert PortAllocator(base=DEFAULT_BASE, index=7).partner_range.stop <= low
