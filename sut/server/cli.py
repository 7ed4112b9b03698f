"""``python -m sut.server``: argument parsing, the listening socket, then serving.py.

Two command lines, one server:

- propolis-server's: ``python -m sut.server run <BOOTROM> <IP:PORT> [VNC_IP:PORT]
  [--bootrom-version V] [--metric-addr A] [--log-level L] [our options]``; BOOTROM is the
  guest firmware (QEMU ``-bios``), the data dir defaults to a fresh temporary directory;
- ours: ``python -m sut.server --listen IP:PORT --data-dir DIR [our options]`` (QEMU's
  own firmware).

Our options carry what the v5 API has no field for: direct kernel boot (``--kernel``,
``--initrd``, ``--cmdline``), the NIC's host forwards (``--forward``), the data dir, the
regression switches, and the hostile-input limits.

Start-up is ordered for a short launch-to-ready: the arguments are parsed and the socket is
bound and listening before anything heavy is imported (FastAPI, pydantic, uvicorn and the VM
machinery take some 0.3 s); a client that connects meanwhile waits in the backlog.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import pwd
import socket
import sys
import tempfile
from pathlib import Path

# Only what parsing the arguments and binding the socket need: the HTTP stack and the VM
# machinery (sut.server.serving) are imported once the socket listens.
from sut.regressions import ALL_REGRESSIONS
from sut.server import logs
from sut.server.defaults import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_LONG_POLL_MAX_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
)
from sut.server.forwards import HostForward
from sut.server.policy import DEFAULT_NETWORKS, TargetPolicy
from sut.server.regressions import Regressions, UnknownRegressionError

ACCEL_ENV = "SUT_SERVER_ACCEL"
QEMU_ENV = "SUT_SERVER_QEMU"
DEFAULT_CMDLINE = "console=ttyS0"
LISTEN_BACKLOG = 2048  # uvicorn's default
BIND_FAILURE = 3  # what uvicorn exits with when it cannot bind (its STARTUP_FAILURE)


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"expected IP:PORT such as 127.0.0.1:9000, got {value!r}")
    return host, number


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return seconds


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def _cidr(value: str) -> str:
    try:
        TargetPolicy.parse([value])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _directory(value: str) -> Path:
    # Need not exist yet (an artifact cache is made on first use); must be absolute, so
    # what it allows does not depend on the server's working directory.
    path = Path(value)
    if not path.is_absolute() or "\n" in value or "\0" in value:
        raise argparse.ArgumentTypeError(f"expected an absolute directory, got {value!r}")
    return path


def _user(value: str) -> str:
    if value:
        try:
            pwd.getpwnam(value)
        except KeyError:
            raise argparse.ArgumentTypeError(f"no such user {value!r}") from None
    return value


def _forward(value: str) -> HostForward:
    try:
        return HostForward.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value!r} is not a file")
    return path.resolve()


def build_run_parser() -> argparse.ArgumentParser:
    """propolis-server's ``run`` command line, plus our options."""
    parser = argparse.ArgumentParser(prog="python -m sut.server run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bootrom", type=_file, metavar="BOOTROM",
                        help="the guest firmware image (QEMU -bios), e.g. /usr/share/seabios/bios-256k.bin")
    parser.add_argument("listen", type=_listen, metavar="IP:PORT", help="where to serve the API")
    parser.add_argument("vnc", nargs="?", metavar="VNC_IP:PORT",
                        help="accepted for propolis-server's command line; this server has no VNC")
    parser.add_argument("--bootrom-version", help="accepted for propolis-server's command line (unused)")
    parser.add_argument("--metric-addr", help="accepted for propolis-server's command line (no metrics)")
    parser.add_argument("--log-level", help="accepted for propolis-server's command line (logs are JSON "
                        "lines at level info)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="run directories go here (default: a new temporary directory)")
    _add_options(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sut.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--listen",
        type=_listen,
        default=("127.0.0.1", 0),
        help="IP:PORT to serve HTTP on (default 127.0.0.1:0, an ephemeral loopback port)",
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="run directories go here")
    _add_options(parser)
    return parser


def _add_options(parser: argparse.ArgumentParser) -> None:
    """Ours, in both command lines: what v5 has no field for, and the server's limits."""
    parser.add_argument("--kernel", type=_file, metavar="PATH",
                        help="boot this Linux kernel directly (QEMU -kernel); v5 has no field for it")
    parser.add_argument("--initrd", type=_file, metavar="PATH", help="its initramfs (with --kernel)")
    parser.add_argument("--cmdline", default=DEFAULT_CMDLINE, metavar="TEXT",
                        help=f"its command line (with --kernel; default {DEFAULT_CMDLINE})")
    parser.add_argument("--forward", type=_forward, action="append", default=[],
                        metavar="127.0.0.1:PORT:GUEST",
                        help="forward a loopback TCP port to the guest through the first virtio NIC "
                        "(QEMU user networking); repeatable")
    parser.add_argument(
        "--regression",
        action="append",
        default=[],
        metavar="NAME",
        help=f"re-create a historical bug; one of: {', '.join(sorted(ALL_REGRESSIONS))}",
    )
    parser.add_argument(
        "--accel",
        choices=["tcg", "kvm"],
        default=os.environ.get(ACCEL_ENV, "tcg"),
        help=f"QEMU accelerator (default tcg, or ${ACCEL_ENV})",
    )
    parser.add_argument(
        "--qemu",
        default=os.environ.get(QEMU_ENV, "qemu-system-x86_64"),
        help=f"QEMU binary (default qemu-system-x86_64, or ${QEMU_ENV})",
    )
    parser.add_argument(
        "--long-poll-max-s",
        type=_positive_seconds,
        default=DEFAULT_LONG_POLL_MAX_S,
        metavar="SECONDS",
        help="longest a GET /instance/state-monitor waits before answering the current state "
        f"(default {DEFAULT_LONG_POLL_MAX_S:g})",
    )
    parser.add_argument(
        "--allow-path",
        type=_directory,
        action="append",
        default=[],
        metavar="DIR",
        help="a directory whose regular files a spec may name (kernel, initrd, disks, qcow2 backing "
        "files, a VCR's read_only_parent); repeatable; always allowed: the data dir and the phd "
        "artifact cache ($PHD_ARTIFACT_DIR or ~/.cache/phd/artifacts)",
    )
    parser.add_argument(
        "--allow-targets",
        type=_cidr,
        action="append",
        default=[],
        metavar="CIDR",
        help="a network VCR targets may lie in; repeatable; replaces the default "
        f"{', '.join(DEFAULT_NETWORKS)} "
        "(0.0.0.0, ::, multicast and broadcast are never allowed)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="BYTES",
        help=f"largest request body; larger is 413 (default {DEFAULT_MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--body-timeout-s",
        type=_positive_seconds,
        default=DEFAULT_BODY_TIMEOUT_S,
        metavar="SECONDS",
        help=f"a request body must arrive within this; else 408 (default {DEFAULT_BODY_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--header-timeout-s",
        type=_positive_seconds,
        default=DEFAULT_HEADER_TIMEOUT_S,
        metavar="SECONDS",
        help="request headers must arrive within this; else 408 and close "
        f"(default {DEFAULT_HEADER_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="open HTTP connections; beyond it the longest-idle one is closed, or 503 when all are "
        f"busy (default {DEFAULT_MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--qemu-user",
        type=_user,
        default="",
        metavar="USER",
        help="QEMU drops to this user (-runas) once it holds its files and sockets (default: "
        "none). Opt-in: the kernel clears QEMU's die-with-the-server signal when it changes "
        "user, so a SIGKILLed server then leaves QEMU running until the harness reaps it",
    )
    parser.add_argument(
        "--no-qemu-sandbox",
        dest="qemu_sandbox",
        action="store_false",
        help="run QEMU without its seccomp sandbox (-sandbox on,obsolete=deny,elevateprivileges=deny,"
        "spawn=deny,resourcecontrol=deny), for a QEMU built without seccomp",
    )


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, as asyncio's create_server would make it (SO_REUSEADDR; an IPv6
    address is IPv6 only), with uvicorn's default backlog.

    The protocol is named (IPPROTO_TCP, as getaddrinfo gives it to create_server): asyncio
    sets TCP_NODELAY on a connection only when its socket says so, and without it an answer
    written in two parts (uvicorn sends headers, then body) waits some 40 ms for the client's
    delayed ACK (Nagle)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_form = bool(argv) and argv[0] == "run"
    parser = build_run_parser() if run_form else build_parser()
    args = parser.parse_args(argv[1:] if run_form else argv)
    if not run_form:
        args.bootrom = None
    elif args.data_dir is None:
        args.data_dir = Path(tempfile.mkdtemp(prefix="sut-server-"))
    if (args.initrd is not None or args.cmdline != DEFAULT_CMDLINE) and args.kernel is None:
        parser.error("--initrd and --cmdline need --kernel")
    if "\0" in args.cmdline or len(args.cmdline) > 4096:
        parser.error("--cmdline: at most 4096 characters, no NUL")
    try:
        regressions = Regressions.parse(args.regression)
    except UnknownRegressionError as exc:
        parser.error(str(exc))  # exits 2 with the usage line
    try:
        args.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"cannot create --data-dir {args.data_dir}: {exc}")
    log = logs.configure()
    host, port = args.listen
    # Listen first, import the rest after (serving.py): a client's first connection waits in
    # the backlog and is answered the moment the server serves.
    try:
        sock = _bind(host, port)
    except OSError as exc:
        log.error(f"cannot listen on {host}:{port}: {exc}", extra={"listen": f"{host}:{port}"})
        return BIND_FAILURE
    from sut.server.serving import serve

    code = serve(args, regressions, log, sock)
    log.info("server stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
