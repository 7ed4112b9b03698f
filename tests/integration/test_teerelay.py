"""ci/teerelay.c, the logic-free relay behind ci/bench ceiling: compiled with the system's C
compiler and run for real. The ceiling it measures means something only if it really copies
every byte the client sends to every upstream and returns exactly the first upstream's bytes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ci.bench_ceiling import build_relay
from phd.core.process import ManagedProcess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                       reason="needs a C compiler: apt-get install gcc"),
]


@pytest.fixture(scope="module")
def relay_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_relay(tmp_path_factory.mktemp("teerelay"))


@pytest.fixture
def upstreams() -> Iterator[list[socket.socket]]:
    listeners = []
    try:
        for _ in range(3):
            s = socket.create_server(("127.0.0.1", 0), backlog=8)
            s.settimeout(10)
            listeners.append(s)
        yield listeners
    finally:
        for s in listeners:
            s.close()


def read_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def test_relay_sends_every_client_byte_to_every_upstream_and_returns_only_the_first_ones_replies(
    relay_binary: Path, upstreams: list[socket.socket], tmp_path: Path
) -> None:
    sock_path = tmp_path / "relay.sock"
    ports = [str(s.getsockname()[1]) for s in upstreams]
    with ManagedProcess([str(relay_binary), str(sock_path), *ports], name="teerelay",
                        log_path=tmp_path / "teerelay.log",
                        ready=lambda _p: sock_path.exists(), ready_timeout_s=10.0):
        payload = os.urandom(3 << 20) + b"end"  # several chunks of the relay's 1 MiB buffer
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(10)
        client.connect(str(sock_path))
        conns = [s.accept()[0] for s in upstreams]
        for conn in conns:
            conn.settimeout(10)
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        received = [read_all(conn) for conn in conns]
        assert [len(r) for r in received] == [len(payload)] * 3
        assert all(r == payload for r in received), "an upstream got different bytes than the client sent"
        for i, conn in enumerate(conns):
            conn.sendall(f"reply from upstream {i};".encode())
        conns[0].close()  # the first upstream's end ends the client's relay
        assert read_all(client) == b"reply from upstream 0;"
        client.close()
        for conn in conns[1:]:
            conn.close()

        # the relay serves the next client once the first is done
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.settimeout(10)
        second.connect(str(sock_path))
        conns = [s.accept()[0] for s in upstreams]
        second.sendall(b"again")
        assert conns[2].recv(16) == b"again"
        for conn in conns:
            conn.close()
        second.close()


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        ([], "usage: teerelay UNIX_PATH PORT"),
        (["PATH"], "usage: teerelay UNIX_PATH PORT"),
        (["PATH", "65536"], "'65536' is not a port (1-65535)"),
        (["PATH", "80,81"], "'80,81' is not a port (1-65535)"),
        (["PATH", "99999999999999999999999"], "is not a port (1-65535)"),
        (["PATH", *["1"] * 9], "at most 8 ports"),
        (["x" * 200, "1"], "socket path longer than"),
    ],
)
def test_relay_refuses_bad_arguments_with_the_reason(
    relay_binary: Path, tmp_path: Path, args: list[str], complaint: str
) -> None:
    argv = [str(relay_binary), *[str(tmp_path / "r.sock") if a == "PATH" else a for a in args]]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 2
    assert complaint in done.stderr
    assert not (tmp_path / "r.sock").exists(), "refused arguments, yet it listened"


def test_relay_does_not_replace_a_file_that_is_not_a_socket(relay_binary: Path, tmp_path: Path) -> None:
    keep = tmp_path / "precious"
    keep.write_text("data")
    done = subprocess.run([str(relay_binary), str(keep), "1"], capture_output=True, text=True,
                          timeout=10, check=False)
    assert done.returncode == 2
    assert "exists and is not a socket" in done.stderr
    assert keep.read_text() == "data"
