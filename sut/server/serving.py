"""The serving half of ``python -m sut.server``: the app, the VM settings and uvicorn.

cli.py imports this only once the listening socket is bound: FastAPI, pydantic, uvicorn and
the VM machinery take some 0.3 s to import, and a client that connects meanwhile waits in
the socket's backlog and gets its answer as soon as uvicorn serves (instead of polling a port
that is not open yet).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Generator
from typing import Any, cast

import uvicorn

from sut.path_policy import PathPolicy, default_roots
from sut.server.control import ServerController
from sut.server.front import create_front
from sut.server.instance import VmConfig
from sut.server.limits import guarded_protocol
from sut.server.policy import DEFAULT_NETWORKS, TargetPolicy
from sut.server.regressions import Regressions


class _Server(uvicorn.Server):
    """uvicorn with the signal policy of propolis-server under PHD.

    SIGINT is ignored so a Ctrl-C in the harness's terminal does not kill the
    server before the harness stops it cleanly; SIGTERM stops the VM first,
    then the HTTP server, and the process exits 0.
    """

    def __init__(self, config: uvicorn.Config, controller: ServerController) -> None:
        super().__init__(config)
        self._controller = controller

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        previous = {
            signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
            signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_sigterm),
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.should_exit = True

    async def startup(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        await super().startup(sockets)  # type: ignore[arg-type]
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                self._controller.log.info("listening", extra={"host": host, "port": port})

    async def shutdown(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        # Stop the VM before draining connections: that ends long-polls and
        # serial websockets, which would otherwise hold the drain open.
        await self._controller.shutdown()
        await super().shutdown(sockets)  # type: ignore[arg-type]


def _websocket_protocol(**kwargs: Any) -> asyncio.Protocol:
    """uvicorn's websocket protocol ("auto"), imported at the first upgrade (the serial
    console, once the VM runs) rather than at start-up: the websockets package takes some
    25 ms to import, all of it before the first answer otherwise."""
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    assert AutoWebSocketsProtocol is not None, "websockets (a dependency) is not installed"
    return AutoWebSocketsProtocol(**kwargs)


def serve(args: argparse.Namespace, regressions: Regressions, log: logging.Logger,
          sock: socket.socket) -> int:
    """Serve the API on the bound, listening ``sock`` until SIGTERM; the exit code."""
    host, port = args.listen
    data_dir = args.data_dir.resolve()
    paths = PathPolicy([*default_roots(data_dir), *args.allow_path])
    targets = TargetPolicy.parse(args.allow_targets or DEFAULT_NETWORKS)
    config = VmConfig(
        data_dir=data_dir,
        regressions=regressions,
        accel=args.accel,
        qemu_binary=args.qemu,
        paths=paths,
        targets=targets,
        qemu_sandbox=args.qemu_sandbox,
        qemu_user=args.qemu_user or None,
        bootrom=args.bootrom,
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=args.cmdline,
        forwards=tuple(args.forward),
    )
    controller = ServerController(
        config, log, long_poll_max_s=args.long_poll_max_s, max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout_s,
    )
    log.info(
        "server starting",
        extra={
            "listen": f"{host}:{port}",
            "data_dir": str(config.data_dir),
            "regressions": sorted(regressions.names),
            "accel": args.accel,
            "long_poll_max_s": args.long_poll_max_s,
            "allowed_roots": paths.describe(),
            "allowed_targets": targets.describe(),
            "max_body_bytes": args.max_body_bytes,
            "body_timeout_s": args.body_timeout_s,
            "header_timeout_s": args.header_timeout_s,
            "max_connections": args.max_connections,
            "qemu_sandbox": args.qemu_sandbox,
            "qemu_user": args.qemu_user or None,
            "bootrom": str(args.bootrom) if args.bootrom else None,
            "kernel": str(args.kernel) if args.kernel else None,
            "initrd": str(args.initrd) if args.initrd else None,
            "forwards": [f"{f.host_addr}:{f.host_port}:{f.guest_port}" for f in args.forward],
            "uid": os.getuid(),
        },
    )
    if os.getuid() == 0:
        log.warning(f"running as root; QEMU drops to --qemu-user {args.qemu_user!r} once it holds "
                    "its files" if args.qemu_user else
                    "running as root, and so is QEMU (seccomp-sandboxed; see --qemu-user); run the "
                    "server as an unprivileged user where you can")
    uv_config = uvicorn.Config(
        create_front(controller),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="off",
        ws=cast(Any, _websocket_protocol),
        http=guarded_protocol(header_timeout_s=args.header_timeout_s, max_connections=args.max_connections),
    )
    server = _Server(uv_config, controller)
    asyncio.run(server.serve(sockets=[sock]))
    return 0 if server.started else 1
