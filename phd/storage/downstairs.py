"""Downstairs processes for Crucible disks: in Docker containers (default) or as processes.

Both flavours run the same CONTRACT command line (`create ...`, then `run ...`) and listen
on a loopback port from the worker's range, so a VCR target is always `127.0.0.1:PORT`.

Each handle owns what it started and has one lifecycle, whatever the flavour:

    new --create_region, start--> running <--pause/resume--> paused
                                   |  ^
                       stop / kill |  | start / restart   (same port, same region)
                                   v  |
                                  stopped        any state --destroy--> destroyed

`stop()` is graceful (SIGTERM), `kill()` is a crash (SIGKILL); both keep the region (the
Docker volume or the data directory), so `start()` serves the same data again. The
lifecycle rules live in `_Lifecycle`; a flavour only supplies the primitives (launch,
terminate, SIGKILL, freeze, thaw, observe). `state` is read from the real process or
container each time, so a downstairs that died on its own shows `stopped`.
`destroy()` is idempotent, works in every state and never stops at the first error.
Containers and volumes carry the CONTRACT labels so a sweeper can find the leftovers of a
killed run.

Every downstairs speaks Crucible's protocol (message version 13). Which one runs is a
*program* (`DsProgram`), the same for both flavours:
- `ours` (the default): `python -m sut.storage.downstairs`, image `phd-downstairs:<hash>`;
- `binary`: a real `crucible-downstairs` executable (`--phd-downstairs-cmd` runs it as a
  process, `--phd-downstairs-binary` in containers of an image built around it).
A downstairs also listens on its repair port, port + 4000, which the OTHER downstairs of a
disk download extents from (the upstairs passes on the address a downstairs named in its
YesItsMe). So every downstairs takes a port pair (`PortAllocator.allocate_pair`) and its
container uses the host's network, bound to 127.0.0.1, where that address is reachable.
Readiness: the JSON `listening` line of our downstairs; for the real binary (bunyan JSON,
logged asynchronously) a TCP connect to its port succeeding.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from phd.core.errors import HarnessError, ProcessStartFailure, SutError, SutTimeout
from phd.core.process import ManagedProcess, ReadyCheck, ready_when_connects
from phd.core.teardown import Teardown
from phd.core.wait import wait_until

__all__ = [
    "OURS",
    "PROGRAM_KINDS",
    "REPAIR_PORT_OFFSET",
    "DockerDownstairs",
    "Downstairs",
    "DownstairsStartFailure",
    "DsProgram",
    "DsState",
    "ProcessDownstairs",
    "binary_program",
    "check_binary",
    "choose_program",
    "default_process_cmd",
    "default_program",
    "sweep_leftovers",
]

READY_EVENT = "listening"  # the downstairs logs a JSON line with this event once it accepts
START_TIMEOUT_S = 30.0
# How often a start's wait asks Docker how the container is (see DockerDownstairs._wait_listening)
DOCKER_POLL_S = 0.5
STOP_TIMEOUT_S = 10.0
REPAIR_PORT_OFFSET = 4000  # a Crucible downstairs' repair server: its port + 4000
ProgramKind = Literal["ours", "binary"]
PROGRAM_KINDS: tuple[ProgramKind, ...] = ("ours", "binary")
# Program names that are gone, and what to use instead (named in the UsageError).
_GONE_KINDS = {
    "legacy": "the legacy program and its protocol were removed: every downstairs speaks "
              "Crucible's protocol v13; use ours (the default) or binary",
    "ours13": "ours13 is now called ours (the default)",
}
BINARY_CHECK_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class DsProgram:
    """Which downstairs runs: its kind and the command a process downstairs starts with
    (`create ...` / `run ...` follow). A container of it runs the program's image."""

    kind: ProgramKind
    cmd: tuple[str, ...]
    binary: Path | None = None  # the executable of kind "binary"

    @property
    def ready(self) -> Literal["log", "connect"]:
        """How a start is known to be done: our JSON `listening` line, or a TCP connect."""
        return "connect" if self.kind == "binary" else "log"

    @property
    def init(self) -> bool:
        """Needs Docker's init as pid 1: the binary ignores SIGTERM when it is pid 1."""
        return self.kind == "binary"

    def describe(self) -> str:
        return f"{self.kind} ({self.binary or ' '.join(self.cmd)})"


def default_process_cmd() -> list[str]:
    return [sys.executable, "-m", "sut.storage.downstairs"]


OURS = DsProgram("ours", tuple(default_process_cmd()))


def binary_program(path: Path) -> DsProgram:
    """A real crucible-downstairs; check it first with `check_binary`."""
    resolved = path.resolve()
    return DsProgram("binary", (str(resolved),), resolved)


def default_program() -> DsProgram:
    """The program the suite runs when none is chosen: our downstairs."""
    return OURS


def choose_program(*, flavour: str, kind: str | None = None, cmd: str | None = None,
                   binary: str | None = None, binary_implies: bool = True,
                   names: dict[str, str] | None = None) -> DsProgram:
    """The program a session (or `phd dsc run`) runs, from its options; HarnessError naming
    the option and the fix when they are wrong or contradict each other.

    kind: ours / binary, or None to infer it: `binary` when `cmd` is a single path to an ELF
    executable or `binary` is given (and `binary_implies`), else `ours`. cmd: the process
    command line (a multi-word one, or a script, is a wrapper around our downstairs).
    binary: a crucible-downstairs; containers are built around it.
    """
    n = {"kind": "--phd-downstairs-program", "cmd": "--phd-downstairs-cmd",
         "binary": "--phd-downstairs-binary", "flavour": "--phd-downstairs", **(names or {})}
    if kind is not None and kind not in PROGRAM_KINDS:
        why = _GONE_KINDS.get(kind, f"use one of {', '.join(PROGRAM_KINDS)}")
        raise HarnessError(f"{n['kind']} {kind!r} is unknown: {why}")
    argv = shlex.split(cmd) if cmd else []
    cmd_binary: Path | None = None
    if argv and ("/" in argv[0] or Path(argv[0]).exists()):
        first = Path(argv[0])
        if not first.exists():
            raise HarnessError(f"{n['cmd']} {cmd!r}: {first} does not exist; give the path of the "
                               "downstairs executable (a crucible-downstairs, or a wrapper script)")
        if not os.access(first, os.X_OK) or not first.is_file():
            raise HarnessError(f"{n['cmd']} {cmd!r}: {first} is not an executable file: `chmod +x {first}`")
        if len(argv) == 1 and _is_elf(first):
            cmd_binary = first
    binary_path = Path(binary) if binary else None
    if kind is None:
        kind = "binary" if cmd_binary or (binary_path and binary_implies) else default_program().kind
    if kind == "ours":
        if cmd_binary is not None:
            raise HarnessError(f"{n['cmd']} {cmd!r} is an executable binary (a crucible-downstairs?), "
                               f"which the {kind} program is not: add {n['kind']} binary, or give "
                               f"the {kind} downstairs' command line")
        if binary_path is not None and binary_implies:
            raise HarnessError(f"{n['binary']} {binary!r} names a crucible-downstairs for the binary "
                               f"program, not {kind}: drop it or use {n['kind']} binary")
        return DsProgram("ours", tuple(argv)) if argv else OURS
    if flavour == "docker":
        if binary_path is None:
            raise HarnessError(f"containers of a crucible-downstairs need {n['binary']} PATH (an "
                               f"image is built around it); {n['cmd']} runs PROCESS downstairs: add "
                               f"{n['flavour']} process")
        return _checked_binary(binary_path, n["binary"])
    if argv:
        if len(argv) != 1:
            raise HarnessError(f"{n['cmd']} {cmd!r}: the binary program takes the path of the "
                               "crucible-downstairs alone, no arguments")
        return _checked_binary(Path(argv[0]), n["cmd"])
    if binary_path is not None:
        return _checked_binary(binary_path, n["binary"])
    raise HarnessError(f"{n['kind']} binary needs a crucible-downstairs: {n['cmd']} PATH (process "
                       f"downstairs) or {n['binary']} PATH (containers)")


def _is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _checked_binary(path: Path, option: str) -> DsProgram:
    try:
        check_binary(path)
    except HarnessError as exc:
        raise HarnessError(f"{option} {str(path)!r}: {exc}") from None
    return binary_program(path)


def check_binary(path: Path) -> str:
    """Check that `path` is a crucible-downstairs we can run; returns what it says about its
    version. Raises HarnessError naming the problem and the fix."""
    if not path.exists():
        raise HarnessError(f"{path} does not exist: give the path of a crucible-downstairs "
                           "executable (build it with `cargo build --release -p crucible-downstairs`)")
    if not path.is_file():
        raise HarnessError(f"{path} is not a regular file: give the crucible-downstairs executable itself")
    if not os.access(path, os.X_OK):
        raise HarnessError(f"{path} is not executable: `chmod +x {path}`")
    if not _is_elf(path):
        raise HarnessError(f"{path} is not an ELF executable (a script or data file?): give the "
                           "crucible-downstairs binary itself; a wrapper script around our downstairs goes "
                           "in --phd-downstairs-cmd without --phd-downstairs-program binary")
    answers = []
    for argv in ([str(path), "version"], [str(path), "--help"]):
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,  # noqa: S603
                                  text=True, timeout=BINARY_CHECK_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            answers.append(f"`{' '.join(argv)}`: {exc}")
            continue
        out = proc.stdout + proc.stderr
        if argv[-1] == "version" and proc.returncode == 0 and "Version" in out:
            return out.strip()
        # clap prints the usage and exits 1 (or 0) on --help
        if argv[-1] == "--help" and "Usage:" in out and " run" in out and " create" in out:
            return out.strip().splitlines()[0]
        answers.append(f"`{' '.join(argv)}` exited {proc.returncode}: {out.strip()[-300:]!r}")
    raise HarnessError(f"{path} does not answer like a crucible-downstairs (`version` or `--help`): "
                       f"{'; '.join(answers)}; check that it is the right binary and that its "
                       "libraries are installed (`ldd {path}`; Crucible needs libsqlite3-0)")


class DsState(enum.StrEnum):
    NEW = "new"  # created (maybe with its region), never started
    RUNNING = "running"
    PAUSED = "paused"  # frozen: connections are accepted by the kernel but never answered
    STOPPED = "stopped"  # exited (stop, kill or a crash); the region is kept
    DESTROYED = "destroyed"  # torn down; no operation but destroy() is allowed


class Downstairs(Protocol):
    name: str
    host_port: int
    program: DsProgram

    @property
    def address(self) -> str: ...
    @property
    def repair_address(self) -> str: ...
    @property
    def state(self) -> DsState: ...
    @property
    def encrypted(self) -> bool: ...
    def create_region(self, uuid: str, block_size: int, extent_size: int, extent_count: int, *,
                      encrypted: bool = False) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def restart(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def destroy(self) -> None: ...
    def logs(self) -> str: ...


def _region_args(uuid: str, block_size: int, extent_size: int, extent_count: int,
                 data_dir: str, encrypted: bool = False) -> list[str]:
    """`create` argv; `--encrypted` makes a region only an upstairs with a key may activate
    (both programs take it; Crucible answers a mismatch with EncryptedMismatch)."""
    return ["create", "-u", uuid, "-d", data_dir, "--block-size", str(block_size),
            "--extent-size", str(extent_size), "--extent-count", str(extent_count),
            *(["--encrypted"] if encrypted else [])]


_ENTRYPOINTS: dict[str, list[str]] = {}


def _entrypoint(client: Any, image: str) -> list[str]:
    """The image's entrypoint (asked of Docker once per image and process)."""
    if image not in _ENTRYPOINTS:
        config = client.images.get(image).attrs.get("Config") or {}
        _ENTRYPOINTS[image] = list(config.get("Entrypoint") or [])
    return _ENTRYPOINTS[image]


def _listening_count(log_text: str) -> int:
    """How many times the downstairs has reported that it listens (once per start)."""
    count = 0
    for line in log_text.splitlines():
        if READY_EVENT not in line:
            continue
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            if json.loads(line).get("event") == READY_EVENT:
                count += 1
    return count


class _Lifecycle:
    """The state rules shared by both flavours; subclasses supply the primitives."""

    name: str
    host_port: int

    def __init__(self, program: DsProgram = OURS) -> None:
        self.program = program
        self._region_ready = False
        self._encrypted = False
        self._destroyed = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.host_port}"

    @property
    def repair_address(self) -> str:
        """Where the downstairs serves extents to the others (port + 4000)."""
        return f"127.0.0.1:{self.host_port + REPAIR_PORT_OFFSET}"

    @property
    def state(self) -> DsState:
        return DsState.DESTROYED if self._destroyed else self._observe()

    @property
    def encrypted(self) -> bool:
        """Whether its region was created `--encrypted` (only a VCR with a key activates it)."""
        return self._encrypted

    # --- operations -------------------------------------------------------------------------
    def create_region(self, uuid: str, block_size: int, extent_size: int, extent_count: int, *,
                      encrypted: bool = False) -> None:
        state = self._usable("create a region in")
        if self._region_ready or state is not DsState.NEW:
            raise HarnessError(f"downstairs {self.name} already has a region; a downstairs serves "
                               "exactly one region - make a new downstairs for another")
        self._create_region(uuid, block_size, extent_size, extent_count, encrypted)
        self._region_ready = True
        self._encrypted = encrypted

    def start(self) -> None:
        """Serve the region on the same port; a no-op when already running."""
        state = self._usable("start")
        if state is DsState.RUNNING:
            return
        if state is DsState.PAUSED:
            raise HarnessError(f"downstairs {self.name} is paused: resume() it (or restart() it)")
        if not self._region_ready:
            raise HarnessError(f"downstairs {self.name} has no region yet: call create_region() "
                               "before start()")
        self._launch()

    def stop(self) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after a grace period); the region is kept."""
        state = self._usable("stop")
        if state in (DsState.RUNNING, DsState.PAUSED):
            self._terminate(paused=state is DsState.PAUSED)

    def kill(self) -> None:
        """A crash: SIGKILL, no chance to clean up; the region is kept."""
        state = self._usable("kill")
        if state in (DsState.RUNNING, DsState.PAUSED):
            self._sigkill(paused=state is DsState.PAUSED)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the downstairs: its socket stays open but nothing answers."""
        state = self._usable("pause")
        if state is DsState.PAUSED:
            return
        if state is not DsState.RUNNING:
            raise HarnessError(f"cannot pause downstairs {self.name}: it is {state}; start() it first")
        self._freeze()

    def resume(self) -> None:
        state = self._usable("resume")
        if state is DsState.RUNNING:
            return
        if state is not DsState.PAUSED:
            raise HarnessError(f"cannot resume downstairs {self.name}: it is {state}, not paused; "
                               "use start()")
        self._thaw()

    def destroy(self) -> None:
        """Tear down whatever state it is in; safe to call twice."""
        if self._destroyed:
            return
        self._destroyed = True
        self._teardown()

    def _usable(self, what: str) -> DsState:
        state = self.state
        if state is DsState.DESTROYED:
            raise HarnessError(f"cannot {what} downstairs {self.name}: it was destroyed; "
                               "make a new downstairs")
        return state

    # --- primitives of a flavour ------------------------------------------------------------
    def _observe(self) -> DsState:
        raise NotImplementedError

    def _create_region(self, uuid: str, block_size: int, extent_size: int, extent_count: int,
                       encrypted: bool) -> None:
        raise NotImplementedError

    def _launch(self) -> None:
        raise NotImplementedError

    def _terminate(self, *, paused: bool) -> None:
        raise NotImplementedError

    def _sigkill(self, *, paused: bool) -> None:
        raise NotImplementedError

    def _freeze(self) -> None:
        raise NotImplementedError

    def _thaw(self) -> None:
        raise NotImplementedError

    def _teardown(self) -> None:
        raise NotImplementedError

    def logs(self) -> str:
        raise NotImplementedError


class DockerDownstairs(_Lifecycle):
    """A downstairs in a container; its region lives in a named volume (`<name>-data`).

    The container shares the host's network namespace and the downstairs binds
    127.0.0.1:host_port (and its repair port, + 4000) itself: the other downstairs download
    extents from the 127.0.0.1 address it names in YesItsMe, and no proxy sits on the data path.
    """

    def __init__(self, client: Any, image: str, name: str, host_port: int,
                 labels: dict[str, str], log_path: Path | None, *,
                 program: DsProgram = OURS) -> None:
        super().__init__(program)
        self.client = client
        self.image = image
        self.name = name
        self.host_port = host_port
        self.labels = {**labels, "phd.role": "downstairs"}
        self.log_path = log_path
        self.volume_name = f"{name}-data"
        self._container: Any = None
        self._volume: Any = None
        self._pending_create: list[str] | None = None  # create argv its first start runs

    def _common(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"network_mode": "host"}
        if self.program.init:
            extra["init"] = True
        return {
            "volumes": {self.volume_name: {"bind": "/data", "mode": "rw"}},
            "read_only": True,  # only the region volume is writable
            "tmpfs": {"/tmp": "size=16m"},
            "labels": self.labels,
            **extra,
        }

    # --- readiness (a process downstairs is a ManagedProcess with its own ready check) ---
    def _seen(self) -> int:
        """What a start compares against: the log's `listening` lines so far (log readiness)."""
        return _listening_count(self.logs()) if self.program.ready == "log" else 0

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.host_port), timeout=1.0):
                return True
        except OSError:
            return False

    def _wait_listening(self, seen_before: int, probe: Callable[[], str | None]) -> None:
        """Wait until the log reports one more `listening` than before this start (our
        downstairs), or until a TCP connect to the port succeeds (the real binary).

        `probe()` returns an exit description once the downstairs has died: a dead
        downstairs never listens, so that ends the wait at once (`fatal`) with its log
        instead of after the whole timeout.

        Every 50 ms costs only a connect to the port (the container shares the host's network);
        Docker is asked (the log, the container's status) once the port answers, and otherwise
        every DOCKER_POLL_S. Asked every 50 ms (two API calls each time), the Docker daemon used
        1.28 CPU-s over four of the suite's Crucible tests, 0.99 now (quiet machine; a start
        waits longer, and so asks more often, on a loaded one).
        """
        last_docker = [0.0]

        def docker_due() -> bool:
            now = time.monotonic()
            if now - last_docker[0] < DOCKER_POLL_S:
                return False
            last_docker[0] = now
            return True

        def listening() -> bool:
            if not self._answers():
                return False
            if self.program.ready == "connect":
                return True
            return _listening_count(self.logs()) > seen_before

        def died() -> None:
            if not docker_due():
                return
            how = probe()
            if how is not None:
                raise SutError(f"downstairs {self.name} {how}; log tail:\n{self.logs()[-1500:]}")

        what = f"downstairs {self.name} to listen on {self.address}"
        try:
            wait_until(listening, lambda yes: yes, what=what, timeout_s=START_TIMEOUT_S, interval_s=0.05,
                       fatal=died, timeout_error=SutTimeout)
        except SutTimeout as exc:
            # what the wait saw last is only False: say what the port and Docker show now
            port = "answers" if self._answers() else "does not answer"
            raise SutTimeout(f"{what} (the port {port}, Docker says the container is "
                             f"{self._docker_status()}; log tail:\n{self.logs()[-1500:]})",
                             exc.timeout_s, exc.last_seen) from None

    def _run_argv(self) -> list[str]:
        return ["run", "-d", "/data", "-a", "127.0.0.1", "-p", str(self.host_port)]

    def _create_region(self, uuid: str, block_size: int, extent_size: int, extent_count: int,
                       encrypted: bool) -> None:
        import docker.errors

        self._volume = self.client.volumes.create(self.volume_name, labels=self.labels)
        create = _region_args(uuid, block_size, extent_size, extent_count, "/data", encrypted)
        if _entrypoint(self.client, self.image):
            # Created by the first start's container, before it runs (see _run_command): a
            # container of its own cost 0.3-0.4 s of CPU (Docker's part of a container's life
            # and the program's start-up), once per downstairs.
            self._pending_create = create
            return
        try:
            self.client.containers.run(self.image, create, name=f"{self.name}-create", remove=True,
                                       detach=False, **self._common())
        except docker.errors.ContainerError as exc:
            raise SutError(f"downstairs create in {self.name} failed (exit {exc.exit_status}): "
                           f"{(exc.stderr or b'').decode(errors='replace')[-1500:]}") from exc

    def _run_command(self) -> dict[str, Any]:
        """The container's command: ``run ...``; with a region still to create, a shell that
        runs the image's entrypoint with ``create ...`` unless /data already holds a region
        (a later start of the same container), then execs it with ``run ...`` (so the
        program is the container's process, as without the shell)."""
        if self._pending_create is None:
            return {"command": self._run_argv()}
        script = ('if [ ! -e /data/region.json ]; then "$@" ' + shlex.join(self._pending_create)
                  + ' || exit $?; fi; exec "$@" ' + shlex.join(self._run_argv()))
        return {"entrypoint": ["/bin/sh", "-c", script, "sh", *_entrypoint(self.client, self.image)],
                "command": []}

    def _docker_status(self) -> str:
        """Docker's status of our container, or "missing" when it is gone (removed by hand)."""
        import docker.errors

        if self._container is None:
            return "missing"
        try:
            self._container.reload()
        except docker.errors.NotFound:
            return "missing"
        return str(self._container.status)

    def _observe(self) -> DsState:
        if self._container is None:
            return DsState.NEW
        status = self._docker_status()
        if status in ("running", "restarting"):
            return DsState.RUNNING
        return DsState.PAUSED if status == "paused" else DsState.STOPPED

    def _launch(self) -> None:
        import docker.errors

        # Starting the same container again keeps its name, port, volume and log history.
        seen = self._seen()
        if self._docker_status() == "missing":
            # create, then start: if the start fails the container is already ours to
            # remove, where `containers.run` would leak it.
            self._container = self.client.containers.create(
                self.image, name=self.name, **self._run_command(), **self._common())
            seen = 0
        try:
            self._container.start()
        except docker.errors.APIError as exc:
            if self._pending_create is not None and "/bin/sh" in str(exc):
                raise HarnessError(f"Docker cannot start downstairs container {self.name}: {exc}; "
                                   f"image {self.image} needs /bin/sh (the first start creates the "
                                   "region through it)") from exc
            raise HarnessError(f"Docker cannot start downstairs container {self.name} on "
                               f"{self.address}: {exc.explanation or exc}; if the port is taken, "
                               "use another one") from exc
        self._wait_listening(seen, self._exited)

    def _exited(self) -> str | None:
        status = self._docker_status()
        if status in ("created", "running", "restarting"):
            return None
        code = self._container.attrs.get("State", {}).get("ExitCode") if self._container else None
        return f"container is {status} (exit code {code})"

    def _terminate(self, *, paused: bool) -> None:
        if paused:  # a frozen process cannot act on SIGTERM
            self._container.unpause()
        self._container.stop(timeout=int(STOP_TIMEOUT_S))

    def _sigkill(self, *, paused: bool) -> None:
        # Docker kills a paused container too (it thaws it for the SIGKILL).
        self._container.kill()
        wait_until(self._docker_status, lambda s: s not in ("running", "paused", "restarting"),
                   what=f"container {self.name} to exit after SIGKILL", timeout_s=STOP_TIMEOUT_S)

    def _freeze(self) -> None:
        self._container.pause()

    def _thaw(self) -> None:
        self._container.unpause()

    def logs(self) -> str:
        if self._container is None:
            return ""
        with contextlib.suppress(Exception):
            raw: bytes = self._container.logs()
            return raw.decode(errors="replace")
        return ""

    def _teardown(self) -> None:
        import docker.errors

        teardown = Teardown(f"tearing down downstairs {self.name}")
        if self._container is not None and self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.write_text(self.logs())
        container, self._container = self._container, None
        if container is not None:
            with teardown.step(), contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)  # SIGKILLs it, paused or not
        volume, self._volume = self._volume, None
        if volume is not None:
            # NotFound: already gone (a sweeper's work, or removed by hand).
            with teardown.step(), contextlib.suppress(docker.errors.NotFound):
                volume.remove(force=True)
        teardown.finish()


class DownstairsStartFailure(ProcessStartFailure, SutError):
    """A process downstairs exited, or never listened, while starting: the storage under
    test's fault (a bad region, a flag it refuses), with its exit code and log tail."""


class ProcessDownstairs(_Lifecycle):
    """A downstairs as a local process (`--phd-downstairs process`): no Docker needed.

    Each start is one `phd.core.process.ManagedProcess` (a restart is a new one on the same port
    and region, its output appended to the same log): its own session, a ledger entry, every
    signal to its process group (a wrapper script given as `--phd-downstairs-cmd` is stopped
    with its child), and a start that fails at once when the downstairs exits.
    """

    def __init__(self, cmd: list[str], name: str, host_port: int, data_dir: Path,
                 log_path: Path | None, *, program: DsProgram = OURS) -> None:
        super().__init__(program)
        self.cmd = cmd
        self.name = name
        self.host_port = host_port
        self.data_dir = data_dir
        self.log_path = log_path or (data_dir.parent / f"{name}.log")
        self._proc: ManagedProcess | None = None

    @property
    def pid(self) -> int | None:
        """The pid of the current (or last) process; None before the first start."""
        return None if self._proc is None else self._proc.pid

    def _create_region(self, uuid: str, block_size: int, extent_size: int, extent_count: int,
                       encrypted: bool) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(  # noqa: S603 - argv list
            [*self.cmd, *_region_args(uuid, block_size, extent_size, extent_count, str(self.data_dir),
                                      encrypted)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SutError(f"downstairs create for {self.name} failed: {proc.stderr[-1500:]}")

    def _observe(self) -> DsState:
        if self._proc is None:
            return DsState.NEW
        if not self._proc.alive():
            return DsState.STOPPED
        return DsState.PAUSED if _proc_stopped(self._proc.pid) else DsState.RUNNING

    def _launch(self) -> None:
        if self._proc is not None:
            self._proc.stop()  # the last life, if it died on its own: forget its ledger entry
        ready: ReadyCheck = (ready_when_connects(self.host_port) if self.program.ready == "connect"
                             else lambda proc: _listening_count(proc.output()) > 0)
        self._proc = ManagedProcess(
            [*self.cmd, "run", "-d", str(self.data_dir), "-a", "127.0.0.1", "-p", str(self.host_port)],
            name=f"downstairs {self.name}", log_path=self.log_path, ready=ready,
            ready_timeout_s=START_TIMEOUT_S, stop_timeout_s=STOP_TIMEOUT_S,
            start_error=DownstairsStartFailure)
        self._proc.start()

    def _running(self) -> ManagedProcess:
        assert self._proc is not None  # the lifecycle calls the primitives only after a launch
        return self._proc

    def _terminate(self, *, paused: bool) -> None:
        self._running().stop()  # SIGTERM and SIGCONT (a paused one), SIGKILL after the grace

    def _sigkill(self, *, paused: bool) -> None:
        self._running().kill()  # kills a SIGSTOPped process too

    def _freeze(self) -> None:
        proc = self._running()
        proc.signal(signal.SIGSTOP)
        wait_until(lambda: _proc_stopped(proc.pid), lambda stopped: stopped,
                   what=f"downstairs {self.name} (pid {proc.pid}) to stop on SIGSTOP", timeout_s=5.0,
                   interval_s=0.01)

    def _thaw(self) -> None:
        proc = self._running()
        proc.signal(signal.SIGCONT)
        wait_until(lambda: _proc_stopped(proc.pid), lambda stopped: not stopped,
                   what=f"downstairs {self.name} (pid {proc.pid}) to continue on SIGCONT",
                   timeout_s=5.0, interval_s=0.01)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _teardown(self) -> None:
        # The region directory stays: it belongs to the caller's directory (the test's
        # results directory, or `phd dsc run --dir`).
        if self._proc is not None:
            self._proc.stop()


def _proc_stopped(pid: int | None) -> bool:
    """Whether the process is in job-control stop (state T in /proc/PID/stat)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The command name (field 2) may hold spaces and parentheses; the state follows the last ")".
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


def sweep_leftovers(client: Any, keep_session: str) -> list[str]:
    """Remove containers and volumes of phd sessions whose owning process is gone."""
    removed: list[str] = []
    # ignore_removed: the list inspects each container it found, and another session may
    # remove its own in between (its teardown, or its sweep): that is no error of ours. Without
    # it such a race failed this session's first test on setup (seen with four sessions side
    # by side in ci/regressions).
    for container in client.containers.list(all=True, filters={"label": "phd.session"}, ignore_removed=True):
        labels = container.labels or {}
        if labels.get("phd.session") == keep_session or _owner_alive(labels):
            continue
        with contextlib.suppress(Exception):
            container.remove(force=True)
            removed.append(container.name)
    for volume in client.volumes.list(filters={"label": "phd.session"}):
        labels = volume.attrs.get("Labels") or {}
        if labels.get("phd.session") == keep_session or _owner_alive(labels):
            continue
        with contextlib.suppress(Exception):
            volume.remove(force=True)
            removed.append(volume.name)
    return removed


def _owner_alive(labels: dict[str, str]) -> bool:
    if labels.get("phd.host") != os.uname().nodename:
        return True  # not ours to judge: another machine's session
    try:
        os.kill(int(labels.get("phd.pid", "0")), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(labels.get("phd.pid", "0")) > 0
