"""A downstairs controller in the spirit of Crucible's `dsc`, for tests and humans.

`DownstairsSet` owns N downstairs of one flavour (processes or containers) serving regions
of one geometry, each with its own region uuid, on ports the caller hands in (from
`phd.core.ports`). A test drives single members (`kill(1)`, `start(1)`), injects a random fault
(`random_fault(rng)` -> "pause 2"), brings everything back (`heal()`) and, for a
replacement, adds a member with a fresh region (`add()`). Every action lands in a step log
so a failing test can print what the controller did and when.

Every Crucible disk is built on a set (`DiskFactory.create_crucible_disk`): the set owns the
disk's downstairs, spares included, and its `RegionGeometry` is the one geometry type of a
disk, a set and the `phd dsc run` command line.

`ControlServer` exposes a set over a small loopback HTTP API and `RandomStopper` kills and
restarts a random member at random intervals; `phd dsc run` wires the three together.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from phd.core.errors import HarnessError, PhdError
from phd.core.teardown import Teardown, note_undo_failure, raise_together
from phd.storage.downstairs import (
    OURS,
    DockerDownstairs,
    Downstairs,
    DsProgram,
    DsState,
    ProcessDownstairs,
)

if TYPE_CHECKING:  # the session object, for annotations only: phd.framework is above this layer
    from phd.framework import Framework

__all__ = [
    "ACTIONS",
    "ControlServer",
    "DownstairsSet",
    "MemberFactory",
    "RandomStopper",
    "RegionGeometry",
    "Step",
    "docker_members",
    "members_for",
    "parse_loopback",
    "process_members",
]

# Member actions, in the order a human reads them; each is a DownstairsSet method taking i.
ACTIONS = ("start", "stop", "kill", "restart", "pause", "resume")
FAULTS = ("kill", "stop", "pause")

# (member index, port) -> a downstairs that has neither a region nor a process yet.
MemberFactory = Callable[[int, int], Downstairs]


@dataclass(frozen=True)
class RegionGeometry:
    """The shape of a region, the same for every downstairs of a set (and so of a disk): what
    `create` is given and what a VCR's region names (`blocks_per_extent` is `extent_size`)."""

    block_size: int = 512
    extent_size: int = 131072  # blocks per extent, as the downstairs CLI counts it
    extent_count: int = 16
    encrypted: bool = False  # regions created `--encrypted`: only a VCR with a key activates them

    def __post_init__(self) -> None:
        if self.block_size < 512 or self.block_size & (self.block_size - 1):
            raise HarnessError(f"block size must be a power of two >= 512, got {self.block_size}")
        if self.extent_size <= 0 or self.extent_count <= 0:
            raise HarnessError(f"extent size and count must be positive, got {self.extent_size} "
                               f"blocks x {self.extent_count} extents")

    @classmethod
    def of_size(cls, size_bytes: int, *, block_size: int = 512, extent_bytes: int = 64 << 20,
                encrypted: bool = False) -> RegionGeometry:
        """The geometry of a disk of `size_bytes` in extents of `extent_bytes`; both must divide."""
        if extent_bytes <= 0 or extent_bytes % block_size or size_bytes % extent_bytes:
            raise HarnessError(f"size {size_bytes} must be a multiple of the extent size "
                               f"{extent_bytes}, itself a multiple of the block size {block_size}")
        return cls(block_size, extent_bytes // block_size, size_bytes // extent_bytes, encrypted)

    @property
    def extent_bytes(self) -> int:
        return self.block_size * self.extent_size

    @property
    def size_bytes(self) -> int:
        return self.block_size * self.extent_size * self.extent_count


@dataclass(frozen=True)
class Step:
    at_s: float  # when the action began, in seconds since the set was made (monotonic)
    action: str  # "start", "kill", ..., or "kill FAILED: <why>"
    member: int
    took_s: float = 0.0

    def __str__(self) -> str:
        return f"+{self.at_s:8.3f}s ds{self.member} {self.action} ({self.took_s:.3f}s)"


# --- member factories: how a set makes one downstairs -------------------------------------------
def process_members(cmd: Sequence[str], root: Path, *, program: DsProgram = OURS,
                    prefix: str | None = None) -> MemberFactory:
    """Processes named `ds<i>` (`<prefix>-ds<i>` with a prefix), each with its region in
    `root/<name>` and its log in `root/<name>.log`."""
    def make(i: int, port: int) -> Downstairs:
        name = f"{prefix}-ds{i}" if prefix else f"ds{i}"
        return ProcessDownstairs(list(cmd), name, port, root / name, root / f"{name}.log",
                                 program=program)
    return make


def docker_members(client: Any, image: str, labels: dict[str, str], prefix: str, *,
                   log_dir: Path | None = None, program: DsProgram = OURS) -> MemberFactory:
    """Containers named `<prefix>-ds<i>` (volumes `<prefix>-ds<i>-data`) carrying `labels`, on
    the host's network (see `DockerDownstairs`)."""
    def make(i: int, port: int) -> Downstairs:
        log = None if log_dir is None else log_dir / f"ds{i}.log"
        return DockerDownstairs(client, image, f"{prefix}-ds{i}", port, labels, log, program=program)
    return make


def members_for(fw: Framework, node_id: str, directory: Path, *,
                prefix: str | None = None) -> MemberFactory:
    """Members of the session's flavour (`--phd-downstairs`) and program, as a disk's
    downstairs are made (DiskFactory): containers of the framework's image carrying its
    labels for `node_id`, or processes with their regions and logs in `directory`.
    prefix: names members `<prefix>-ds<i>` (containers must have unique names: by default
    `phd-<session>-<random>`; processes are `ds<i>` without one). Give each member a port
    pair (`PortAllocator.allocate_pair`): its repair port is + 4000."""
    cfg = fw.config
    program = cfg.downstairs_program
    if cfg.downstairs == "docker":
        # The output mode `null` keeps no container logs (a process's log is its readiness).
        log_dir = None if cfg.output_mode == "null" else directory
        return docker_members(fw.docker(), fw.downstairs_image(program), fw.labels(node_id),
                              prefix or f"phd-{fw.session_id}-{uuidlib.uuid4().hex[:6]}",
                              log_dir=log_dir, program=program)
    return process_members(program.cmd, directory, program=program, prefix=prefix)


# --- the set ----------------------------------------------------------------------------------
class DownstairsSet:
    """N downstairs (default 3) of one flavour and geometry; a context manager.

    Members are numbered in creation order; `add()` appends one. Every public method is
    thread safe (the control API and the random stopper act from their own threads).
    """

    def __init__(self, make_member: MemberFactory, ports: Sequence[int], *, count: int = 3,
                 geometry: RegionGeometry | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if count < 1:
            raise HarnessError(f"a downstairs set needs at least one member, got count={count}")
        if len(ports) < count:
            raise HarnessError(f"{count} members need {count} ports, got {len(ports)}: {list(ports)}")
        if len(set(ports)) != len(ports):
            raise HarnessError(f"ports must be distinct, got {list(ports)}")
        self._make = make_member
        self._ports = list(ports)
        self._count = count
        self.geometry = geometry or RegionGeometry()
        self._clock = clock
        self._t0 = clock()
        self._members: list[Downstairs] = []
        self._uuids: list[str] = []
        self.steps: list[Step] = []
        self._lock = threading.RLock()
        self._opened = False
        self._closed = False

    # --- lifecycle of the whole set -------------------------------------------------------
    def open(self) -> DownstairsSet:
        """Create the regions and start every member side by side; undoes itself on failure."""
        with self._lock:
            self._check_open("open", opening=True)
            self._opened = True
            try:
                new = [self._new_member() for _ in range(self._count)]
                self._bring_up(new)
            except BaseException as exc:
                self._close_after(exc)
                raise
            return self

    def _bring_up(self, members: list[int]) -> None:
        # Each start is mostly waiting (on Docker, or on a Python interpreter starting), so
        # members come up in parallel; every error is collected before anything is undone.
        with ThreadPoolExecutor(max_workers=len(members), thread_name_prefix="phd-dsc") as pool:
            futures = [pool.submit(self._create_and_start, i) for i in members]
        raise_together([exc for f in futures if (exc := f.exception()) is not None],
                       "starting downstairs")

    def _new_member(self) -> int:
        i = len(self._members)
        if i >= len(self._ports):
            raise HarnessError(f"no spare port for member {i}: the set was given {len(self._ports)} "
                               "ports; pass more, or add(port=...)")
        self._members.append(self._make(i, self._ports[i]))
        self._uuids.append(str(uuidlib.uuid4()))
        return i

    def _create(self, i: int) -> None:
        g = self.geometry
        self._step("create", i, lambda: self._members[i].create_region(
            self._uuids[i], g.block_size, g.extent_size, g.extent_count, encrypted=g.encrypted))

    def _create_and_start(self, i: int) -> None:
        self._create(i)
        self._step("start", i, self._members[i].start)

    def add(self, *, port: int | None = None, start: bool = True) -> int:
        """A new member with a fresh region (a replacement target); returns its index."""
        with self._lock:
            self._check_open("add a member to")
            if port is not None:
                if port in self._ports[:len(self._members)]:
                    raise HarnessError(f"port {port} is already used by a member of this set")
                with contextlib.suppress(ValueError):
                    self._ports.remove(port)  # it was a spare: use it now
                self._ports.insert(len(self._members), port)
            i = self._new_member()
            if start:
                self._create_and_start(i)
            else:
                self._create(i)
            return i

    def close(self) -> None:
        """Destroy every member (in every state), then raise all the errors together."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            teardown = Teardown("tearing down the downstairs set")
            for i, ds in enumerate(self._members):
                with teardown.step():
                    self._step("destroy", i, ds.destroy)
            try:
                teardown.finish()
            except BaseException as exc:
                exc.add_note(f"steps:\n{self.format_steps()}")
                raise

    def _close_after(self, exc: BaseException) -> None:
        """Tear down while `exc` propagates: `exc` stays the error, teardown errors become a note."""
        try:
            self.close()
        except BaseException as teardown:  # noqa: BLE001 - kept on `exc`, which stays the error
            note_undo_failure(exc, "tearing the downstairs set down", teardown)

    def __enter__(self) -> DownstairsSet:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
        else:
            self._close_after(exc)

    # --- members --------------------------------------------------------------------------
    @property
    def targets(self) -> list[str]:
        """Every member's `127.0.0.1:PORT`, in member order (added members last)."""
        with self._lock:
            return [ds.address for ds in self._members]

    def __len__(self) -> int:
        return len(self._members)

    def member(self, i: int) -> Downstairs:
        with self._lock:
            if not 0 <= i < len(self._members):
                raise HarnessError(f"no member {i}: this set has members 0..{len(self._members) - 1}")
            return self._members[i]

    def region_uuid(self, i: int) -> str:
        self.member(i)
        return self._uuids[i]

    def states(self) -> list[DsState]:
        with self._lock:
            return [ds.state for ds in self._members]

    def describe(self) -> list[dict[str, Any]]:
        """One JSON-ready record per member (what `GET /state` returns)."""
        with self._lock:
            return [{"id": i, "name": ds.name, "target": ds.address, "state": str(ds.state),
                     "uuid": self._uuids[i]} for i, ds in enumerate(self._members)]

    def start(self, i: int) -> None:
        self._act("start", i)

    def stop(self, i: int) -> None:
        self._act("stop", i)

    def kill(self, i: int) -> None:
        self._act("kill", i)

    def restart(self, i: int) -> None:
        self._act("restart", i)

    def pause(self, i: int) -> None:
        self._act("pause", i)

    def resume(self, i: int) -> None:
        self._act("resume", i)

    def destroy(self, i: int) -> None:
        """Tear one member down for good (e.g. the target a replacement took out)."""
        self._act("destroy", i)

    def act(self, action: str, i: int) -> None:
        """Apply one of ACTIONS (or "destroy") to member i by name."""
        if action not in (*ACTIONS, "destroy"):
            raise HarnessError(f"unknown action {action!r}; use one of {(*ACTIONS, 'destroy')}")
        self._act(action, i)

    def _act(self, action: str, i: int) -> None:
        with self._lock:
            self._check_open(action)
            ds = self.member(i)
            self._step(action, i, getattr(ds, action))

    def random_fault(self, rng: random.Random) -> str:
        """Kill, stop or pause one running member, chosen by `rng`; returns e.g. "kill 1"."""
        with self._lock:
            self._check_open("inject a fault into")
            running = [i for i, s in enumerate(self.states()) if s is DsState.RUNNING]
            if not running:
                raise HarnessError(f"no running member to fault (states: {self.states()}); heal() first")
            i = rng.choice(running)
            action = rng.choice(FAULTS)
            self._act(action, i)
            return f"{action} {i}"

    def heal(self) -> list[str]:
        """Bring every member that is not destroyed back to running; returns what it did."""
        with self._lock:
            self._check_open("heal")
            done: list[str] = []
            errors: list[BaseException] = []
            for i, state in enumerate(self.states()):
                action = {DsState.PAUSED: "resume", DsState.STOPPED: "start",
                          DsState.NEW: "start"}.get(state)
                if action is None:
                    continue
                try:
                    self._act(action, i)
                    done.append(f"{action} {i}")
                except Exception as exc:  # noqa: BLE001 - heal every member, report all
                    errors.append(exc)
            if errors:
                raise HarnessError(f"heal failed for {len(errors)} member(s): {errors}\n"
                                   f"steps:\n{self.format_steps()}")
            return done

    # --- bookkeeping ----------------------------------------------------------------------
    def _check_open(self, what: str, *, opening: bool = False) -> None:
        if self._closed:
            raise HarnessError(f"cannot {what} the downstairs set: it is closed")
        if opening and self._opened:
            raise HarnessError("the downstairs set is already open")
        if not opening and not self._opened:
            raise HarnessError(f"cannot {what} the downstairs set before open() (or `with`)")

    def _step(self, action: str, i: int, fn: Callable[[], None]) -> None:
        at = self._clock() - self._t0
        try:
            fn()
        except BaseException as exc:
            self.steps.append(Step(at, f"{action} FAILED: {exc}"[:300], i, self._clock() - self._t0 - at))
            raise
        self.steps.append(Step(at, action, i, self._clock() - self._t0 - at))

    def format_steps(self) -> str:
        """The step log in time order (members brought up together finish out of order)."""
        return "\n".join(str(s) for s in sorted(self.steps, key=lambda s: s.at_s)) or "(no steps)"


# --- the control API -----------------------------------------------------------------------------
def parse_loopback(address: str) -> tuple[str, int]:
    """`127.x.y.z:PORT` -> (host, port); anything off loopback is refused."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise HarnessError(f"control address {address!r} must look like 127.0.0.1:PORT")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise HarnessError(f"control address {address!r}: {host!r} is not an IP address; "
                           "use 127.0.0.1:PORT") from None
    if ip.version != 4 or not ip.is_loopback:
        raise HarnessError(f"control address {address!r} is not on IPv4 loopback: the control "
                           "API has no authentication, so it only listens on 127.0.0.0/8; "
                           "use 127.0.0.1:PORT")
    return host, int(port_text)


class _Handler(BaseHTTPRequestHandler):
    server: _ControlHttpServer

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log(f"control: {self.address_string()} {format % args}")

    def _reply(self, status: HTTPStatus, body: object) -> None:
        data = json.dumps(body, indent=1).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        dss = self.server.dss
        if self.path.rstrip("/") == "/state":
            self._reply(HTTPStatus.OK, {"members": dss.describe(), "targets": dss.targets,
                                        "steps": [str(s) for s in dss.steps[-50:]]})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": "not_found", "message":
                        "known: GET /state, POST /ds/{i}/{" + "|".join(ACTIONS) + "}"})

    def do_POST(self) -> None:
        parts = self.path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "ds" or not parts[1].isdigit():
            self._reply(HTTPStatus.NOT_FOUND, {"error": "not_found", "message":
                        "use POST /ds/{i}/{" + "|".join(ACTIONS) + "}"})
            return
        i, action = int(parts[1]), parts[2]
        if action not in ACTIONS:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": "unknown_action", "message":
                        f"unknown action {action!r}; use one of {list(ACTIONS)}"})
            return
        dss = self.server.dss
        if not 0 <= i < len(dss):
            self._reply(HTTPStatus.NOT_FOUND, {"error": "no_such_member", "message":
                        f"no member {i}: members are 0..{len(dss) - 1}"})
            return
        try:
            dss.act(action, i)
        except PhdError as exc:
            # the request was sound but the member cannot do it now (e.g. pause a stopped one)
            self._reply(HTTPStatus.CONFLICT, {"error": "refused", "message": str(exc)})
            return
        except Exception as exc:  # noqa: BLE001 - Docker API errors etc.: answer, do not hang up
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "failed", "message": repr(exc)})
            return
        self.server.log(f"ds{i}: {action} -> {dss.member(i).state}")
        self._reply(HTTPStatus.OK, {"id": i, "action": action, "state": str(dss.member(i).state)})


class _ControlHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], dss: DownstairsSet,
                 log: Callable[[str], None]) -> None:
        super().__init__(address, _Handler)
        self.dss = dss
        self.log = log


class ControlServer:
    """`GET /state`, `POST /ds/{i}/{action}` on a loopback address, served from a thread."""

    def __init__(self, dss: DownstairsSet, address: str,
                 log: Callable[[str], None] = lambda _line: None) -> None:
        host, port = parse_loopback(address)
        try:
            self._httpd = _ControlHttpServer((host, port), dss, log)
        except OSError as exc:
            raise HarnessError(f"cannot listen on {address} for the control API: {exc}; "
                               "pick another --control port") from None
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="phd-dsc-control",
                                        daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"{host!s}:{port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


class RandomStopper:
    """Like dsc's random stop: after a random delay, kill a random running member and start
    it again; repeat until closed. The delay is a schedule, not a synchronisation."""

    def __init__(self, dss: DownstairsSet, min_s: float, max_s: float, rng: random.Random,
                 log: Callable[[str], None] = lambda _line: None) -> None:
        if not 0 < min_s <= max_s:
            raise HarnessError(f"random stop interval needs 0 < min <= max, got {min_s}..{max_s}")
        self._dss, self._min, self._max, self._rng, self._log = dss, min_s, max_s, rng, log
        self._stop = threading.Event()
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._loop, name="phd-dsc-random-stop", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._rng.uniform(self._min, self._max)):
            try:
                self._once()
            except Exception as exc:  # noqa: BLE001 - reported; the next round tries again
                self.errors.append(exc)
                self._log(f"random stop: {exc}")

    def _once(self) -> None:
        running = [i for i, s in enumerate(self._dss.states()) if s is DsState.RUNNING]
        if not running:
            self._log("random stop: no running member, skipping this round")
            return
        i = self._rng.choice(running)
        self._dss.kill(i)
        self._log(f"random stop: killed ds{i}")
        if not self._stop.is_set():
            self._dss.start(i)
            self._log(f"random stop: restarted ds{i}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
