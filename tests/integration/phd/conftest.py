"""Fixtures for the downstairs controller against REAL downstairs (ours, python -m
sut.storage.downstairs): local processes and Docker containers (the docker flavour skips, with
the reason, where there is no engine)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from phd.core.errors import ArtifactUnavailable
from phd.framework import Framework
from phd.storage.downstairs import OURS
from phd.storage.dsc import DownstairsSet, MemberFactory, RegionGeometry, docker_members, process_members
from sut.storage import wire
from sut.storage.wire import messages as m

# Small regions: 8 extents of 512 KiB, so creating three is quick in either flavour.
GEOMETRY = RegionGeometry(block_size=512, extent_size=1024, extent_count=8)
FLAVOURS = ["process", "docker"]

SetFactory = Callable[..., DownstairsSet]


@pytest.fixture(scope="session")
def docker_env(phd_framework: Framework) -> tuple[Any, str]:
    """The framework's Docker client and our downstairs' image, as DiskFactory gets them."""
    try:
        return phd_framework.docker(), phd_framework.downstairs_image(OURS)
    except ArtifactUnavailable as exc:
        pytest.skip(f"docker flavour needs Docker and the downstairs image: {exc}")


@pytest.fixture(params=FLAVOURS)
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Made:
    """Everything a test's sets were built from, so the test can look for leftovers."""

    def __init__(self, root: Path, tag: str) -> None:
        self.root = root  # process regions and logs live under here
        self.tag = tag  # every container/volume carries the label phd.dsc=<tag>
        self.sets: list[DownstairsSet] = []


@pytest.fixture
def made(tmp_path: Path) -> Made:
    return Made(tmp_path, uuid.uuid4().hex[:10])


@pytest.fixture
def make_set(request: pytest.FixtureRequest, flavour: str, made: Made,
             phd_framework: Framework) -> Iterator[SetFactory]:
    """`make_set(count=3, spares=0, given=None)` -> an opened DownstairsSet of our downstairs
    in this test's flavour, on port pairs from the worker's range (or on the `given` ones)."""
    ports: list[int] = []

    def members() -> MemberFactory:
        if flavour == "process":
            return process_members(OURS.cmd, made.root / f"set{len(made.sets)}")
        client, image = request.getfixturevalue("docker_env")
        labels = {**phd_framework.labels(request.node.nodeid), "phd.dsc": made.tag}
        return docker_members(client, image, labels, f"phd-{phd_framework.session_id}-{made.tag}"
                              f"-{len(made.sets)}", log_dir=made.root)

    def make(count: int = 3, spares: int = 0, *, given: list[int] | None = None) -> DownstairsSet:
        factory = members()
        # each downstairs also listens on its repair port, + 4000
        mine = [phd_framework.ports.allocate_pair() for _ in range(count + spares)]
        ports.extend(mine)
        dss = DownstairsSet(factory, given or mine, count=count, geometry=GEOMETRY)
        made.sets.append(dss)
        return dss.open()

    yield make
    try:
        for dss in made.sets:
            dss.close()
    finally:
        for port in ports:
            phd_framework.ports.release(port)


# --- probes of a real downstairs -----------------------------------------------------------------
def handshake(target: str, timeout_s: float = 2.0) -> str:
    """Open a connection and say HereIAm (Crucible's v13); returns the name of the downstairs'
    answer ("YesItsMe").

    Raises OSError when the connection is refused and TimeoutError when nobody answers
    (a paused downstairs: the kernel accepts the connection, the process never replies).
    """
    host, port = target.rsplit(":", 1)
    hello = m.HereIAm(wire.MESSAGE_VERSION, uuid.uuid4(), uuid.uuid4(), generation=1,
                      read_only=False, encrypted=False)
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(wire.encode(hello))
        frames = wire.FrameAssembler()
        received = 0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{target} closed the connection after {received} bytes")
            received += len(chunk)
            replies = frames.feed(chunk)
            if replies:
                return type(replies[0]).__name__


def answer(target: str, timeout_s: float = 2.0) -> str:
    """What a handshake gets: "YesItsMe", "timeout" or "refused: ..."."""
    try:
        return handshake(target, timeout_s)
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"refused: {exc!r}"


def processes_under(root: Path) -> list[str]:
    """Command lines of live processes that mention `root` (only ours do)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(str(root).encode() in arg for arg in argv):
            found.append(f"{entry.name}: {b' '.join(argv).decode(errors='replace')}")
    return found


def docker_leftovers(client: Any, label: str) -> list[str]:
    """Containers and volumes that carry `label` (e.g. phd.dsc=<tag>)."""
    names = [f"container {c.name}" for c in client.containers.list(all=True, filters={"label": label},
                                                                   ignore_removed=True)]
    names += [f"volume {v.name}" for v in client.volumes.list(filters={"label": label})]
    return names
