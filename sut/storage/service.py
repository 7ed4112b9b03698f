"""What the downstairs process needs besides its protocol: JSON log lines, the connection-limit
flags, the serve loop.

The downstairs (``sut.storage.downstairs``, Crucible's message version 13) logs JSON lines on
stderr and never a traceback, takes a handshake deadline and a connection cap from the command
line, and serves until SIGTERM or SIGINT.
Stdlib only: the downstairs container image imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from sut.storage.stream import ConnectionLimits

__all__ = ["JsonLog", "add_limit_flags", "limits_from", "serve_until_signal"]


class JsonLog:
    """``log(event, **fields)``: one JSON line on stderr, stamped with time and component."""

    def __init__(self, component: str) -> None:
        self.component = component

    def __call__(self, event: str, **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "component": self.component, "event": event, **fields}
        print(json.dumps(record, default=str), file=sys.stderr, flush=True)

    def loop_exception(self, _loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An event-loop exception handler: whatever escapes a task is one line, no traceback."""
        exc = context.get("exception")
        error = None if exc is None else f"{type(exc).__name__}: {exc}"[:300]
        self("internal_error", message=context.get("message"), error=error)


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    return parse


def add_limit_flags(run: argparse.ArgumentParser) -> None:
    """``--handshake-timeout`` and ``--max-connections`` with ConnectionLimits' defaults."""
    defaults = ConnectionLimits()
    run.add_argument(
        "--handshake-timeout",
        type=_positive(float),
        default=defaults.handshake_timeout_s,
        metavar="SECONDS",
        help="close a connection that has not negotiated within this time (default: %(default)s)",
    )
    run.add_argument(
        "--max-connections",
        type=_positive(int),
        default=defaults.max_connections,
        metavar="N",
        help="connections open at once; more are closed at once (default: %(default)s)",
    )


def limits_from(args: argparse.Namespace) -> ConnectionLimits:
    return ConnectionLimits(max_connections=args.max_connections, handshake_timeout_s=args.handshake_timeout)


class _Server(Protocol):
    async def start(self, address: str, port: int) -> int: ...

    async def stop(self) -> None: ...


async def serve_until_signal(server: _Server, address: str, port: int, log: JsonLog) -> None:
    """Start ``server``, serve until SIGTERM or SIGINT, always stop it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(log.loop_exception)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start(address, port)
        await stop.wait()
        log("stopping", reason="signal")
    finally:
        await server.stop()
