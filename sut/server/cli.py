"""``python -m sut.server``: argument parsing, signals, uvicorn.

Two command lines, one server:

- propolis-server's: ``python -m sut.server run <BOOTROM> <IP:PORT> [VNC_IP:PORT]
  [--bootrom-version V] [--metric-addr A] [--log-level L] [our options]``; BOOTROM is the
  guest firmware (QEMU ``-bios``), the data dir defaults to a fresh temporary directory;
- ours: ``python -m sut.server --listen IP:PORT --data-dir DIR [our options]`` (QEMU's
  own firmware).

Our options carry what the v5 API has no field for: direct kernel boot (``--kernel``,
``--initrd``, ``--cmdline``), the NIC's host forwards (``--forward``), the data dir, the
regression switches, and the hostile-input limits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import pwd
import signal
import sys
import tempfile
from collections.abc import Generator
from pathlib import Path

import uvicorn

from sut.path_policy import PathPolicy, default_roots
from sut.regressions import ALL_REGRESSIONS
from sut.server import logs
from sut.server.api import DEFAULT_LONG_POLL_MAX_S, ServerController, create_app
from sut.server.instance import VmConfig
from sut.server.limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    guarded_protocol,
)
from sut.server.policy import DEFAULT_NETWORKS, TargetPolicy
from sut.server.qemu import HostForward
from sut.server.regressions import Regressions, UnknownRegressionError

ACCEL_ENV = "SUT_SERVER_ACCEL"
QEMU_ENV = "SUT_SERVER_QEMU"


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
    parser.add_argument("--log-level", help="accepted for propolis-server's command line (logs are JSON, "
                        "level info)")
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
    parser.add_argument("--kernel", type=_file, metavar="PATH",
                        help="boot this Linux kernel directly (QEMU -kernel); v5 has no field for it")
    parser.add_argument("--initrd", type=_file, metavar="PATH", help="its initramfs (with --kernel)")
    parser.add_argument("--cmdline", default="console=ttyS0", metavar="TEXT",
                        help="its command line (with --kernel; default console=ttyS0)")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_form = bool(argv) and argv[0] == "run"
    parser = build_run_parser() if run_form else build_parser()
    args = parser.parse_args(argv[1:] if run_form else argv)
    if not run_form:
        args.bootrom = None
    elif args.data_dir is None:
        args.data_dir = Path(tempfile.mkdtemp(prefix="sut-server-"))
    if (args.initrd is not None or args.cmdline != "console=ttyS0") and args.kernel is None:
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
        create_app(controller),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="off",
        http=guarded_protocol(header_timeout_s=args.header_timeout_s, max_connections=args.max_connections),
    )
    server = _Server(uv_config, controller)
    asyncio.run(server.serve())
    log.info("server stopped")
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
