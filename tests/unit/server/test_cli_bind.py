"""``python -m sut.server`` binds its socket before it imports the HTTP stack (cli.py)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

from sut.server.cli import _bind


def test_connections_on_the_early_socket_get_tcp_nodelay() -> None:
    # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; without it a
    # two-part answer (headers, then body) waits ~40 ms for the client's delayed ACK.
    listener = _bind("127.0.0.1", 0)
    assert listener.proto == socket.IPPROTO_TCP

    async def accepted_nodelay() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
            try:
                return await asyncio.wait_for(seen, 5)
            finally:
                writer.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_a_port_in_use_exits_3_with_a_log_line(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sut.server", "--listen", f"127.0.0.1:{port}",
             "--data-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60, check=False)
    finally:
        taken.close()
    assert result.returncode == 3, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_the_command_line_imports_no_http_stack_before_it_listens() -> None:
    code = ("import sys, sut.server.cli; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'pydantic', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
