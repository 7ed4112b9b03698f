"""The server's lifecycle with a real guest: reboot, guest reboot and poweroff, QEMU dying,
NVMe and virtio-blk disks, host forwards, and the serial console with many readers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from websockets.sync.client import connect

from phd.artifacts.store import GuestArtifact
from phd.core.ports import PortAllocator
from phd.core.wait import wait_until
from phd.vm.guest import TinyGuest

from .conftest import ServerProcess, qemu_pids_for, start_server
from .console import file_disk, open_guest, serial_url, tiny_args, tiny_spec, wait_for_state

pytestmark = [pytest.mark.integration, pytest.mark.vm]

DISK_SIZE = 16 << 20


@pytest.fixture
def server(tiny_server: ServerProcess) -> ServerProcess:
    """Every server of this module boots the tiny guest (conftest's tiny_server)."""
    return tiny_server


def raw_disk(path: Path, head: bytes = b"") -> Path:
    """A raw disk image of DISK_SIZE bytes starting with ``head``."""
    with path.open("wb") as f:
        f.write(head)
        f.truncate(DISK_SIZE)
    return path


def state_history(server: ServerProcess) -> list[str]:
    return [str(line["state"]) for line in server.log_lines() if line.get("msg") == "instance state"]


def boot_id(guest: TinyGuest) -> str:
    value = guest.run("cat /proc/sys/kernel/random/boot_id").output.strip()
    assert len(value) == 36, f"not a boot id: {value!r}"
    return value


def test_reboot_resets_the_guest_and_guest_poweroff_is_a_stop(
    server: ServerProcess, tiny: GuestArtifact, tmp_path: Path
) -> None:
    disk = raw_disk(tmp_path / "d0.raw")
    with server.client() as http:
        assert http.put("/instance", json=tiny_spec({"d0": file_disk(disk)})).status_code == 201
        guest = open_guest(server.base_url, tmp_path / "serial.log")
        assert http.put("/instance/state", json="Run").status_code == 204
        gen = wait_for_state(http, "Running")
        guest.login()
        first = boot_id(guest)

        # Host-requested reboot: Rebooting -> Running and the guest really
        # starts over (firmware again, a new kernel boot id).
        assert http.put("/instance/state", json="Reboot").status_code == 204
        gen = wait_for_state(http, "Rebooting", gen)
        gen = wait_for_state(http, "Running", gen)
        guest.login()  # the login prompt of the NEW boot (waits look past the cursor)
        second = boot_id(guest)
        assert second != first
        assert guest.console.text.count("SeaBIOS") == 2

        # Guest-initiated reboot: QEMU resets the machine; the server publishes
        # the same Rebooting -> Running pair.
        guest.console.send("reboot -f\n")
        gen = wait_for_state(http, "Rebooting", gen)
        gen = wait_for_state(http, "Running", gen)
        guest.login()
        assert boot_id(guest) not in (first, second)
        pids = qemu_pids_for(server.data_dir)
        assert len(pids) == 1

        # Guest poweroff: an orderly stop, not a failure.
        guest.console.send("poweroff -f\n")
        wait_for_state(http, "Destroyed", gen)
        # Each reboot is ONE Rebooting -> Running pair, although SeaBIOS resets
        # the machine once more on every warm boot.
        assert state_history(server) == [
            "Starting", "Running",
            "Rebooting", "Running",
            "Rebooting", "Running",
            "Stopping", "Stopped", "Destroyed",
        ]
        for requested in ("Run", "Stop", "Reboot"):
            answer = http.put("/instance/state", json=requested)
            assert answer.status_code == 424, (requested, answer.text)
        guest.console.close()
    assert qemu_pids_for(server.data_dir) == []


def _read_forward(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
        return data


def test_nvme_and_virtio_disks_and_a_host_forward(tiny: GuestArtifact, tmp_path: Path) -> None:
    base = raw_disk(tmp_path / "base.raw", b"virtio-pattern")
    base.chmod(0o444)
    # vda is a copy-on-write overlay of base (as the framework boots guest images).
    vda = tmp_path / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(vda)],
                   check=True, stdin=subprocess.DEVNULL, timeout=30)
    nvme = raw_disk(tmp_path / "nvme.raw", b"nvme-pattern")
    ports = PortAllocator()
    host_port = ports.allocate()
    # The qcow2 format is read from the image; the forward is the server's --forward option.
    disks = {"d0": file_disk(vda), "d1": file_disk(nvme, "nvme")}
    server = start_server(tmp_path, *tiny_args(tiny), "--forward", f"127.0.0.1:{host_port}:7777")
    try:
        with server.client() as http:
            assert http.put("/instance", json=tiny_spec(disks, nic=True)).status_code == 201
            guest = open_guest(server.base_url, tmp_path / "serial.log")
            assert http.put("/instance/state", json="Run").status_code == 204
            gen = wait_for_state(http, "Running")
            guest.console.wait_for("phd-tiny: modules loaded, disks: nvme0n1 vda", 120.0, consume=False)
            guest.login()
            assert guest.run("head -c 14 /dev/vda").output == "virtio-pattern"
            assert guest.run("head -c 12 /dev/nvme0n1").output == "nvme-pattern"
            guest.run("printf guest-wrote | dd of=/dev/nvme0n1 bs=512 seek=2048 conv=fsync 2>/dev/null")
            guest.run("printf overlay | dd of=/dev/vda bs=512 seek=0 conv=notrunc,fsync 2>/dev/null")
            guest.run("echo 3 > /proc/sys/vm/drop_caches")
            assert guest.run("head -c 14 /dev/vda").output == "overlaypattern"
            spec = http.get("/instance/spec").json()
            assert spec["state"] == "Running" and set(spec["spec"]["value"]["components"]) == {
                "com1", "d0", "d0-backend", "d1", "d1-backend", "net0", "net0-backend"}

            # User networking: the guest takes its address by DHCP from QEMU and
            # serves one line on port 7777, which the host reaches on loopback.
            guest.run("ip link set eth0 up && udhcpc -i eth0 -n -q -t 10 -T 1 >/dev/null 2>&1")
            guest.run("printf '#!/bin/sh\\necho phd-net-ok\\n' > /tmp/hello && chmod +x /tmp/hello")
            guest.run("nc -ll -p 7777 -e /tmp/hello >/dev/null 2>&1 & true")
            answer = wait_until(lambda: _read_forward(host_port), lambda data: b"phd-net-ok" in data,
                                what=f"the guest's line through 127.0.0.1:{host_port}", timeout_s=30.0)
            assert answer.strip() == b"phd-net-ok"

            assert http.put("/instance/state", json="Stop").status_code == 204
            wait_for_state(http, "Destroyed", gen)
            guest.console.close()
    finally:
        ports.release(host_port)
        assert server.close() == 0
    with nvme.open("rb") as f:
        f.seek(2048 * 512)
        assert f.read(11) == b"guest-wrote"  # QEMU flushed before it quit
    assert base.read_bytes()[:14] == b"virtio-pattern", "the overlay's base image must stay untouched"
    assert qemu_pids_for(server.data_dir) == []


def test_serial_many_readers_input_from_one_and_qemu_dying_is_failed(
    server: ServerProcess, tiny: GuestArtifact, tmp_path: Path
) -> None:
    disk = raw_disk(tmp_path / "d0.raw")
    with server.client() as http:
        assert http.put("/instance", json=tiny_spec({"d0": file_disk(disk)})).status_code == 201
        assert http.put("/instance/state", json="Run").status_code == 204
        gen = wait_for_state(http, "Running")
        writer = open_guest(server.base_url, tmp_path / "serial.log")
        readers = [open_guest(server.base_url) for _ in range(4)]
        try:
            writer.login()
            # A reader joining late with most_recent=N replays the last N bytes of
            # history, then follows live output with no gap and no overlap: what it
            # receives is one contiguous piece of the server's history. (The guest may
            # still be printing while it joins, so the replay is not compared with a
            # separate history call.)
            with connect(serial_url(server.base_url, "most_recent=64")) as late:
                replay = late.recv(timeout=10)
                assert isinstance(replay, bytes) and len(replay) == 64
                writer.run("echo marker-$((6*7))")
                stream = bytearray(replay)
                deadline = time.monotonic() + 30.0
                while b"marker-42" not in stream and time.monotonic() < deadline:
                    with contextlib.suppress(TimeoutError):
                        frame = late.recv(timeout=max(0.1, deadline - time.monotonic()))
                        assert isinstance(frame, bytes)
                        stream += frame
                assert b"marker-42" in stream, f"the late reader saw no live output: {bytes(stream)!r}"
            for reader in readers:
                reader.console.wait_for("marker-42", 30.0)
            history = bytes(http.get("/instance/serial/history", params={"from_start": 0}).json()["data"])
            assert bytes(stream) in history, "replay + live output must be one gap-free piece of history"
            # Readers going away do not disturb the others or the guest.
            readers.pop(0).console.close()
            readers.pop(0).console.close()
            writer.run("echo second-$((7*8))")
            for reader in readers:
                reader.console.wait_for("second-56", 30.0)
            full = http.get("/instance/serial/history", params={"from_start": 0}).json()
            assert b"second-56" in bytes(full["data"])

            # QEMU dying under the server is a failure, not a stop.
            (pid,) = qemu_pids_for(server.data_dir)
            os.kill(pid, signal.SIGKILL)
            wait_for_state(http, "Failed", gen)
            assert "Destroyed" not in state_history(server)
            answer = http.put("/instance/state", json="Run")
            assert answer.status_code in (403, 424), answer.text
        finally:
            for session in (writer, *readers):
                session.console.close()
    assert qemu_pids_for(server.data_dir) == []
