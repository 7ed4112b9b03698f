"""Hostile input against the real server process (issue 12, server part).

Every test sends something an attacker or a broken client would send and checks three
things: the answer is a clear error (status, and a message naming the problem and, for a
policy, the flag that widens it); the server still serves a well-behaved client afterwards;
and nothing on disk that the input aimed at changed (hashed before and after).

Files a spec may name must lie under an allowed root: the server's data dir is one by
default, so the "allowed" files of these tests live there; ``outside`` files live in the
test's tmp_path, which these servers are NOT told to allow.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from sut.storage.vcr import dump_vcr, region_volume
from tests import v5

from .conftest import ServerProcess, qemu_pids_for, start_server

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
LONG_POLL_MAX_S = 1.0
ANSWER_DEADLINE_S = 10.0
# The slow-client tests start their server with this header and body deadline instead of
# the defaults (10 s each): the cut-off and its answer are the same, a tenth of the wait.
SLOW_DEADLINE_S = 1.0
# A refused address built by arithmetic, so no non-loopback literal appears here:
# 127.0.0.1 + 2**24 is the first address after the loopback network.
NOT_LOOPBACK = str(ipaddress.ip_address("127.0.0.1") + 2**24)


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server with its default limits (tmp_path NOT allowed) and a short long-poll."""
    srv = start_server(tmp_path, "--long-poll-max-s", str(LONG_POLL_MAX_S), allow_tmp=False)
    try:
        yield srv
    finally:
        code = srv.close()
        assert code == 0, f"server exit code {code}; log:\n{srv.log_path.read_text()}"


@pytest.fixture
def impatient(tmp_path: Path) -> Iterator[ServerProcess]:
    """As ``hostile``, with SLOW_DEADLINE_S for request headers and bodies."""
    srv = start_server(tmp_path, "--long-poll-max-s", str(LONG_POLL_MAX_S),
                       "--header-timeout-s", str(SLOW_DEADLINE_S), "--body-timeout-s", str(SLOW_DEADLINE_S),
                       allow_tmp=False)
    try:
        yield srv
    finally:
        code = srv.close()
        assert code == 0, f"server exit code {code}; log:\n{srv.log_path.read_text()}"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure(spec: dict[str, Any]) -> dict[str, Any]:
    return v5.ensure(spec, name="hostile")


def firmware_spec(disks: dict[str, Any] | None = None) -> dict[str, Any]:
    """A v5 spec without a kernel (the server boots QEMU's firmware) and with these disk
    components (file_disk / crucible_disk)."""
    return v5.spec(v5.serial(), disks or {}, memory_mb=64)


def file_disk(path: str, *, readonly: bool = False) -> dict[str, Any]:
    return v5.disk("d0", v5.file_backend(path, readonly=readonly))


def vcr(targets: list[str] | None = None, **region: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(dump_vcr(region_volume(
        str(uuid.uuid4()), targets or ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"],
        block_size=512, blocks_per_extent=64, extent_count=2)))
    doc["sub_volumes"][0].update(region)
    return doc


def crucible_disk(request_json: str) -> dict[str, Any]:
    return v5.disk("c0", v5.crucible_backend(request_json), slot=0x11)


def assert_error(response: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    """The document's Error body, with every needle in its message."""
    assert response.status_code == status, (response.status_code, response.text[:2000])
    body: dict[str, Any] = response.json()
    assert isinstance(body, dict) and body.get("error_code") and body.get("message"), body
    assert body.get("request_id"), body
    for needle in needles:
        assert needle.lower() in body["message"].lower(), (needle, body["message"])
    return body


def assert_serving(server: ServerProcess) -> None:
    """A well-behaved client still gets answers: GET /instance, and a long-poll when there is
    an instance (it answers within the server's bound)."""
    assert server.process.alive(), f"server died; log:\n{server.log_path.read_text()}"
    with server.client(timeout=ANSWER_DEADLINE_S) as http:
        got = http.get("/instance")
        assert got.status_code in (200, 404), got.text
        if got.status_code == 200:
            gen = http.request("GET", "/instance/state-monitor", json={"gen": 0}).json()["gen"]
            started = time.monotonic()
            polled = http.request("GET", "/instance/state-monitor", json={"gen": gen + 1})
            assert polled.status_code == 200, polled.text
            assert time.monotonic() - started < LONG_POLL_MAX_S + 5.0
    unhandled = [line for line in server.log_lines() if line.get("msg") == "unhandled error in request"]
    assert not unhandled, unhandled


def no_run_dirs(server: ServerProcess) -> None:
    leftovers = sorted(p.name for p in server.data_dir.glob("vm-*"))
    assert leftovers == [], f"a refused ensure left run directories behind: {leftovers}"


def raw_request(server: ServerProcess, head: bytes, body: bytes = b"") -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=ANSWER_DEADLINE_S + SLOW_DEADLINE_S)
    sock.sendall(head + body)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one response (headers + Content-Length body) or whatever came before a close."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/"):
        raise AssertionError(f"no HTTP response, got {data[:200]!r}")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest


def rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


# --- body size, nesting, numbers ---------------------------------------------------------


def test_declared_oversized_body_is_413_before_reading(hostile: ServerProcess) -> None:
    head = (b"PUT /instance HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 524288000\r\n\r\n")
    started = time.monotonic()
    with contextlib.closing(raw_request(hostile, head)) as sock:
        status, headers, body = read_response(sock)
    assert status == 413, (status, body)
    assert time.monotonic() - started < 5.0, "the 413 waited for the body"
    message = json.loads(body)["message"]
    assert "524288000" in message and "1048576" in message and "--max-body-bytes" in message, message
    assert headers.get("connection") == "close"
    assert_serving(hostile)


def test_chunked_oversized_body_is_413_and_memory_stays_bounded(hostile: ServerProcess) -> None:
    # 64 MiB streamed without a Content-Length: the server must count as it reads.
    chunk = b"[" + b"{}," * 21845
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        while sent < 64 * MIB:
            sent += len(chunk)
            yield chunk

    before = rss_peak_kib(hostile.process.pid)
    with hostile.client(timeout=30) as http:
        try:
            response = http.put("/instance", content=body(), headers={"content-type": "application/json"})
        except httpx.TransportError as exc:  # the server may close while we still send
            raise AssertionError(f"no answer to a chunked oversized body: {exc!r}") from exc
    assert_error(response, 413, "1048576", "--max-body-bytes")
    grown_mib = (rss_peak_kib(hostile.process.pid) - before) / 1024
    assert grown_mib < 64, f"server peak RSS grew {grown_mib:.0f} MiB for a rejected body"
    assert_serving(hostile)


def test_big_body_does_not_stall_the_event_loop(hostile: ServerProcess) -> None:
    with hostile.client() as http:
        assert http.put("/instance", json=ensure(firmware_spec())).status_code == 201
    # 30 MiB of {} in an extra property: valid JSON, and a shape the server would otherwise
    # parse, validate and check for echoing, all on its event loop.
    body = ensure(firmware_spec())
    body["properties"]["junk"] = "JUNK"
    before, after = json.dumps(body).encode().split(b'"JUNK"')
    payload = before + b"[" + b"{}," * (10 * MIB) + b"{}]" + after
    worst = 0.0
    done = threading.Event()

    def probe() -> None:
        nonlocal worst
        with hostile.client(timeout=30) as http:
            while not done.is_set():
                started = time.monotonic()
                http.get("/instance")
                worst = max(worst, time.monotonic() - started)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with hostile.client(timeout=60) as http, contextlib.suppress(httpx.TransportError):
            http.put("/instance", content=payload, headers={"content-type": "application/json"})
    finally:
        done.set()
        prober.join()
    assert worst < 0.5, f"GET /instance took {worst:.1f}s while a 30 MiB body was handled"
    assert_serving(hostile)


def test_deep_nesting_in_body_is_400(hostile: ServerProcess) -> None:
    deep = b'{"properties": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with hostile.client() as http:
        response = http.put("/instance", content=deep, headers={"content-type": "application/json"})
    assert_error(response, 400, "nesting deeper than the limit of 32")
    assert_serving(hostile)


def test_huge_integer_in_body_is_400(hostile: ServerProcess) -> None:
    text = json.dumps(ensure(firmware_spec())).replace('"cpus": 1', '"cpus": ' + "9" * 5000)
    with hostile.client() as http:
        response = http.put("/instance", content=text, headers={"content-type": "application/json"})
    assert_error(response, 400, "5000 digits", "limit of 20 digits")
    assert_serving(hostile)


@pytest.mark.parametrize(
    ("mangle", "needles"),
    [
        pytest.param(lambda t: t.replace('"gen":1', '"gen":' + "9" * 5000), ["5000 digits"], id="huge-int"),
        pytest.param(lambda t: t[:-1] + ',"x":' + "[" * 100_000 + "]" * 100_000 + "}",
                     ["nesting deeper"], id="deep"),
        pytest.param(lambda t: t.replace('"gen":1', '"gen":1e999'), ["not a finite"], id="inf-float"),
    ],
)
def test_hostile_vcr_json_is_400_on_ensure_and_replace(
    hostile: ServerProcess, mangle: Any, needles: list[str]
) -> None:
    good = json.dumps(vcr(), separators=(",", ":"))
    bad = mangle(good)
    with hostile.client() as http:
        response = http.put("/instance", json=ensure(firmware_spec(disks=crucible_disk(bad))))
        assert_error(response, 400, *needles)
        no_run_dirs(hostile)
        assert http.put("/instance", json=ensure(firmware_spec(disks=crucible_disk(good)))).status_code == 201
        response = http.put("/instance/disk/c0-backend/vcr", json={"vcr_json": bad})
        assert_error(response, 400, *needles)
    assert_serving(hostile)


@pytest.mark.parametrize(
    ("region", "needles"),
    [
        pytest.param({"block_size": 2**40}, ["block_size", "512 or 4096"], id="block-size"),
        pytest.param({"block_size": 1024}, ["block_size", "512 or 4096"], id="block-size-1024"),
        pytest.param({"extent_count": 2**64}, ["extent_count", "18446744073709551615"], id="extents-u64"),
        pytest.param({"gen": 2**64}, ["gen", "18446744073709551615"], id="gen-u64"),
        pytest.param({"gen": 0}, ["gen", "greater than or equal to 1"], id="gen-0"),
        pytest.param({"blocks_per_extent": 2**40, "extent_count": 2**40},
                     ["size", "9223372036854775807"], id="volume-size"),
    ],
)
def test_vcr_values_out_of_range_are_400(hostile: ServerProcess, region: dict[str, Any],
                                         needles: list[str]) -> None:
    doc = vcr(**region)
    if "block_size" in region:
        doc["block_size"] = region["block_size"]
    with hostile.client() as http:
        response = http.put("/instance", json=ensure(firmware_spec(disks=crucible_disk(json.dumps(doc)))))
    assert_error(response, 400, *needles)
    no_run_dirs(hostile)
    assert_serving(hostile)


# --- VCR targets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "needles"),
    [
        pytest.param(f"{NOT_LOOPBACK}:3810", [NOT_LOOPBACK, "127.0.0.0/8", "--allow-targets"],
                     id="not-loopback"),
        pytest.param("0.0.0.0:3810", ["0.0.0.0", "never allowed"], id="unspecified"),
        pytest.param("224.0.0.1:3810", ["224.0.0.1", "never allowed"], id="multicast"),
        pytest.param("[::1]:3810", ["::1", "--allow-targets"], id="ipv6"),
    ],
)
def test_vcr_targets_outside_allowed_networks_are_400(hostile: ServerProcess, target: str,
                                                      needles: list[str]) -> None:
    bad = vcr([target, "127.0.0.1:2", "127.0.0.1:3"])
    good = vcr()
    with hostile.client() as http:
        response = http.put("/instance", json=ensure(firmware_spec(disks=crucible_disk(json.dumps(bad)))))
        assert_error(response, 400, *needles)
        no_run_dirs(hostile)
        assert http.put("/instance", json=ensure(firmware_spec(disks=crucible_disk(json.dumps(good))))
                        ).status_code == 201
        replacement = json.loads(json.dumps(good))
        replacement["sub_volumes"][0]["opts"]["target"][0] = target
        response = http.put("/instance/disk/c0-backend/vcr", json={"vcr_json": json.dumps(replacement)})
        assert_error(response, 400, *needles)
    assert_serving(hostile)


# --- paths --------------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "secret.raw"
    path.write_bytes(b"secret" * 100)
    return path


def _hostile_paths(server: ServerProcess, outside: Path) -> dict[str, tuple[str, list[str]]]:
    inside = server.data_dir / "files"
    inside.mkdir(exist_ok=True)
    link = inside / "innocent.raw"
    if not link.is_symlink():
        link.symlink_to(outside)
    (inside / "adir").mkdir(exist_ok=True)
    roots = ["outside the allowed roots", "--allow-path"]
    fifo = inside / "fifo.raw"
    if not fifo.exists():
        os.mkfifo(fifo)
    device = inside / "zero.raw"
    if not device.exists():
        try:
            os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # a /dev/zero inside the root
        except PermissionError:
            pytest.skip("creating a device node needs root")
    up_to_root = str(inside) + "/.." * (len(inside.parts) - 1)
    return {
        "etc-shadow": ("/etc/shadow", roots),
        "proc-self-mem": ("/proc/self/mem", roots),
        "sys-file": ("/sys/kernel/uevent_seqnum", roots),
        "dev-zero": ("/dev/zero", roots),
        "device-inside": (str(device), ["not a regular file", "character device"]),
        "fifo-inside": (str(fifo), ["not a regular file", "fifo"]),
        "directory": (str(inside / "adir"), ["not a regular file", "directory"]),
        "symlink-out": (str(link), [str(outside), *roots]),
        "traversal": (up_to_root + str(outside), roots),
        "outside": (str(outside), roots),
        "missing": (str(inside / "nope.raw"), ["does not exist"]),
        "newline": (str(inside / "a\nb.raw"), ["newline"]),
        "nul": (str(inside / "a\0b.raw"), ["nul"]),
    }


HOSTILE_PATHS = ["etc-shadow", "proc-self-mem", "sys-file", "dev-zero", "device-inside", "fifo-inside",
                 "directory", "symlink-out", "traversal", "outside", "missing", "newline", "nul"]


@pytest.mark.parametrize("kind", HOSTILE_PATHS)
def test_hostile_file_paths_are_400(hostile: ServerProcess, outside: Path, kind: str) -> None:
    path, needles = _hostile_paths(hostile, outside)[kind]
    aimed = [p for p in (outside, Path("/etc/shadow")) if os.access(p, os.R_OK)]
    before = [sha(p) for p in aimed]
    with hostile.client() as http:
        # (The kernel is no longer a spec field: --kernel is the server's trusted command line.)
        disk = http.put("/instance", json=ensure(firmware_spec(disks=file_disk(path))))
        assert_error(disk, 400, "components.d0-backend.component.path", *needles)
        no_run_dirs(hostile)
    assert [sha(p) for p in aimed] == before
    assert_serving(hostile)


@pytest.mark.parametrize("kind", ["relative", "etc-shadow", "directory", "symlink-out", "outside"])
def test_hostile_read_only_parent_is_400(hostile: ServerProcess, outside: Path, kind: str) -> None:
    paths = _hostile_paths(hostile, outside)
    path, needles = ("guest.raw", ["absolute"]) if kind == "relative" else paths[kind]
    doc = vcr()
    doc["read_only_parent"] = {"type": "file", "id": str(uuid.uuid4()), "block_size": 512, "path": path}
    with hostile.client() as http:
        response = http.put("/instance", json=ensure(firmware_spec(disks=crucible_disk(json.dumps(doc)))))
    assert_error(response, 400, "read_only_parent.path", *needles)
    no_run_dirs(hostile)
    assert_serving(hostile)


def test_qcow2_backing_file_outside_roots_is_400(hostile: ServerProcess, outside: Path) -> None:
    import subprocess

    overlay = hostile.data_dir / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(outside),
                    str(overlay)], check=True)
    before = sha(outside)
    with hostile.client() as http:
        # The format is read from the image: qcow2, so its backing file is checked too.
        response = http.put("/instance", json=ensure(firmware_spec(disks=file_disk(str(overlay)))))
    assert_error(response, 400, "backing file", str(outside), "outside the allowed roots", "--allow-path")
    assert sha(outside) == before
    no_run_dirs(hostile)
    assert_serving(hostile)


def _qemu_open_files(data_dir: Path) -> dict[str, int]:
    """Real path -> open flags of every regular file the VM's QEMU holds open."""
    deadline = time.monotonic() + ANSWER_DEADLINE_S
    while not (pids := qemu_pids_for(data_dir)):
        assert time.monotonic() < deadline, "QEMU did not start"
        time.sleep(0.05)  # poll interval of a deadline-bounded wait
    files = {}
    for fd in Path(f"/proc/{pids[0]}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("/"):
                flags = next(line for line in (Path(f"/proc/{pids[0]}/fdinfo") / fd.name).read_text()
                             .splitlines() if line.startswith("flags:"))
                files[target] = int(flags.split()[1], 8)
    return files


def _run_and_wait(http: httpx.Client, wanted: str = "Running") -> None:
    assert http.put("/instance/state", json="Run").status_code == 204
    deadline = time.monotonic() + 30
    state = ""
    while state != wanted:
        assert time.monotonic() < deadline, f"instance never reached {wanted} (last {state})"
        got = http.request("GET", "/instance/state-monitor", json={"gen": 0}).json()
        state = got["state"]
        assert state not in ("Failed", "Destroyed") or state == wanted, got
        http.request("GET", "/instance/state-monitor", json={"gen": got["gen"] + 1})


def test_comma_laden_readonly_path_is_opened_literally_and_read_only(hostile: ServerProcess) -> None:
    files = hostile.data_dir / "files"
    files.mkdir()
    disk = files / "disk.raw"
    disk.write_bytes(b"\1" * MIB)
    # Before the fix QEMU read this as read-only=off and opened disk.raw read-write.
    hostile_name = files / f"r,read-only=off,file.filename={disk}"
    hostile_name.parent.mkdir(parents=True)
    hostile_name.write_bytes(b"\2" * MIB)
    before = sha(disk), sha(hostile_name)
    with hostile.client() as http:
        created = http.put("/instance", json=ensure(firmware_spec(disks=file_disk(str(hostile_name),
                                                                                   readonly=True))))
        assert created.status_code == 201, created.text
        _run_and_wait(http)
        opened = _qemu_open_files(hostile.data_dir)
        assert str(disk) not in opened, f"QEMU opened the file the option injection named: {opened}"
        assert str(hostile_name) in opened, opened
        assert opened[str(hostile_name)] & os.O_ACCMODE == os.O_RDONLY, "the read-only disk is writable"
        assert http.put("/instance/state", json="Stop").status_code == 204
    assert (sha(disk), sha(hostile_name)) == before
    assert_serving(hostile)


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def test_qemu_runs_sandboxed_and_can_drop_to_another_user(tmp_path: Path) -> None:
    import pwd

    srv = start_server(tmp_path, "--long-poll-max-s", str(LONG_POLL_MAX_S), "--qemu-user", "nobody",
                       allow_tmp=False)
    try:
        disk = srv.data_dir / "disk.raw"
        disk.write_bytes(b"\0" * MIB)
        disk.chmod(0o600)  # root's file: QEMU as nobody reads it only through the server's descriptor
        with srv.client() as http:
            assert http.put("/instance", json=ensure(firmware_spec(disks=file_disk(str(disk))))
                            ).status_code == 201
            _run_and_wait(http)
            pid = qemu_pids_for(srv.data_dir)[0]
            assert _status_field(pid, "Seccomp") == "2", "QEMU runs without its seccomp filter"
            assert int(_status_field(pid, "Uid").split()[0]) == pwd.getpwnam("nobody").pw_uid
            assert http.put("/instance/state", json="Stop").status_code == 204
    finally:
        assert srv.close() == 0


def test_comma_laden_data_dir_works(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--long-poll-max-s", str(LONG_POLL_MAX_S), allow_tmp=False,
                       data_dir_name="d,ir=x,path=y")
    try:
        assert "," in str(srv.data_dir)
        with srv.client() as http:
            assert http.put("/instance", json=ensure(firmware_spec())).status_code == 201
            _run_and_wait(http)
            assert http.put("/instance/state", json="Stop").status_code == 204
    finally:
        assert srv.close() == 0


# --- slow clients, many connections ---------------------------------------------------------


def test_slow_body_gets_408(impatient: ServerProcess) -> None:
    head = (b"PUT /instance HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")
    started = time.monotonic()
    with contextlib.closing(raw_request(impatient, head, b'{"properties"')) as sock:
        assert_serving(impatient)  # the trickling client holds nobody else up
        status, _, body = read_response(sock)
    waited = time.monotonic() - started
    assert status == 408, (status, body)
    assert f"within {SLOW_DEADLINE_S:g} seconds" in json.loads(body)["message"]
    # the configured deadline, not an earlier cut-off nor the 10 s default
    assert SLOW_DEADLINE_S - 0.1 <= waited < SLOW_DEADLINE_S + 5, waited
    assert_serving(impatient)


def test_slow_headers_are_cut_off(impatient: ServerProcess) -> None:
    started = time.monotonic()
    with contextlib.closing(raw_request(impatient, b"GET /instance HTTP/1.1\r\nHost: x\r\n")) as sock:
        assert_serving(impatient)
        sock.settimeout(SLOW_DEADLINE_S + 5)
        try:
            data = sock.recv(65536)
            while data and b"\r\n\r\n" not in data:
                data += sock.recv(65536)
        except TimeoutError:
            raise AssertionError("the server kept a connection with unfinished headers open") from None
        except ConnectionResetError:
            data = b""
    waited = time.monotonic() - started
    assert SLOW_DEADLINE_S - 0.1 <= waited < SLOW_DEADLINE_S + 5, waited
    assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:200]
    assert_serving(impatient)


def test_the_deadlines_default_to_ten_seconds(hostile: ServerProcess) -> None:
    """The product defaults the slow-client tests above shorten."""
    starting = next(line for line in hostile.log_lines() if line.get("msg") == "server starting")
    assert (starting["header_timeout_s"], starting["body_timeout_s"]) == (10.0, 10.0), starting


def _open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_hundreds_of_idle_connections_do_not_starve_a_client(impatient: ServerProcess) -> None:
    host, port = impatient.base_url.removeprefix("http://").split(":")
    baseline = _open_fds(impatient.process.pid)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(400)]
    try:
        started = time.monotonic()
        assert_serving(impatient)
        assert time.monotonic() - started < 5.0
        # Idle sockets are closed by the server (header deadline / eviction), not kept forever.
        deadline = time.monotonic() + SLOW_DEADLINE_S + 10
        while _open_fds(impatient.process.pid) > baseline + 20:
            assert time.monotonic() < deadline, (
                f"server still holds {_open_fds(impatient.process.pid) - baseline} extra fds")
            time.sleep(0.2)  # poll interval of a deadline-bounded wait
    finally:
        for sock in idle:
            sock.close()
    assert_serving(impatient)


# --- wrong types, errors, logs ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        pytest.param({"vcr_json": 5}, ["vcr_json", "string"], id="number"),
        pytest.param({"vcr_json": ["x"]}, ["vcr_json", "string"], id="list"),
        pytest.param({"vcr_json": "[1,2]"}, ["json object"], id="array-vcr"),
        pytest.param({"vcr_json": "x" * (2 * MIB)}, ["413", "bytes"], id="long-string"),
    ],
)
def test_wrong_types_in_vcr_replace(hostile: ServerProcess, body: dict[str, Any], needles: list[str]) -> None:
    with hostile.client() as http:
        assert http.put("/instance", json=ensure(firmware_spec(disks=crucible_disk(json.dumps(vcr()))))
                        ).status_code == 201
        response = http.put("/instance/disk/c0-backend/vcr", json=body)
    if "413" in needles:
        assert_error(response, 413, *needles[1:])
    else:
        assert_error(response, 400, *needles)
    assert_serving(hostile)


def test_vcr_put_on_file_disk_says_it_is_a_file_disk(hostile: ServerProcess) -> None:
    disk = hostile.data_dir / "disk.raw"
    disk.write_bytes(b"\0" * 4096)
    spec = firmware_spec(disks={**file_disk(str(disk)), **crucible_disk(json.dumps(vcr()))})
    with hostile.client() as http:
        assert http.put("/instance", json=ensure(spec)).status_code == 201
        response = http.put("/instance/disk/d0-backend/vcr", json={"vcr_json": json.dumps(vcr())})
    body = assert_error(response, 404, "d0-backend is not a Crucible backend", "c0-backend")
    assert body["message"].count("d0-backend") == 1, body["message"]


def test_serial_input_while_not_running_logs_once(hostile: ServerProcess) -> None:
    with hostile.client() as http:
        assert http.put("/instance", json=ensure(firmware_spec())).status_code == 201
    url = hostile.base_url.replace("http://", "ws://") + "/instance/serial"
    with connect(url) as ws:
        for _ in range(200):
            ws.send(b"x")
    deadline = time.monotonic() + ANSWER_DEADLINE_S
    dropped: list[dict[str, object]] = []
    while not any(line.get("msg") == "serial session ended" for line in hostile.log_lines()):
        assert time.monotonic() < deadline, "the serial session did not end"
        time.sleep(0.05)  # poll interval of a deadline-bounded wait
    dropped = [line for line in hostile.log_lines() if line.get("msg") == "serial input dropped"]
    assert len(dropped) <= 1, f"{len(dropped)} warnings for one client's input"
    assert_serving(hostile)


def test_serial_websocket_outlives_the_header_deadline(tmp_path: Path) -> None:
    """The header deadline is for HTTP requests; an upgraded serial console stays untouched."""
    srv = start_server(tmp_path, "--header-timeout-s", "0.5", "--long-poll-max-s", str(LONG_POLL_MAX_S),
                       allow_tmp=False)
    try:
        with srv.client() as http:
            assert http.put("/instance", json=ensure(firmware_spec())).status_code == 201
        url = srv.base_url.replace("http://", "ws://") + "/instance/serial"
        with connect(url) as ws:
            # Nothing comes (the VM is not running) for four header deadlines; then the
            # connection must still be the websocket, with no stray HTTP bytes in it.
            with pytest.raises(TimeoutError):
                ws.recv(timeout=2.0)
            ws.send(b"x")
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.5)
        assert_serving(srv)
    finally:
        assert srv.close() == 0


def test_qcow2_chain_inside_roots_runs_with_its_backing_read_only(hostile: ServerProcess) -> None:
    import subprocess

    files = hostile.data_dir / "images"
    files.mkdir()
    base = files / "base.raw"
    base.write_bytes(b"\3" * MIB)
    overlay = files / "over,lay.qcow2"
    # A relative backing name, as qemu-img writes it: resolved against the overlay's directory.
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw", str(overlay)],
                   check=True)
    before = sha(base)
    with hostile.client() as http:
        disk = file_disk(str(overlay))
        assert http.put("/instance", json=ensure(firmware_spec(disks=disk))).status_code == 201
        _run_and_wait(http)
        opened = _qemu_open_files(hostile.data_dir)
        assert opened[str(overlay)] & os.O_ACCMODE == os.O_RDWR, opened
        assert opened[str(base)] & os.O_ACCMODE == os.O_RDONLY, opened
        assert http.put("/instance/state", json="Stop").status_code == 204
    assert sha(base) == before
    assert_serving(hostile)


def _unread_by_server(sock: socket.socket) -> int:
    """Bytes the server has not yet read from this client socket (/proc/net/tcp rx_queue)."""
    server_port, client_port = sock.getpeername()[1], sock.getsockname()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return int(fields[4].split(":")[1], 16)
    raise AssertionError("no such connection")


def test_connections_beyond_the_cap_evict_idle_ones_or_get_503(tmp_path: Path) -> None:
    # The busy connections are long-polls held for --long-poll-max-s; the probes for the 503
    # take milliseconds, so 2 s of holding is ample and keeps the test (and its closing
    # assert_serving, which waits one long-poll out) short.
    srv = start_server(tmp_path, "--max-connections", "4", "--long-poll-max-s", "2", allow_tmp=False)
    try:
        with srv.client() as http:
            assert http.put("/instance", json=ensure(firmware_spec())).status_code == 201
        # Four idle sockets: a well-behaved client still gets through (the oldest idle is closed).
        idle = [raw_request(srv, b"") for _ in range(4)]
        with srv.client() as http:
            assert http.get("/instance").status_code == 200
        for sock in idle:
            sock.close()
        # Four busy connections (long-polls for a generation that does not come): the fifth
        # connection is answered 503 with the reason, at once.
        polls = [raw_request(srv, b"GET /instance/state-monitor HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 11\r\n\r\n", b'{"gen": 99}')
                 for _ in range(4)]
        try:
            deadline = time.monotonic() + ANSWER_DEADLINE_S
            while any(_unread_by_server(sock) for sock in polls):  # the server has them all
                assert time.monotonic() < deadline, "the server did not read the long-polls"
                time.sleep(0.02)  # poll interval of a deadline-bounded wait
            status, body = 0, b""
            while status != 503:
                assert time.monotonic() < deadline, "no 503 while every connection was busy"
                probe = raw_request(srv, b"GET /instance HTTP/1.1\r\nHost: x\r\n\r\n")
                with contextlib.closing(probe):
                    status, _, body = read_response(probe)
            assert "--max-connections" in json.loads(body)["message"]
            for sock in polls:  # the busy ones are answered as usual
                assert read_response(sock)[0] == 200
        finally:
            for sock in polls:
                sock.close()
        assert_serving(srv)
    finally:
        assert srv.close() == 0
