"""Boot the tiny guest through the real server: states, serial websocket, stop, no leaks."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect
from websockets.sync.connection import Connection

from phd.artifacts.store import GuestArtifact
from phd.core.wait import wait_until

from .conftest import ServerProcess, qemu_pids_for, start_server
from .console import file_disk, tiny_args, tiny_spec

pytestmark = [pytest.mark.integration, pytest.mark.vm]

BOOT_DEADLINE_S = 120.0


@pytest.fixture
def server(tiny_server: ServerProcess) -> ServerProcess:
    """Every server of this module boots the tiny guest (conftest's tiny_server)."""
    return tiny_server


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "data.raw"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "raw", str(path), "16M"],
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    return path


def create_and_run(http: httpx.Client, disk: Path, tiny: GuestArtifact) -> None:
    """Create the instance (the server boots tiny's kernel: tiny_args) and run it."""
    assert http.put("/instance", json=tiny_spec({"d0": file_disk(disk)})).status_code == 201
    assert http.put("/instance/state", json="Run").status_code == 204


def wait_state(http: httpx.Client, gen: int, expected: str) -> None:
    answer = http.request("GET", "/instance/state-monitor", json={"gen": gen}, timeout=60).json()
    assert (answer["gen"], answer["state"]) == (gen, expected), answer


def read_until(ws: Connection, seen: bytearray, needle: bytes, deadline: float) -> None:
    while needle not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            tail = bytes(seen[-400:]).decode(errors="replace")
            raise AssertionError(f"no {needle!r} on the serial console; last output:\n{tail}")
        try:
            frame = ws.recv(timeout=remaining)
        except TimeoutError:
            continue
        assert isinstance(frame, bytes), "serial frames must be binary"
        seen += frame


def test_boot_serial_and_stop(server: ServerProcess, disk: Path, tiny: GuestArtifact) -> None:
    ws_url = server.base_url.replace("http://", "ws://") + "/instance/serial?from_start=0"
    with server.client() as http:
        create_and_run(http, disk, tiny)
        wait_state(http, 2, "Starting")
        wait_state(http, 3, "Running")
        pids = qemu_pids_for(server.data_dir)
        assert len(pids) == 1
        deadline = time.monotonic() + BOOT_DEADLINE_S
        seen = bytearray()
        with connect(ws_url) as ws:
            read_until(ws, seen, b"login: ", deadline)
            ws.send("root\n")  # text frames are typed into the guest too
            read_until(ws, seen, b"# ", deadline)
            ws.send(b"echo marker-$((6*7))\n")
            read_until(ws, seen, b"marker-42", deadline)
        # The firmware ran once: the guest booted straight through, no resets.
        assert seen.count(b"SeaBIOS") == 1
        history = http.get("/instance/serial/history", params={"from_start": 0}).json()
        assert b"marker-42" in bytes(history["data"])
        assert history["last_byte_offset"] >= len(seen)
        # A file backend has no VolumeStatus (that is Crucible's): 404 naming the Crucible ones.
        status = http.get("/instance/disk/d0-backend/status")
        assert status.status_code == 404 and "Crucible backends: []" in status.json()["message"]
        assert http.put("/instance/state", json="Stop").status_code == 204
        wait_state(http, 6, "Destroyed")
        assert [h["state"] for h in _states(server)] == [
            "Starting",
            "Running",
            "Stopping",
            "Stopped",
            "Destroyed",
        ]
        assert http.put("/instance/state", json="Run").status_code == 424
    assert qemu_pids_for(server.data_dir) == []
    assert all(not _alive(pid) for pid in pids)


def test_sigterm_while_running_quits_qemu_and_exits_zero(
    tmp_path: Path, disk: Path, tiny: GuestArtifact
) -> None:
    srv = start_server(tmp_path, *tiny_args(tiny))
    try:
        with srv.client() as http:
            create_and_run(http, disk, tiny)
            wait_state(http, 3, "Running")
        pids = qemu_pids_for(srv.data_dir)
        assert len(pids) == 1
        assert srv.process.stop(60) == 0  # SIGTERM (SIGKILL only after 60 s: the exit code shows it)
        assert qemu_pids_for(srv.data_dir) == []
        assert "Destroyed" in [h["state"] for h in _states(srv)]
    finally:
        srv.close()


def _states(server: ServerProcess) -> list[dict[str, object]]:
    return [line for line in server.log_lines() if line.get("msg") == "instance state"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigkill_of_the_server_takes_qemu_down(tmp_path: Path, disk: Path, tiny: GuestArtifact) -> None:
    """A server killed outright (a SIGKILLed harness, an OOM kill) must not leave its guest
    running: QEMU is started with PR_SET_PDEATHSIG."""
    srv = start_server(tmp_path, *tiny_args(tiny))
    try:
        with srv.client() as http:
            create_and_run(http, disk, tiny)
            wait_state(http, 3, "Running")
        assert len(qemu_pids_for(srv.data_dir)) == 1
        srv.process.kill()  # QEMU runs in a session of its own: this SIGKILL is the server's alone
        wait_until(lambda: qemu_pids_for(srv.data_dir), lambda pids: pids == [],
                   what="QEMU to die with its server", timeout_s=10.0)
    finally:
        srv.close()
