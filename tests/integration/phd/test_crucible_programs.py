"""The downstairs programs under the framework's handles: ours (`ours`, python -m
sut.storage.downstairs) and the real `crucible-downstairs` (`binary`), each in a container
of its image and as a local process. They answer a v13 HereIAm with YesItsMe naming their
repair port (port + 4000) on 127.0.0.1, keep their region across stop/start and kill/start,
go silent when paused, run non-root on a read-only root with the phd labels, and the
sweeper removes what a dead session left.

The real binary's cases skip without it (see tests/integration/storage/crucible_ds.py for
how to get one).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from phd.core.errors import ArtifactUnavailable, SutError
from phd.framework import Framework
from phd.storage.downstairs import (
    OURS,
    REPAIR_PORT_OFFSET,
    DockerDownstairs,
    Downstairs,
    DsProgram,
    DsState,
    ProcessDownstairs,
    choose_program,
    sweep_leftovers,
)
from sut.storage import wire
from sut.storage.wire import messages as m
from sut.storage.wire.blockhash import block_hash
from sut.storage.wire.fields import BlockContext, WriteHeader
from tests.integration.storage.crucible_ds import (
    BINARY,
    HAVE_BINARY,
    REPLY_TIMEOUT_S,
    CrucibleDownstairs,
    Peer,
    hello,
    needs_binary,
    negotiate,
)

from .conftest import docker_leftovers, processes_under

pytestmark = pytest.mark.integration
pytest_plugins = ["pytester"]

BLOCK = 512
EXTENT_SIZE = 64
EXTENT_COUNT = 4
PROGRAMS = [pytest.param("ours", id="ours"), pytest.param("binary", id="binary", marks=needs_binary)]
FLAVOURS = ["docker", "process"]


class Target:
    """What crucible_ds's Peer and negotiate() need of a downstairs, over a framework handle."""

    def __init__(self, ds: Downstairs) -> None:
        self.ds = ds
        self.kind = f"{ds.program.kind} {ds.name}"

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.ds.logs().splitlines()[-lines:])

    def connect(self) -> Peer:
        sock = socket.create_connection(("127.0.0.1", self.ds.host_port), timeout=REPLY_TIMEOUT_S)
        return Peer(sock, cast(CrucibleDownstairs, self))


def program_for(kind: str, flavour: str) -> DsProgram:
    if kind == "ours":
        return OURS
    # through the options, as a user gives them
    if flavour == "docker":
        return choose_program(flavour="docker", binary=str(BINARY))
    return choose_program(flavour="process", cmd=str(BINARY))


class Made:
    def __init__(self, fw: Framework, node_id: str, root: Path) -> None:
        self.fw = fw
        self.node_id = node_id
        self.root = root
        self.tag = uuid.uuid4().hex[:10]
        self.all: list[Downstairs] = []
        self.ports: list[int] = []

    @property
    def label(self) -> str:
        return f"phd.cruc={self.tag}"

    def docker(self) -> Any:
        try:
            return self.fw.docker()
        except ArtifactUnavailable as exc:
            pytest.skip(f"the docker flavour needs a Docker engine: {exc}")

    def image(self, program: DsProgram) -> str:
        try:
            return self.fw.downstairs_image(program)
        except ArtifactUnavailable as exc:
            pytest.skip(f"the docker flavour needs the {program.kind} image: {exc}")

    def make(self, program: DsProgram, flavour: str, *, labels: dict[str, str] | None = None) -> Downstairs:
        port = self.fw.ports.allocate_pair()
        self.ports.append(port)
        name = f"phd-{self.fw.session_id}-{self.tag}-ds{len(self.all)}"
        log = self.root / f"{name}.log"
        ds: Downstairs
        if flavour == "docker":
            all_labels = labels or {**self.fw.labels(self.node_id), "phd.cruc": self.tag}
            ds = DockerDownstairs(self.docker(), self.image(program), name, port, all_labels, log,
                                  program=program)
        else:
            ds = ProcessDownstairs(list(program.cmd), name, port, self.root / name, log, program=program)
        self.all.append(ds)
        return ds


@pytest.fixture
def made(request: pytest.FixtureRequest, phd_framework: Framework, tmp_path: Path) -> Iterator[Made]:
    made = Made(phd_framework, request.node.nodeid, tmp_path)
    yield made
    errors = []
    for ds in made.all:
        try:
            ds.destroy()
        except Exception as exc:  # noqa: BLE001 - destroy every one, report all
            errors.append(exc)
    for port in made.ports:
        phd_framework.ports.release(port)
    assert not errors, errors
    assert processes_under(tmp_path) == []
    if phd_framework._docker is not None:
        assert docker_leftovers(phd_framework._docker, made.label) == []


def started(made: Made, kind: str, flavour: str) -> tuple[Downstairs, uuid.UUID]:
    ds = made.make(program_for(kind, flavour), flavour)
    region = uuid.uuid4()
    ds.create_region(str(region), BLOCK, EXTENT_SIZE, EXTENT_COUNT)
    ds.start()
    assert ds.state is DsState.RUNNING
    return ds, region


def yes_its_me(ds: Downstairs) -> m.YesItsMe:
    peer = Target(ds).connect()
    try:
        peer.send(hello())
        reply = peer.recv()
    finally:
        peer.close()
    assert isinstance(reply, m.YesItsMe), reply
    return reply


def refused(ds: Downstairs) -> bool:
    try:
        socket.create_connection(("127.0.0.1", ds.host_port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


DATA = bytes([0x5A]) * BLOCK
UP = uuid.UUID(int=0x1F)


def activate(ds: Downstairs, generation: int) -> tuple[Peer, uuid.UUID, m.RegionInfo, m.ExtentVersions]:
    """HereIAm .. ExtentVersions as an upstairs does; the connection is then ready for I/O."""
    sess = uuid.uuid4()
    peer = Target(ds).connect()
    try:
        peer.send(hello(upstairs_id=UP, session_id=sess, generation=generation))
        assert isinstance(peer.recv(), m.YesItsMe)
        peer.send(m.PromoteToActive(UP, sess, generation))
        assert peer.recv() == m.YouAreNowActive(UP, sess, generation)
        peer.send(m.RegionInfoPlease())
        info = peer.recv()
        assert isinstance(info, m.RegionInfo), info
        peer.send(m.ExtentVersionsPlease())
        versions = peer.recv()
        assert isinstance(versions, m.ExtentVersions), versions
    except BaseException:
        peer.close()
        raise
    return peer, sess, info, versions


def write_and_flush(ds: Downstairs, generation: int) -> None:
    peer, sess, _info, versions = activate(ds, generation)
    try:
        assert versions.flush_numbers == (0,) * EXTENT_COUNT
        head = WriteHeader(UP, sess, 1000, (), 3, (BlockContext(block_hash(DATA)),))
        peer.send(m.Write(head, DATA))
        ack = peer.recv()
        assert isinstance(ack, m.WriteAck) and ack.result is None, ack
        peer.send(m.Flush(UP, sess, 1001, (1000,), 7, generation))
        flushed = peer.recv()
        assert isinstance(flushed, m.FlushAck) and flushed.result is None, flushed
    finally:
        peer.close()


def read_back(ds: Downstairs, generation: int) -> tuple[uuid.UUID, tuple[int, ...], bytes]:
    """(region uuid, flush numbers, block 3) as a new upstairs session sees them."""
    peer, sess, info, versions = activate(ds, generation)
    try:
        peer.send(m.ReadRequest(UP, sess, 1000, (), 3, 1))
        reply = peer.recv()
        assert isinstance(reply, m.ReadResponse), reply
        return info.region_def.uuid, tuple(versions.flush_numbers), bytes(reply.data)
    finally:
        peer.close()


# --- the tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("kind", PROGRAMS)
def test_a_region_the_program_refuses_fails_with_its_own_words(made: Made, kind: str, flavour: str) -> None:
    # A container creates its region in its first start (phd.storage.downstairs._run_command),
    # a process before it: either way the program's refusal reaches the caller, and nothing runs.
    ds = made.make(program_for(kind, flavour), flavour)

    def create_and_start() -> None:
        ds.create_region(str(uuid.uuid4()), 100, EXTENT_SIZE, EXTENT_COUNT)
        ds.start()

    with pytest.raises(SutError) as failed:
        create_and_start()
    assert "block size" in str(failed.value), failed.value
    assert ds.state is not DsState.RUNNING


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("kind", PROGRAMS)
def test_answers_here_i_am_with_its_repair_address_and_keeps_its_region(
        made: Made, kind: str, flavour: str) -> None:
    ds, region = started(made, kind, flavour)
    repair = wire.SocketAddr.parse("127.0.0.1", ds.host_port + REPAIR_PORT_OFFSET)
    assert yes_its_me(ds) == m.YesItsMe(wire.MESSAGE_VERSION, repair)
    assert ds.repair_address == f"127.0.0.1:{ds.host_port + REPAIR_PORT_OFFSET}"
    # crucible_ds's own negotiation works against it too
    peer, versions = negotiate(cast(CrucibleDownstairs, Target(ds)))
    peer.close()
    assert len(versions.gen_numbers) == EXTENT_COUNT
    # A higher generation: the downstairs may not have seen the close above yet, and a second
    # upstairs at the SAME generation is refused while the first still counts as active
    # (real Crucible: "Same gen, but UUIDs ... don't match"; seen once in a fresh-clone run).
    write_and_flush(ds, 2)
    for generation, how in enumerate(("stop", "kill", "restart"), start=3):
        getattr(ds, how)()
        if how != "restart":
            assert ds.state is DsState.STOPPED
            assert refused(ds), f"{ds.address} still answers after {how}"
            ds.start()
        assert ds.state is DsState.RUNNING
        uid, flushes, data = read_back(ds, generation)
        assert (uid, flushes[0], data) == (region, 7, DATA), f"after {how}"


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("kind", PROGRAMS)
def test_pause_makes_it_silent_and_resume_brings_it_back(made: Made, kind: str, flavour: str) -> None:
    ds, _region = started(made, kind, flavour)
    ds.pause()
    assert ds.state is DsState.PAUSED
    with socket.create_connection(("127.0.0.1", ds.host_port), timeout=2) as sock:
        # the kernel completes the connect; the frozen downstairs never answers
        head, data = wire.encode_parts(hello())
        sock.sendall(head + data)
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            sock.recv(1)
    ds.resume()
    assert ds.state is DsState.RUNNING
    assert yes_its_me(ds).version == wire.MESSAGE_VERSION
    ds.pause()
    ds.stop()  # graceful stop of a paused one: thawed so it can act on SIGTERM
    assert ds.state is DsState.STOPPED
    ds.start()
    assert yes_its_me(ds).version == wire.MESSAGE_VERSION


@pytest.mark.parametrize("kind", PROGRAMS)
def test_containers_are_labelled_non_root_read_only_on_the_host_network(made: Made, kind: str) -> None:
    ds, _region = started(made, kind, "docker")
    assert isinstance(ds, DockerDownstairs)
    container = made.docker().containers.get(ds.name)
    labels = container.labels
    assert labels["phd.image"] == "downstairs"
    assert labels["phd.role"] == "downstairs"
    assert labels["phd.session"] == made.fw.session_id
    assert labels["phd.downstairs.program"] == kind
    host = container.attrs["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["NetworkMode"] == "host"
    assert host.get("Init") is (True if kind == "binary" else None)
    assert container.attrs["Config"]["User"] == "10001:10001"
    top = container.top(ps_args="-o pid,uid,comm")
    uid = top["Titles"].index("UID")
    assert top["Processes"], top
    assert all(row[uid] == "10001" for row in top["Processes"]), top  # nothing runs as root
    image = made.docker().images.get(ds.image)
    assert image.labels["phd.image"] == "downstairs"
    if kind == "binary":
        assert image.labels["phd.downstairs.binary-sha256"] == sha256_of(BINARY)
        assert ds.image.startswith(f"phd-downstairs-bin:{sha256_of(BINARY)[:16]}-")
    else:
        assert ds.image.startswith("phd-downstairs:")
        assert image.labels["phd.downstairs.program"] == "ours"
    # the root filesystem refuses writes; /data (the region volume) takes them
    assert container.exec_run(["/bin/sh", "-c", "echo x > /opt/x"]).exit_code != 0
    assert container.exec_run(["/bin/sh", "-c", "echo x > /data/probe && rm /data/probe"]).exit_code == 0
    # the image of the binary has its libraries from Debian packages, nothing copied
    if kind == "binary":
        libs = container.exec_run(["/bin/sh", "-c", "ls /opt/phd/lib | wc -l"]).output.decode().strip()
        assert libs == "0"
        assert container.exec_run(["dpkg", "-s", "libsqlite3-0"]).exit_code == 0


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", PROGRAMS)
def test_the_sweeper_removes_a_dead_sessions_containers(made: Made, kind: str) -> None:
    # The owner lives while the downstairs starts (other workers sweep too, at any time), then
    # dies: its container and volume are a dead session's leftovers.
    owner = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        labels = {**made.fw.labels(made.node_id), "phd.session": f"dead{made.tag}",
                  "phd.pid": str(owner.pid), "phd.cruc": made.tag}
        ds = made.make(program_for(kind, "docker"), "docker", labels=labels)
        ds.create_region(str(uuid.uuid4()), BLOCK, EXTENT_SIZE, EXTENT_COUNT)
        ds.start()
        client = made.docker()
        assert sweep_leftovers(client, keep_session=made.fw.session_id).count(ds.name) == 0
        assert len(docker_leftovers(client, made.label)) == 2  # container and volume
    finally:
        assert owner.stdin is not None
        owner.stdin.close()
        owner.wait(10)
    removed = sweep_leftovers(client, keep_session=made.fw.session_id)
    # (another worker's sweep may have got there first: then it is just as gone)
    assert docker_leftovers(client, made.label) == [], removed
    assert ds.state is DsState.STOPPED  # the handle sees its container gone
    ds.destroy()  # and its teardown copes


@pytest.mark.skipif(HAVE_BINARY, reason="checks the skip reason only when the binary is absent")
def test_binary_cases_skip_with_a_how_to() -> None:
    assert "cargo build --release -p crucible-downstairs" in str(needs_binary.kwargs["reason"])


def test_ports_are_pairs_with_both_halves_in_this_workers_range(made: Made) -> None:
    ds = made.make(OURS, "process")
    alloc = made.fw.ports
    assert alloc.start <= ds.host_port < alloc.end
    assert ds.host_port + REPAIR_PORT_OFFSET in alloc.partner_range


# --- through the plugin ---------------------------------------------------------------------------
DISK_TEST = """
import signal
import socket
import uuid

from sut.storage import wire
from sut.storage.wire import messages as m


def test_disk(disk_factory):
    disk = disk_factory.create_crucible_disk("d", size_gib=1, extent_mib=64)
    ports = [ds.host_port for ds in disk.downstairs]
    for ds in disk.downstairs:
        assert ds.program.kind == "{kind}"
        assert ds.repair_address == f"127.0.0.1:{{ds.host_port + 4000}}"
    for ds in disk.downstairs:
        with socket.create_connection(("127.0.0.1", ds.host_port), timeout=10) as sock:
            hello = m.HereIAm(wire.MESSAGE_VERSION, uuid.uuid4(), uuid.uuid4(), 1, False, False, ())
            head, data = wire.encode_parts(hello)
            sock.sendall(head + data)
            got = b""
            while len(got) < 22:
                chunk = sock.recv(64)
                assert chunk, "closed"
                got += chunk
            reply = wire.decode(got)
            assert reply == m.YesItsMe(13, wire.SocketAddr.parse("127.0.0.1", ds.host_port + 4000))
    disk.downstairs[1].kill()
    disk.downstairs[1].start()
    print("PORTS=" + " ".join(map(str, ports)))
"""


@pytest.mark.parametrize(("kind", "flavour"), [
    pytest.param("ours", "process", id="ours-process"),
    pytest.param("ours", "docker", id="ours-docker"),
    pytest.param("binary", "process", id="binary-process", marks=needs_binary),
    pytest.param("binary", "docker", id="binary-docker", marks=needs_binary),
])
def test_disk_factory_runs_the_program(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, phd_framework: Framework,
        kind: str, flavour: str) -> None:
    """ours by default (no program option at all), binary from the path options."""
    monkeypatch.delenv("PHD_DOWNSTAIRS_BINARY", raising=False)
    monkeypatch.delenv("PHD_DOWNSTAIRS_PROGRAM", raising=False)
    pytester.makepyfile(DISK_TEST.format(kind=kind))
    args = ["-s", "-p", "no:cacheprovider", f"--phd-downstairs={flavour}",
            f"--phd-tmp-dir={pytester.path / 'phd'}"]
    if kind == "binary":
        args.append(f"--phd-downstairs-{'cmd' if flavour == 'process' else 'binary'}={BINARY}")
    if flavour == "docker":
        try:
            phd_framework.docker()
        except ArtifactUnavailable as exc:
            pytest.skip(f"needs Docker: {exc}")
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1)
    line = next(li for li in result.outlines if "PORTS=" in li)
    ports = [int(p) for p in line.split("PORTS=")[1].split()]
    assert len(ports) == 3
    assert processes_under(pytester.path) == []
    if flavour == "docker":
        # every container of that inner session is gone
        names = [c.name for c in phd_framework.docker().containers.list(all=True, ignore_removed=True)
                 if c.labels.get("phd.test", "").startswith("test_disk_factory_runs")
                 and c.labels.get("phd.session") != phd_framework.session_id]
        assert names == []


# --- phd dsc run --program ------------------------------------------------------------------------
def yes_its_me_at(target: str) -> m.YesItsMe:
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=REPLY_TIMEOUT_S) as sock:
        head, data = wire.encode_parts(hello())
        sock.sendall(head + data)
        got = b""
        while len(got) < 22:  # YesItsMe with a V4 address is 22 bytes
            chunk = sock.recv(64)
            assert chunk, f"{target} closed the connection"
            got += chunk
    reply = wire.decode(got)
    assert isinstance(reply, m.YesItsMe), reply
    return reply


@pytest.fixture
def pair_base(phd_framework: Framework) -> Iterator[int]:
    """Three port pairs of this worker's range, held (in this process's allocator, not bound)
    for the test; `phd dsc run` probes them itself from the lowest on."""
    ports = sorted(phd_framework.ports.allocate_pair() for _ in range(3))
    yield ports[0]
    for port in ports:
        phd_framework.ports.release(port)


@pytest.mark.parametrize(("kind", "flavour"), [
    pytest.param("ours", "process", id="ours-process"),
    pytest.param("ours", "docker", id="ours-docker"),
    pytest.param("binary", "process", id="binary-process", marks=needs_binary),
    pytest.param("binary", "docker", id="binary-docker", marks=needs_binary),
])
def test_dsc_run_with_a_crucible_program(request: pytest.FixtureRequest, phd_framework: Framework,
                                         tmp_path: Path, pair_base: int, kind: str, flavour: str) -> None:
    from .test_dsc_cli import DscRun

    if flavour == "docker":
        try:
            phd_framework.docker()
        except ArtifactUnavailable as exc:
            pytest.skip(f"needs Docker: {exc}")
    extra = ["--program", kind]
    if kind == "binary":
        extra += ["--downstairs-cmd" if flavour == "process" else "--binary", str(BINARY)]
    run = DscRun([sys.executable, "-m", "phd.cli", "dsc", "run", "--dir", str(tmp_path / "dsc"),
                  "--flavour", flavour, "--control", "127.0.0.1:0", "--extent-size", "64",
                  "--extent-count", "4", "--port-base", str(pair_base), *extra])
    try:
        run.wait_for("ready;", 300)
        assert f"{flavour} {kind} downstairs up" in run.output
        targets = run.value("targets:").split()
        control = run.value("control:").split()[0]
        for target in targets:
            port = int(target.rsplit(":", 1)[1])
            assert yes_its_me_at(target).repair_addr == wire.SocketAddr.parse(
                "127.0.0.1", port + REPAIR_PORT_OFFSET)
        import httpx

        assert httpx.post(f"http://{control}/ds/1/kill", timeout=60).json()["state"] == "stopped"
        assert httpx.post(f"http://{control}/ds/1/start", timeout=60).json()["state"] == "running"
        assert yes_its_me_at(targets[1]).version == wire.MESSAGE_VERSION
        session = run.value("session:").split()[0] if flavour == "docker" else ""
        assert run.finish(signal.SIGINT) == 0, run.output
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
    assert processes_under(tmp_path) == []
    if flavour == "docker":
        assert docker_leftovers(phd_framework.docker(), f"phd.session={session}") == []


def test_dsc_run_refuses_bad_programs_naming_the_fix(tmp_path: Path) -> None:
    for program, message in (("legacy", "--program 'legacy' is unknown: the legacy program and its "
                                        "protocol were removed"),
                             ("ours13", "--program 'ours13' is unknown: ours13 is now called ours")):
        done = subprocess.run([sys.executable, "-m", "phd.cli", "dsc", "run", "--dir",
                               str(tmp_path / "dsc"), "--flavour", "docker", "--program", program],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 2
        assert message in done.stderr, done.stderr
        assert not (tmp_path / "dsc").exists()  # refused before anything was made
    # there is one network (the host's): the option is gone
    done = subprocess.run([sys.executable, "-m", "phd.cli", "dsc", "run", "--dir", str(tmp_path),
                           "--network", "published"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "unrecognized arguments: --network" in done.stderr
    done = subprocess.run([sys.executable, "-m", "phd.cli", "dsc", "run", "--dir", str(tmp_path),
                           "--program", "binary", "--downstairs-cmd", "/nope/cd"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "--downstairs-cmd '/nope/cd': /nope/cd does not exist" in done.stderr


# --- the repair port, seen by another downstairs --------------------------------------------------
def repair_port_listens(ds: Downstairs) -> bool:
    try:
        socket.create_connection(("127.0.0.1", ds.host_port + REPAIR_PORT_OFFSET), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("kind", PROGRAMS)
def test_another_downstairs_reaches_the_repair_port(made: Made, kind: str, flavour: str) -> None:
    """What reconciliation needs: downstairs A can fetch from B's repair server at the address
    B named in YesItsMe (127.0.0.1:port+4000) - from inside A's container in docker mode."""
    a, _ = started(made, kind, flavour)
    b, b_region = started(made, kind, flavour)
    addr = yes_its_me(b).repair_addr
    if not repair_port_listens(b):
        pytest.fail(f"{kind} does not serve its repair port (YesItsMe names {addr})")
    request = f"GET /region-info HTTP/1.0\r\nHost: {addr}\r\n\r\n"
    if flavour == "docker":
        assert isinstance(a, DockerDownstairs)
        container = made.docker().containers.get(a.name)
        # bash's /dev/tcp: the image has no HTTP client, and needs none
        script = (f"exec 3<>/dev/tcp/{addr.ip}/{addr.port} && "
                  "printf 'GET /region-info HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3")
        out = container.exec_run(["/bin/bash", "-c", script])
        assert out.exit_code == 0, out.output
        text = out.output.decode(errors="replace")
    else:
        with socket.create_connection((str(addr.ip), addr.port), timeout=REPLY_TIMEOUT_S) as sock:
            sock.sendall(request.encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        text = b"".join(chunks).decode(errors="replace")
    assert " 200 " in text.splitlines()[0], text[:500]
    assert str(b_region) in text, text[:1000]
