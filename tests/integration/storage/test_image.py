"""The downstairs container image: built offline, read-only root, named volume at /data."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sut.storage.backend import CrucibleBackend, RetryPolicy

from .conftest import BLOCK_SIZE, EXTENT_COUNT, EXTENT_SIZE, make_vcr, qemu_io

pytestmark = pytest.mark.integration
CONTAINER_PORT = 3810


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


def start_downstairs(tag: str, label: str, name: str) -> str:
    """Create a region in a fresh named volume, then serve it; returns "127.0.0.1:PORT"."""
    volume = docker("volume", "create", "--label", label, f"{name}-data")
    common = ["--read-only", "--label", label, "-v", f"{volume}:/data"]
    docker(
        "run",
        "--rm",
        *common,
        tag,
        "create",
        "-u",
        str(uuid.uuid4()),
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
        "-p",
        f"127.0.0.1::{CONTAINER_PORT}",
        tag,
        "run",
        "-d",
        "/data/region",
        "-a",
        "0.0.0.0",
        "-p",
        str(CONTAINER_PORT),
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
    host_port = docker("port", cid, f"{CONTAINER_PORT}/tcp").splitlines()[0].rsplit(":", 1)[1]
    return f"127.0.0.1:{host_port}"


def test_image_runs_downstairs_with_read_only_root(
    image_tag: str, session_label: str, tmp_path: Path
) -> None:
    labels = json.loads(docker("image", "inspect", "--format", "{{json .Config.Labels}}", image_tag))
    assert labels["phd.image"] == "downstairs"
    assert docker("image", "inspect", "--format", "{{.Config.User}}", image_tag) != ""
    suffix = session_label.rsplit("-", 1)[1]
    targets = [start_downstairs(image_tag, session_label, f"phd-ds{i}-{suffix}") for i in range(3)]
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
