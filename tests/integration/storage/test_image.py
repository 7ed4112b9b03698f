"""The downstairs container image (`phd-downstairs:<hash>`, our Crucible-protocol downstairs):
built offline, read-only root, named volume at /data, on the host's network with its repair
server at port + 4000."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from phd.framework import Framework
from sut.storage.backend import CrucibleBackend, RetryPolicy

from .conftest import BLOCK_SIZE, EXTENT_COUNT, EXTENT_SIZE, make_vcr, qemu_io

pytestmark = pytest.mark.integration
REPAIR_PORT_OFFSET = 4000


def docker(*args: str, check: bool = True) -> str:
    proc = subprocess.run(
        ["docker", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def image_tag() -> str:
    if not shutil.which("docker") or not shutil.which("mmdebstrap"):
        pytest.skip("docker and mmdebstrap are needed to build the downstairs image")
    proc = subprocess.run(
        [sys.executable, "-m", "sut.storage.image", "ensure"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tag = proc.stdout.strip().splitlines()[-1]
    assert tag.startswith("phd-downstairs:")
    return tag


@pytest.fixture
def session_label() -> Iterator[str]:
    label = f"phd.session=storage-it-{uuid.uuid4().hex[:12]}"
    yield label
    ids = docker("ps", "-aq", "--filter", f"label={label}").split()
    if ids:
        docker("rm", "-f", *ids, check=False)
    vols = docker("volume", "ls", "-q", "--filter", f"label={label}").split()
    if vols:
        docker("volume", "rm", "-f", *vols)
    assert docker("ps", "-aq", "--filter", f"label={label}") == ""


@pytest.fixture
def port_pairs(phd_framework: Framework) -> Iterator[list[int]]:
    """Three ports of this worker's range whose repair ports (+ 4000) are free too."""
    ports = [phd_framework.ports.allocate_pair() for _ in range(3)]
    yield ports
    for port in ports:
        phd_framework.ports.release(port)


def start_downstairs(tag: str, label: str, name: str, port: int, region: uuid.UUID) -> str:
    """Create a region in a fresh named volume, then serve it on the host's network at
    127.0.0.1:port (repair server at port + 4000); returns "127.0.0.1:PORT"."""
    volume = docker("volume", "create", "--label", label, f"{name}-data")
    common = ["--read-only", "--label", label, "-v", f"{volume}:/data"]
    docker(
        "run",
        "--rm",
        *common,
        tag,
        "create",
        "-u",
        str(region),
        "-d",
        "/data/region",
        "--block-size",
        str(BLOCK_SIZE),
        "--extent-size",
        str(EXTENT_SIZE),
        "--extent-count",
        str(EXTENT_COUNT),
    )
    cid = docker(
        "run",
        "-d",
        "--name",
        name,
        *common,
        "--network",
        "host",
        tag,
        "run",
        "-d",
        "/data/region",
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
    )
    deadline = time.monotonic() + 30
    logs = ""
    while time.monotonic() < deadline:
        # the downstairs logs JSON lines to stderr, which `docker logs` replays on stderr
        logs = subprocess.run(
            ["docker", "logs", cid], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        ).stderr
        if '"event": "listening"' in logs:
            break
        time.sleep(0.1)  # polling interval of a deadline-bounded wait
    else:
        raise AssertionError(f"container {name} never listened; logs:\n{logs}")
    listening = [json.loads(line) for line in logs.splitlines() if '"event": "listening"' in line]
    assert [(r["address"], r["port"], r["repair_port"]) for r in listening] == [
        ("127.0.0.1", port, port + REPAIR_PORT_OFFSET)
    ], logs
    return f"127.0.0.1:{port}"


def region_info(port: int) -> tuple[int, str]:
    """GET /region-info from the repair server at port + 4000: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port + REPAIR_PORT_OFFSET, timeout=10)
    try:
        conn.request("GET", "/region-info")
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


# Prints the sut modules the downstairs imports whose cached bytecode is missing or stale.
UNCOMPILED_IMPORTS = """
import importlib.util, os, sys
import sut.storage.downstairs
bad = []
for name, module in sorted(sys.modules.items()):
    source = getattr(module, "__file__", None) or ""
    if not name.startswith("sut") or not source.endswith(".py"):
        continue
    cached = importlib.util.cache_from_source(source)
    if not os.path.exists(cached) or os.path.getmtime(cached) < os.path.getmtime(source):
        bad.append(name)
print(bad)
"""


def test_image_runs_downstairs_with_read_only_root(
    image_tag: str, session_label: str, port_pairs: list[int], tmp_path: Path
) -> None:
    labels = json.loads(docker("image", "inspect", "--format", "{{json .Config.Labels}}", image_tag))
    assert labels["phd.image"] == "downstairs"
    assert labels["phd.downstairs.program"] == "ours"
    assert docker("image", "inspect", "--format", "{{.Config.User}}", image_tag) != ""
    # Every module the downstairs imports comes from bytecode compiled into the image (the
    # root is read-only, so without it each container start compiles them all again).
    uncompiled = docker("run", "--rm", "--read-only", "--label", session_label, "--entrypoint", "python3",
                        image_tag, "-c", UNCOMPILED_IMPORTS)
    assert uncompiled == "[]", f"modules the downstairs imports without bytecode in the image: {uncompiled}"
    suffix = session_label.rsplit("-", 1)[1]
    regions = [uuid.uuid4() for _ in port_pairs]
    targets = [
        start_downstairs(image_tag, session_label, f"phd-ds{i}-{suffix}", port, region)
        for i, (port, region) in enumerate(zip(port_pairs, regions, strict=True))
    ]
    # each one's repair server answers on the host's loopback with its own region
    for port, region in zip(port_pairs, regions, strict=True):
        status, body = region_info(port)
        assert status == 200 and str(region) in body, body[:500]
    # `create` on an existing region fails with a clear message, from the container too
    again = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--read-only",
            "--label",
            session_label,
            "-v",
            f"phd-ds0-{suffix}-data:/data",
            image_tag,
            "create",
            "-u",
            str(uuid.uuid4()),
            "-d",
            "/data/region",
            "--extent-size",
            "8",
            "--extent-count",
            "1",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 2
    assert "already exists" in again.stderr

    async def main() -> None:
        sock = tmp_path / "disk.nbd"
        backend = CrucibleBackend(
            "c", make_vcr(targets), sock, retry=RetryPolicy(connect_timeout_s=2, reconnect_delay_s=0.2)
        )
        try:
            await backend.start_export()
            await asyncio.wait_for(backend.activate(), 60)
            await qemu_io(sock, "write -P 0xcd 0 1M", "flush")
            await qemu_io(sock, "read -P 0xcd 0 1M")
        finally:
            await backend.close()

    asyncio.run(main())
    # a container stops cleanly on SIGTERM (exit 0)
    name = f"phd-ds0-{suffix}"
    docker("stop", "-t", "10", name)
    assert docker("inspect", "--format", "{{.State.ExitCode}}", name) == "0"
