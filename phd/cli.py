"""`phd` command line: housekeeping and tools that are useful outside a pytest run.

    phd sweep                       stop processes and remove containers/volumes/run dirs of killed phd runs
    phd dsc run --dir DIR ...       a downstairs controller (like Crucible's dsc), foreground
    phd dsc cmd ACTION [I] ...      drive a running `phd dsc run` over its control API
    phd artifacts list              the manifest's artifacts, their sources and cache state
    phd artifacts fetch [KEY...]    download / check files (default: every file artifact)
    phd artifacts build [KEY...]    run recipes, fetching their inputs (default: every recipe)
    phd artifacts verify [KEY...]   re-hash cached files and report the bad ones
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from phd.core.errors import PhdError

if TYPE_CHECKING:  # the run-time imports stay lazy so `phd sweep` starts fast
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from phd.artifacts.store import ArtifactStore
    from phd.config import PhdConfig
    from phd.framework import Framework
    from phd.storage.dsc import DownstairsSet

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
        if args.cmd == "artifacts":
            return _artifacts(args)
    except PhdError as exc:
        print(f"phd: error: {exc}", file=sys.stderr)
        return 2
    except ExceptionGroup as group:
        # Teardown raises every error together (phd.core.teardown); one line each when all are
        # ours, the full tracebacks otherwise.
        if group.split(PhdError)[1] is not None:
            raise
        print(f"phd: error: {group.message}:", file=sys.stderr)
        for leaf in _leaves(group):
            print(f"  {leaf}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.cmd}")
    return 2  # not reached: parser.error exits


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    return [leaf for exc in group.exceptions
            for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])]


def _parser() -> argparse.ArgumentParser:
    from phd.storage.downstairs import PROGRAM_KINDS
    from phd.storage.dsc import ACTIONS

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
    run.add_argument("--program", default=None, metavar="|".join(PROGRAM_KINDS),
                     help="ours (python -m sut.storage.downstairs) or binary (a "
                     "crucible-downstairs: --downstairs-cmd PATH or --binary PATH); default: "
                     "binary when one is given, else ours. Containers share the host's network "
                     "and every downstairs takes a port pair (its repair port is + 4000)")
    run.add_argument("--downstairs-cmd", default=None,
                     help="process flavour: downstairs command (default: the program's own); the "
                     "path of an ELF executable alone is a crucible-downstairs (program binary)")
    run.add_argument("--binary", default=None, metavar="PATH",
                     help="a crucible-downstairs; the docker flavour builds an image around it")
    run.add_argument("--port-base", type=int, default=DSC_DEFAULT_PORT_BASE,
                     help=f"first downstairs port; busy ports are skipped (default {DSC_DEFAULT_PORT_BASE})")
    run.add_argument("--block-size", type=int, default=512)
    run.add_argument("--extent-size", type=int, default=131072, help="blocks per extent")
    run.add_argument("--extent-count", type=int, default=16)
    run.add_argument("--encrypted", action="store_true",
                     help="create the regions --encrypted (the VCR must then carry a key)")
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
    _artifacts_parser(sub)
    return parser


def _artifacts_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # --manifest/--artifact-dir are accepted before and after the action (`phd artifacts
    # --manifest M list` and `phd artifacts list --manifest M`); SUPPRESS keeps an action's
    # unset copy from overwriting the group's.
    def locations(parser: argparse.ArgumentParser, default: object) -> None:
        parser.add_argument("--manifest", type=Path, default=default,
                            help="artifact manifest (default: $PHD_MANIFEST, else the project's "
                            "artifacts/artifacts.toml here or in a parent folder, else phd's own)")
        parser.add_argument("--artifact-dir", type=Path, default=default,
                            help="artifact cache (default: $PHD_ARTIFACT_DIR, else ~/.cache/phd/artifacts)")

    art = sub.add_parser("artifacts", help="list, fetch, build and verify the manifest's artifacts")
    locations(art, None)
    art_sub = art.add_subparsers(dest="artifacts_cmd", required=True)
    listing = art_sub.add_parser("list", help="key, kind, source and cache state of every artifact")
    fetch = art_sub.add_parser("fetch", help="download and verify file artifacts (a recipe's KEY: "
                               "its inputs)")
    build = art_sub.add_parser("build", help="run recipes (fetching their inputs first)")
    verify = art_sub.add_parser("verify", help="re-hash cached files; exit 1 if any is bad")
    for action in (listing, fetch, build, verify):
        locations(action, argparse.SUPPRESS)
    for action in (fetch, build, verify):
        action.add_argument("keys", nargs="*", metavar="KEY", help="manifest keys (default: all)")
    build.add_argument("--force", action="store_true", help="rebuild even when the recipe's cache is current")


def _sweep() -> int:
    from phd.core.reaper import reap_dead_owners
    from phd.storage.downstairs import sweep_leftovers

    # Processes first (servers stop their VMs on SIGTERM), then containers and volumes.
    done = reap_dead_owners()
    try:
        import docker

        done += sweep_leftovers(docker.from_env(), keep_session="")
    except Exception as exc:  # noqa: BLE001 - no Docker engine: processes were still reaped
        done.append(f"containers not swept: Docker is not reachable ({exc})")
    print("\n".join(done) if done else "nothing to sweep")
    return 0


# --- phd dsc run -----------------------------------------------------------------------------
def _say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def _check_run_args(args: argparse.Namespace) -> None:
    from phd.core.errors import HarnessError
    from phd.core.ports import PAIR_OFFSET
    from phd.storage.dsc import parse_loopback

    parse_loopback(args.control)
    if args.count < 1:
        raise HarnessError(f"--count must be at least 1, got {args.count}")
    if not 1024 <= args.port_base <= 65535 - PAIR_OFFSET - args.count:
        raise HarnessError(f"--port-base {args.port_base} must leave room for {args.count} ports "
                           f"and their repair ports (+ {PAIR_OFFSET}) between 1024 and 65535")
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


def _dsc_config(args: argparse.Namespace) -> PhdConfig:
    """`phd dsc run` configured as pytest configures a session (phd.config: the PHD_*
    variables apply, this command's flags win), so it gets Docker, the image and labels from
    the same `Framework` tests use. A bad program or path is a ConfigError naming the flag."""
    from phd.config import build_config

    return build_config(
        {"downstairs": args.flavour, "downstairs_program": args.program,
         "downstairs_cmd": args.downstairs_cmd, "downstairs_binary": args.binary},
        project_dir=Path.cwd(), flags=_DSC_FLAGS)


_DSC_FLAGS = {"downstairs_program": "--program", "downstairs_cmd": "--downstairs-cmd",
              "downstairs_binary": "--binary", "downstairs": "--flavour"}


def _dsc_run(args: argparse.Namespace) -> int:
    from phd.core.ports import PAIR_OFFSET, PortAllocator
    from phd.framework import Framework
    from phd.storage.dsc import DownstairsSet, RegionGeometry, members_for

    _check_run_args(args)
    config = _dsc_config(args)  # a bad program or path fails before anything is made
    geometry = RegionGeometry(args.block_size, args.extent_size, args.extent_count, args.encrypted)
    args.dir.mkdir(parents=True, exist_ok=True)
    stop = _stop_on_signals()
    fw = Framework(config, f"dsc{uuidlib.uuid4().hex[:6]}")
    try:
        if args.flavour == "docker":
            _sweep_dead_sessions(fw)
        ports = PortAllocator(base=args.port_base, index=0,
                              size=min(200, 65536 - PAIR_OFFSET - args.port_base))
        members = members_for(fw, "phd dsc run", args.dir)
        started = time.monotonic()
        # Every downstairs also listens on port + 4000 (its repair server).
        dss = DownstairsSet(members, [ports.allocate_pair() for _ in range(args.count)],
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
    from phd.storage.downstairs import sweep_leftovers

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
    program = dss.member(0).program if len(dss) else None
    kind = f" {program.kind}" if program is not None else ""
    _say(f"{len(dss)} {args.flavour}{kind} downstairs up in {took_s:.2f}s; regions of {g.block_size} B "
         f"blocks x {g.extent_size} blocks/extent x {g.extent_count} extents "
         f"({g.size_bytes / (1 << 20):.0f} MiB each); logs in {args.dir}")
    for record in dss.describe():
        print(f"  ds{record['id']}  {record['target']}  {record['state']}  uuid {record['uuid']}"
              f"  ({record['name']})")
    print(f"targets: {' '.join(dss.targets)}")
    vcr = {"block_size": g.block_size, "blocks_per_extent": g.extent_size,
           "extent_count": g.extent_count, "encrypted": g.encrypted, "target": dss.targets}
    print(f"vcr: {json.dumps(vcr)}", flush=True)


def _serve(args: argparse.Namespace, dss: DownstairsSet, stop: threading.Event) -> int:
    from phd.storage.dsc import ControlServer, RandomStopper

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

    from phd.storage.dsc import parse_loopback

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


# --- phd artifacts ---------------------------------------------------------------------------
def _artifact_store(args: argparse.Namespace) -> ArtifactStore:
    """The store as the pytest plugin makes it (phd.config: --manifest > PHD_MANIFEST > the
    project's artifacts/artifacts.toml, from here upwards > phd's own), so the CLI sees the
    manifest and cache tests use."""
    from phd.artifacts.store import ArtifactStore
    from phd.config import build_config

    config = build_config({"manifest": args.manifest, "artifact_dir": args.artifact_dir},
                          project_dir=Path.cwd(), flags=_ARTIFACT_FLAGS)
    # Errors name this tool's options, not the pytest plugin's (--phd-manifest, ...).
    return ArtifactStore(config.manifest, config.artifact_dir, config.repo_root,
                         manifest_option="--manifest", artifact_dir_option="--artifact-dir")


_ARTIFACT_FLAGS = {"manifest": "--manifest", "artifact_dir": "--artifact-dir"}


def _printable(text: str) -> str:
    """``text`` as is, or repr()'d when it holds a tab, newline or control character (a
    file name found in the cache could forge output lines or terminal escapes)."""
    return text if text.isprintable() else repr(text)


def _artifacts(args: argparse.Namespace) -> int:
    try:
        return _artifacts_cmd(args)
    except OSError as exc:
        # The store turns what it expects into one-line HarnessErrors; this is the backstop
        # that keeps anything else (a full disk mid-listing, say) to one line too.
        print(f"phd: error: {_printable(str(exc))}", file=sys.stderr)
        return 1


def _artifacts_cmd(args: argparse.Namespace) -> int:
    from rich.console import Console

    store = _artifact_store(args)
    unknown = [key for key in getattr(args, "keys", []) if key not in store.entries]
    if unknown:
        print(f"phd: error: not in {store.manifest_path}: {', '.join(map(_printable, unknown))}; "
              f"known: {', '.join(sorted(store.entries))}", file=sys.stderr)
        return 2
    out, err = Console(), Console(stderr=True)
    if args.artifacts_cmd == "list":
        return _artifacts_list(store, out)
    if args.artifacts_cmd == "verify":
        return _artifacts_verify(store, args.keys or None, out)
    recipes = [k for k, e in store.entries.items() if e.source.recipe is not None]
    if args.artifacts_cmd == "build":
        return _artifacts_ensure(store, args.keys or recipes, err, force=args.force)
    # fetch: files only; a recipe's key stands for the files it takes as inputs.
    keys: list[str] = []
    for key in args.keys or [k for k in store.entries if k not in recipes]:
        keys += _file_inputs(store, key)
    return _artifacts_ensure(store, list(dict.fromkeys(keys)), err, force=False)


def _file_inputs(store: ArtifactStore, key: str) -> list[str]:
    entry = store.entries[key]
    if entry.source.recipe is None:
        return [key]
    return [k for ref in entry.source.inputs.values() for k in _file_inputs(store, ref)]


def _print_rows(out: Console, header: tuple[str, ...], rows: Sequence[tuple[str, ...]],
                title: str | None = None) -> None:
    """A rich table on a terminal; tab-separated lines otherwise (pipes, CI logs, tests),
    where a table would be cut to 80 columns and paths are what the reader needs."""
    from rich.table import Table

    if not out.is_terminal:
        # Straight to the file: rich would expand the tabs into spaces.
        out.file.writelines("\t".join(row) + "\n" for row in (header, *rows))
        return
    table = Table(*header, title=title, title_justify="left")
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _artifacts_list(store: ArtifactStore, out: Console) -> int:
    rows = [(key, str(entry.kind), _printable(entry.source.describe()), _printable(store.status(key)))
            for key, entry in store.entries.items()]
    _print_rows(out, ("key", "kind", "source", "state"), rows, title=str(store.manifest_path))
    out.print(f"manifest: {store.manifest_path}\nartifact dir: {store.artifact_dir}", markup=False,
              highlight=False, soft_wrap=True)
    return 0


def _artifacts_verify(store: ArtifactStore, keys: list[str] | None, out: Console) -> int:
    checks = store.verify(keys)
    rows = [(check.key or "(not in manifest)", check.status, _printable(str(check.path)), check.detail)
            for check in checks]
    _print_rows(out, ("key", "status", "path", "detail"), rows)
    bad = [c for c in checks if c.status == "bad"]
    if bad:
        # One line per bad file, with the store's fix: only what lives in the cache is ever
        # to be removed; a local_path's fix is the manifest.
        for check in bad:
            out.print(f"{check.key or '(not in manifest)'}: {_printable(str(check.path))}: {check.detail}; "
                      f"{check.fix}", markup=False, highlight=False, soft_wrap=True)
        out.print(f"{len(bad)} bad file(s); each line above says how to fix it", markup=False,
                  soft_wrap=True)
        return 1
    out.print(f"{sum(c.status == 'ok' for c in checks)} file(s) ok, none bad", markup=False, soft_wrap=True)
    return 0


def _artifacts_ensure(store: ArtifactStore, keys: list[str], err: Console, *, force: bool) -> int:
    from rich.console import RenderableType
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        SpinnerColumn,
        Task,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )
    from rich.text import Text

    from phd.core.errors import ArtifactUnavailable, HarnessError

    class BytesOnly(ProgressColumn):
        """Byte counts for downloads; nothing for a build (it has no total)."""

        def __init__(self, inner: ProgressColumn) -> None:
            super().__init__()
            self.inner = inner

        def render(self, task: Task) -> RenderableType:
            return Text("") if task.total is None else self.inner.render(task)

    failed: list[str] = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               BytesOnly(DownloadColumn()), BytesOnly(TransferSpeedColumn()), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as bars:
        sink = _RichProgress(bars)
        for key in keys:
            try:
                path = store.ensure(key, progress=sink, force=force)
            except (ArtifactUnavailable, HarnessError) as exc:
                failed.append(key)
                bars.console.print(f"{key}: {exc}", style="bold red", markup=False, highlight=False,
                                   soft_wrap=True)
            else:
                bars.console.print(f"{key}: {path}", style="green", markup=False, highlight=False,
                                   soft_wrap=True)
    if failed:
        err.print(f"{len(failed)} of {len(keys)} artifact(s) not available: {', '.join(failed)}",
                  markup=False, highlight=False, soft_wrap=True)
        return 1
    return 0


class _RichProgress:
    """`phd.artifacts.store.Progress` drawn with rich: a byte bar per download, a spinner per build
    whose text is the recipe's latest line (every line is also printed, for logs)."""

    def __init__(self, bars: Progress) -> None:
        self.bars = bars
        self.tasks: dict[str, tuple[TaskID, int | None]] = {}  # key -> (task, total bytes)

    def begin(self, key: str, what: str, total: int | None) -> None:
        self.tasks[key] = (self.bars.add_task(what, total=total), total)

    def advance(self, key: str, nbytes: int) -> None:
        if key in self.tasks:
            self.bars.advance(self.tasks[key][0], nbytes)

    def line(self, key: str, text: str) -> None:
        from rich.markup import escape

        # Recipes already prefix their lines with their name (`alpine: ...`).
        shown = text if text.startswith(f"{key}: ") else f"{key}: {text}"
        self.bars.console.print(shown, style="dim", markup=False, highlight=False, soft_wrap=True)
        if key in self.tasks:
            self.bars.update(self.tasks[key][0], description=escape(shown[:70]))

    def end(self, key: str) -> None:
        if key in self.tasks:
            task, total = self.tasks.pop(key)
            if total is None:
                # A build's spinner has no bytes to show once done; its result line says it all.
                self.bars.remove_task(task)
            else:
                self.bars.update(task, completed=total)
                self.bars.stop_task(task)


if __name__ == "__main__":
    sys.exit(main())
