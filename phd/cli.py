"""`phd` command line: housekeeping and tools that are useful outside a pytest run.

    phd sweep                       remove containers/volumes left behind by killed phd runs
    phd dsc run --dir DIR ...       a downstairs controller (like Crucible's dsc), foreground
    phd dsc cmd ACTION [I] ...      drive a running `phd dsc run` over its control API
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from phd.errors import PhdError

if TYPE_CHECKING:  # the run-time imports stay lazy so `phd sweep` starts fast
    from phd.dsc import DownstairsSet
    from phd.framework import Framework

__all__ = ["main"]

DSC_DEFAULT_CONTROL = "127.0.0.1:9998"  # dsc's own default control port
DSC_DEFAULT_PORT_BASE = 8810  # dsc's first downstairs port
DSC_CLIENT_TIMEOUT_S = 120.0  # a restart waits for the downstairs to listen again


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.cmd == "sweep":
            return _sweep()
        if args.cmd == "dsc" and args.dsc_cmd == "run":
            return _dsc_run(args)
        if args.cmd == "dsc" and args.dsc_cmd == "cmd":
            return _dsc_cmd(parser, args)
    except PhdError as exc:
        print(f"phd: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.cmd}")
    return 2  # not reached: parser.error exits


def _parser() -> argparse.ArgumentParser:
    from phd.dsc import ACTIONS

    parser = argparse.ArgumentParser(prog="phd", description="PHD framework tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sweep", help="remove containers and volumes left behind by killed phd runs")
    dsc = sub.add_parser("dsc", help="downstairs controller (like Crucible's dsc)")
    dsc_sub = dsc.add_subparsers(dest="dsc_cmd", required=True)

    run = dsc_sub.add_parser("run", help="create regions, run the downstairs in the foreground, "
                             "serve the control API; Ctrl-C tears everything down")
    run.add_argument("--dir", required=True, type=Path,
                     help="regions (process flavour) and logs go here, as ds<i> and ds<i>.log")
    run.add_argument("--count", type=int, default=3, help="number of downstairs (default 3)")
    run.add_argument("--flavour", choices=("process", "docker"), default="process",
                     help="local processes (default) or Docker containers")
    run.add_argument("--network", choices=("published", "host"), default="published",
                     help="docker flavour: publish on 127.0.0.1 (default) or share the host network")
    run.add_argument("--downstairs-cmd", default=None,
                     help="process flavour: downstairs command (default: python -m sut.storage.downstairs)")
    run.add_argument("--port-base", type=int, default=DSC_DEFAULT_PORT_BASE,
                     help=f"first downstairs port; busy ports are skipped (default {DSC_DEFAULT_PORT_BASE})")
    run.add_argument("--block-size", type=int, default=512)
    run.add_argument("--extent-size", type=int, default=131072, help="blocks per extent")
    run.add_argument("--extent-count", type=int, default=16)
    run.add_argument("--control", default=DSC_DEFAULT_CONTROL,
                     help="control API address, loopback only; port 0 picks one "
                     f"(default {DSC_DEFAULT_CONTROL})")
    run.add_argument("--random-stop-min", type=float, default=None, metavar="S",
                     help="with --random-stop-max: kill and restart a random member every S..S' seconds")
    run.add_argument("--random-stop-max", type=float, default=None, metavar="S")
    run.add_argument("--seed", type=int, default=None, help="seed of the random stop (printed)")
    run.add_argument("--cleanup", action="store_true",
                     help="process flavour: remove the regions from --dir at exit (kept by default)")

    cmd = dsc_sub.add_parser("cmd", help="drive a running `phd dsc run` over its control API")
    cmd.add_argument("action", choices=("state", *ACTIONS))
    cmd.add_argument("member", nargs="?", type=int, help="member index (every action but state)")
    cmd.add_argument("--control", default=DSC_DEFAULT_CONTROL,
                     help=f"the control address of `phd dsc run` (default {DSC_DEFAULT_CONTROL})")
    return parser


def _sweep() -> int:
    import docker

    from phd.downstairs import sweep_leftovers

    removed = sweep_leftovers(docker.from_env(), keep_session="")
    print("\n".join(removed) if removed else "nothing to sweep")
    return 0


# --- phd dsc run -----------------------------------------------------------------------------
def _say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def _check_run_args(args: argparse.Namespace) -> None:
    from phd.dsc import parse_loopback
    from phd.errors import HarnessError

    parse_loopback(args.control)
    if args.count < 1:
        raise HarnessError(f"--count must be at least 1, got {args.count}")
    if not 1024 <= args.port_base <= 65535 - args.count:
        raise HarnessError(f"--port-base {args.port_base} must leave room for {args.count} ports "
                           "between 1024 and 65535")
    stops = (args.random_stop_min, args.random_stop_max)
    if (stops[0] is None) != (stops[1] is None):
        raise HarnessError("--random-stop-min and --random-stop-max go together: give both or neither")
    if stops[0] is not None and not 0 < stops[0] <= stops[1]:
        raise HarnessError(f"random stop needs 0 < --random-stop-min <= --random-stop-max, "
                           f"got {stops[0]} and {stops[1]}")
    if args.flavour == "process":
        taken = [p for i in range(args.count) if (p := args.dir / f"ds{i}").exists()]
        if taken:
            raise HarnessError(f"{', '.join(map(str, taken))} already exist(s): `phd dsc run` creates "
                               "fresh regions; pass an empty --dir or remove them (or use --cleanup)")


def _framework(args: argparse.Namespace, session_id: str) -> Framework:
    """The framework object tests use, so the CLI gets Docker, the image and labels the same
    way (`Framework.docker()`, `Framework.downstairs_image()`, `Framework.labels()`)."""
    from phd.downstairs import default_process_cmd
    from phd.framework import Framework, PhdConfig

    root = Path(__file__).resolve().parent.parent
    cmd = shlex.split(args.downstairs_cmd) if args.downstairs_cmd else default_process_cmd()
    config = PhdConfig(
        server_cmd=(), manifest=root / "artifacts" / "artifacts.toml",
        artifact_dir=Path.home() / ".cache" / "phd" / "artifacts",
        tmp_dir=Path(tempfile.gettempdir()) / "phd", default_guest="tiny", guests=("tiny",),
        downstairs=args.flavour, downstairs_cmd=tuple(cmd), output_mode="file",
        keep_on_failure=False, accel="tcg", regressions=(), repo_root=root)
    return Framework(config, session_id)


def _dsc_run(args: argparse.Namespace) -> int:
    from phd.dsc import DownstairsSet, RegionGeometry, members_for
    from phd.ports import PortAllocator

    _check_run_args(args)
    geometry = RegionGeometry(args.block_size, args.extent_size, args.extent_count)
    args.dir.mkdir(parents=True, exist_ok=True)
    stop = _stop_on_signals()
    fw = _framework(args, f"dsc{uuidlib.uuid4().hex[:6]}")
    try:
        if args.flavour == "docker":
            _sweep_dead_sessions(fw)
        ports = PortAllocator(base=args.port_base, index=0, size=min(200, 65535 - args.port_base))
        members = members_for(fw, "phd dsc run", args.dir, network=args.network)
        started = time.monotonic()
        dss = DownstairsSet(members, [ports.allocate() for _ in range(args.count)],
                            count=args.count, geometry=geometry)
        with dss:
            _print_ready(args, dss, time.monotonic() - started)
            if args.flavour == "docker":
                print(f"session: {fw.session_id}  (docker ps -a --filter label=phd.session="
                      f"{fw.session_id})", flush=True)
            code = _serve(args, dss, stop)
        what = "container and volume" if args.flavour == "docker" else "process"
        kept = f"; regions kept in {args.dir}" if args.flavour == "process" and not args.cleanup else ""
        _say(f"torn down: every downstairs {what} is gone{kept}")
        return code
    finally:
        fw.close()
        if args.cleanup and args.flavour == "process":
            for i in range(args.count):
                shutil.rmtree(args.dir / f"ds{i}", ignore_errors=True)


def _sweep_dead_sessions(fw: Framework) -> None:
    from phd.downstairs import sweep_leftovers

    removed = sweep_leftovers(fw.docker(), fw.session_id)
    if removed:
        _say(f"swept leftovers of dead phd sessions: {removed}")


def _stop_on_signals() -> threading.Event:
    """SIGINT and SIGTERM only set an event: teardown then runs to its end, even on a second
    Ctrl-C, so nothing is left behind half torn down."""
    stop = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            _say(f"{signal.Signals(signum).name} again: still tearing down, please wait")
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _print_ready(args: argparse.Namespace, dss: DownstairsSet, took_s: float) -> None:
    g = dss.geometry
    _say(f"{len(dss)} {args.flavour} downstairs up in {took_s:.2f}s; regions of {g.block_size} B "
         f"blocks x {g.extent_size} blocks/extent x {g.extent_count} extents "
         f"({g.size_bytes / (1 << 20):.0f} MiB each); logs in {args.dir}")
    for record in dss.describe():
        print(f"  ds{record['id']}  {record['target']}  {record['state']}  uuid {record['uuid']}"
              f"  ({record['name']})")
    print(f"targets: {' '.join(dss.targets)}")
    vcr = {"block_size": g.block_size, "blocks_per_extent": g.extent_size,
           "extent_count": g.extent_count, "target": dss.targets}
    print(f"vcr: {json.dumps(vcr)}", flush=True)


def _serve(args: argparse.Namespace, dss: DownstairsSet, stop: threading.Event) -> int:
    from phd.dsc import ControlServer, RandomStopper

    control = ControlServer(dss, args.control, log=_say)
    print(f"control: {control.address}  (e.g. phd dsc cmd state --control {control.address})",
          flush=True)
    stopper = None
    try:
        if args.random_stop_min is not None:
            seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
            _say(f"random stop every {args.random_stop_min}..{args.random_stop_max}s, seed {seed}")
            stopper = RandomStopper(dss, args.random_stop_min, args.random_stop_max,
                                    random.Random(seed), log=_say)
        _say("ready; Ctrl-C (or SIGTERM) tears everything down")
        stop.wait()
        _say("tearing down")
    finally:
        if stopper is not None:
            stopper.close()
        control.close()
    return 0


# --- phd dsc cmd -----------------------------------------------------------------------------
def _dsc_cmd(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import httpx

    from phd.dsc import parse_loopback

    host, port = parse_loopback(args.control)
    if args.action == "state":
        method, path = "GET", "/state"
    elif args.member is None:
        parser.error(f"`phd dsc cmd {args.action}` needs a member index, e.g. `{args.action} 0`")
    else:
        method, path = "POST", f"/ds/{args.member}/{args.action}"
    try:
        reply = httpx.request(method, f"http://{host}:{port}{path}", timeout=DSC_CLIENT_TIMEOUT_S)
    except httpx.HTTPError as exc:
        print(f"phd: error: no answer from the control API at {host}:{port} ({exc}); is "
              f"`phd dsc run --control {host}:{port}` running?", file=sys.stderr)
        return 1
    print(reply.text)
    return 0 if reply.is_success else 1


if __name__ == "__main__":
    sys.exit(main())
