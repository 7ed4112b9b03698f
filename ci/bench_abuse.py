"""Abuse benchmark: memory and service of the server and the downstairs under hostile load.

Usage: ci/bench abuse [--duration-s S] [--bodies N] [--half-open N] [--out PATH]

Two systems under abuse at once, each with a well-behaved client measured alongside:

  server      the reference server of a running tiny VM (started through the framework, as
              the suite does). Abuse: --bodies (default 100) concurrent clients, each sending
              PUT /instance with a 1 MiB body over and over, every one on a new connection.
              Half the bodies are 1 MiB of valid JSON that must be parsed (a wide array of
              numbers: the costliest thing the limits let through), half declare one byte more
              than the limit (answered 413 before the body is read). Well-behaved client:
              GET /instance back to back.
  downstairs  three downstairs processes serving a CrucibleBackend NBD export (a helper
              process, as in ci/bench storage). Abuse: --half-open (default 100) connections
              to EACH downstairs that send the head of a Crucible v13 HereIAm frame and part of
              its payload, then nothing (half declare Crucible's largest frame, 100 MiB, half
              one just under the 64 KiB cap before negotiation); a connection the downstairs
              closes is opened again at once.
              Well-behaved client: 4 KiB NBD reads and writes at random offsets, one at a
              time, through the export (upstairs -> all three downstairs).

The abusers run in child processes (this file, ``_abuse_http`` / ``_abuse_wire`` modes) so
their own CPU use shows as load on the machine, not as delays inside the measuring client.

Figures (results/bench-abuse.json):
  server_peak_rss_mb          the server's VmHWM (peak resident set) at the end
  downstairs_peak_rss_mb      the largest VmHWM of the three downstairs
  served_during_abuse_p99_ms  the larger of the two well-behaved clients' p99 during abuse
Targets (issue 12): each RSS under 300 MB, p99 under 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from bench_storage import local_downstairs, make_vcr, start_export
from benchlib import REPO, factories, framework, log

from phd.core.errors import HarnessError
from phd.core.process import ManagedProcess
from phd.core.teardown import Teardown
from phd.storage.downstairs import Downstairs, ProcessDownstairs
from phd.storage.dsc import DownstairsSet
from sut.storage import wire
from sut.storage.wire import messages as m

TARGETS = {"server_peak_rss_mb": 300.0, "downstairs_peak_rss_mb": 300.0, "served_during_abuse_p99_ms": 100.0}
MIB = 1024 * 1024
BODY_LIMIT = MIB  # the server's default --max-body-bytes
# Crucible's v13 framing (sut/storage/wire, ../shared/reference/crucible-wire.md): a u32
# little-endian frame length COUNTING ITS OWN 4 BYTES, then the bincode message (u32 LE variant
# index first; HereIAm is 0). Half the abusers declare Crucible's largest frame, 100 MiB (which
# the downstairs refuses at once: before negotiation its cap is 64 KiB); half declare a frame
# just under that cap, send half of it and stall (which it must hold until its handshake
# deadline without holding memory for what never comes).
_FRAME_LEN = struct.Struct("<I")
_DECLARED_FRAMES = (wire.MAX_FRAME, wire.NEGOTIATION_FRAME_CAP - 16 * 1024)


def half_open_head(declared: int) -> bytes:
    """The first bytes of a HereIAm frame whose length prefix says ``declared`` bytes: a real
    HereIAm's encoding (variant index and fields) under the inflated prefix, then zeros up to
    half the declared frame (at most 64 KiB); the rest never comes."""
    hello = wire.encode(m.HereIAm(wire.MESSAGE_VERSION, uuid.uuid4(), uuid.uuid4(), 1, False, False))
    body = hello[_FRAME_LEN.size:]
    sent = max(len(hello), min(declared // 2, 64 * 1024))
    return _FRAME_LEN.pack(declared) + body + bytes(sent - len(hello))


# -- measuring ---------------------------------------------------------------------------------
def rss_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of ``pid`` in MB (10^6 bytes); 0.0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def percentiles(samples_s: list[float]) -> dict[str, float | int]:
    if not samples_s:
        return {"count": 0}
    ms = sorted(s * 1000 for s in samples_s)
    return {
        "count": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
        "max_ms": round(ms[-1], 2),
    }


class Sampler(threading.Thread):
    """Runs ``probe`` back to back until stopped; keeps each call's duration and any error."""

    def __init__(self, name: str, probe: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self.probe = probe
        self.samples: list[float] = []
        self.errors: Counter[str] = Counter()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            t0 = time.perf_counter()
            try:
                self.probe()
            except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                self.errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
                continue
            self.samples.append(time.perf_counter() - t0)

    def take(self) -> tuple[list[float], Counter[str]]:
        """The samples so far, and start over (one phase ends, the next begins)."""
        samples, errors = self.samples, self.errors
        self.samples, self.errors = [], Counter()
        return samples, errors

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)


class NbdClient:
    """The smallest NBD client that does simple-reply reads and writes (fixed newstyle)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        greeting = self._recv(18)
        if greeting[:8] != b"NBDMAGIC":
            raise RuntimeError(f"not an NBD server: {greeting!r}")
        self.sock.sendall(struct.pack(">I", 1 | 2))  # fixed newstyle, no zeroes
        self.sock.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 0))  # EXPORT_NAME ""
        self.size = struct.unpack(">QH", self._recv(10))[0]
        self._handle = 0

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise RuntimeError("NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def _command(self, cmd: int, offset: int, length: int, data: bytes = b"") -> bytes:
        self._handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, cmd, self._handle, offset, length) + data)
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != 0x67446698 or handle != self._handle or error:
            raise RuntimeError(f"NBD reply magic {magic:#x} error {error} handle {handle}")
        return self._recv(length) if cmd == 0 else b""

    def read(self, offset: int, length: int) -> bytes:
        return self._command(0, offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._command(1, offset, len(data), data)

    def close(self) -> None:
        self.sock.close()


# -- abusers (child processes) -----------------------------------------------------------------
def _http_bodies() -> tuple[bytes, bytes]:
    """A 1 MiB JSON body that parses (a wide array of small numbers), and one byte too many."""
    # A v5 ensure body the server refuses (properties lack description and metadata: 400).
    head = json.dumps({"properties": {"id": str(uuid.uuid4()), "name": "abuse"},
                       "init": {"method": "Spec", "value": {"spec": {"board": {}, "components": {}}}},
                       "pad": []})
    head = head[: -len("[]}")] + "["
    fill = BODY_LIMIT - len(head) - len("]}")
    numbers = ("0," * (fill // 2))[:-1]
    body = (head + numbers + " " * (fill - len(numbers)) + "]}").encode()
    assert len(body) == BODY_LIMIT, len(body)
    return body, body + b" "


async def _abuse_http(port: int, workers: int, duration_s: float) -> dict[str, Any]:
    parsed, too_big = _http_bodies()
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + duration_s

    async def worker(i: int) -> None:
        body = parsed if i % 2 == 0 else too_big
        request = (f"PUT /instance HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as exc:
                outcomes[f"connect: {exc.strerror}"] += 1
                continue
            try:
                writer.write(request)
                await writer.drain()
                status = await asyncio.wait_for(reader.readline(), 30)
                outcomes[status.decode(errors="replace").split(" ", 2)[1] if status else "closed"] += 1
                await reader.read()
            except (TimeoutError, OSError, IndexError) as exc:
                outcomes[type(exc).__name__] += 1
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return {"responses": dict(outcomes), "workers": workers}


async def _abuse_wire(targets: list[str], per_target: int, duration_s: float) -> dict[str, Any]:
    heads = [half_open_head(declared) for declared in _DECLARED_FRAMES]
    closed_after: list[float] = []
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + duration_s

    async def holder(target: str, head: bytes) -> None:
        host, port = target.rsplit(":", 1)
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
            except OSError as exc:
                outcomes[f"connect: {exc.strerror}"] += 1
                continue
            opened = time.monotonic()
            try:
                writer.write(head)
                await writer.drain()
                # Hold the connection until the downstairs closes it or the run ends.
                left = deadline - time.monotonic()
                if left > 0 and await asyncio.wait_for(reader.read(), left) is not None:
                    closed_after.append(time.monotonic() - opened)
                    outcomes["closed by downstairs"] += 1
            except TimeoutError:
                outcomes["held to the end"] += 1
            except OSError as exc:
                closed_after.append(time.monotonic() - opened)
                outcomes[type(exc).__name__] += 1
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    await asyncio.gather(*(holder(t, heads[i % 2]) for t in targets for i in range(per_target)))
    return {"outcomes": dict(outcomes), "per_target": per_target,
            "closed_after_s": percentiles(closed_after) if closed_after else {"count": 0}}


def _child(mode: str, argv: list[str]) -> int:
    duration_s = float(argv[1])
    if mode == "_abuse_http":
        result = asyncio.run(_abuse_http(int(argv[0]), int(argv[2]), duration_s))
    else:
        result = asyncio.run(_abuse_wire(argv[0].split(","), int(argv[2]), duration_s))
    print(json.dumps(result), flush=True)
    return 0


def spawn(mode: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # noqa: S603 - fixed argv, no shell
        [sys.executable, str(Path(__file__).resolve()), mode, *map(str, args)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, cwd=REPO)


def collect(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()  # a bounded client run that overran: nothing to shut down gracefully
        proc.communicate()
        return {"error": "abuser did not finish"}
    lines = out.strip().splitlines()
    return json.loads(lines[-1]) if lines else {"error": f"abuser exited {proc.returncode} with no result"}


# -- the run ------------------------------------------------------------------------------------
def pid_of(ds: Downstairs) -> int:
    if not isinstance(ds, ProcessDownstairs) or ds.pid is None:
        raise HarnessError(f"downstairs {ds.name} is not a running process")
    return ds.pid


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    fw = framework("process", tmp)
    ports: list[int] = []
    dss: DownstairsSet | None = None
    export: ManagedProcess | None = None
    try:
        with factories(fw, tmp, "abuse", "server") as (vms, _disks):
            vm = vms.new_vm("abuse")
            vm.launch()
            vm.run()
            vm.wait_to_boot()
            server_pid = vm.server.pid
            assert server_pid is not None
            api = httpx.Client(base_url=vm.server.base_url, timeout=10)

            ports = [fw.ports.allocate_pair() for _ in range(3)]  # a repair port at + 4000 each
            dss = local_downstairs(tmp / "downstairs", ports, 2).open()
            ds_pids = [pid_of(dss.member(i)) for i in range(len(dss))]
            export, sock = start_export(tmp, make_vcr(dss.targets, 2))
            nbd = NbdClient(sock)
            rng = random.Random(12)
            block = os.urandom(4096)

            def storage_probe() -> None:
                offset = rng.randrange(nbd.size // 4096) * 4096
                nbd.write(offset, block)
                if nbd.read(offset, 4096) != block:
                    raise RuntimeError(f"read back at {offset} differs from what was written")

            def api_probe() -> None:
                answer = api.get("/instance")
                if answer.status_code != 200:
                    raise RuntimeError(f"GET /instance answered {answer.status_code}")

            pids = {"server": [server_pid], "downstairs": ds_pids}
            before = {k: [round(rss_mb(p, "VmRSS"), 1) for p in v] for k, v in pids.items()}
            samplers = {"server_api": Sampler("api", api_probe), "storage_io": Sampler("io", storage_probe)}
            for sampler in samplers.values():
                sampler.start()
            try:
                log(f"idle: sampling {args.idle_s:g} s")
                time.sleep(args.idle_s)  # a measurement window, not a wait for a condition
                idle = {name: s.take() for name, s in samplers.items()}
                log(f"abuse: {args.bodies} x 1 MiB bodies to the server, {args.half_open} half-open "
                    f"connections to each of 3 downstairs, {args.duration_s:g} s")
                http = spawn("_abuse_http", vm.server.port, args.duration_s, args.bodies)
                wire = spawn("_abuse_wire", ",".join(dss.targets), args.duration_s, args.half_open)
                peak_now = {k: [0.0 for _ in v] for k, v in pids.items()}
                end = time.monotonic() + args.duration_s
                while time.monotonic() < end:  # RSS samples during the window (VmHWM is the peak)
                    for k, v in pids.items():
                        now = [rss_mb(p, "VmRSS") for p in v]
                        peak_now[k] = [max(a, b) for a, b in zip(peak_now[k], now, strict=True)]
                    time.sleep(0.1)  # sampling interval of a fixed measurement window
                busy = {name: s.take() for name, s in samplers.items()}
                http_result = collect(http, 60)
                wire_result = collect(wire, 60)
            finally:
                for sampler in samplers.values():
                    sampler.stop()
                nbd.close()
                api.close()
            # After the abuse both still serve: one more request each, outside the samplers.
            api_after = httpx.get(f"{vm.server.base_url}/instance", timeout=10).status_code == 200
            check = NbdClient(sock)
            try:
                check.write(0, block)
                storage_after = check.read(0, 4096) == block
            finally:
                check.close()
            after_ok = {"server_api": api_after, "storage_io": storage_after}
            hwm = {k: [round(rss_mb(p, "VmHWM"), 1) for p in v] for k, v in pids.items()}
    finally:
        teardown = Teardown("tearing down the abuse run")
        if export is not None:
            with teardown.step():
                export.stop()
        if dss is not None:
            with teardown.step():
                dss.close()
        for port in ports:
            with teardown.step():
                fw.ports.release(port)
        with teardown.step():
            fw.close()
        teardown.finish()

    served = {name: percentiles(samples) for name, (samples, _errors) in busy.items()}
    return {
        "server_peak_rss_mb": max(hwm["server"]),
        "downstairs_peak_rss_mb": max(hwm["downstairs"]),
        "served_during_abuse_p99_ms": max(float(s.get("p99_ms", float("inf"))) for s in served.values()),
        "served_during_abuse": served,
        "served_idle": {name: percentiles(samples) for name, (samples, _e) in idle.items()},
        "client_errors_during_abuse": {name: dict(errors) for name, (_s, errors) in busy.items() if errors},
        "rss_before_mb": before,
        "rss_peak_during_abuse_mb": {k: [round(x, 1) for x in v] for k, v in peak_now.items()},
        "vm_hwm_mb": hwm,
        "served_after_abuse": after_ok,
        "abuse": {"http": http_result, "wire": wire_result, "duration_s": args.duration_s},
    }


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("_abuse_http", "_abuse_wire"):
        return _child(argv[0], argv[1:])
    ap = argparse.ArgumentParser(prog="ci/bench abuse", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration-s", type=float, default=30.0, help="seconds of abuse (default 30)")
    ap.add_argument("--idle-s", type=float, default=5.0, help="seconds of sampling before the abuse")
    ap.add_argument("--bodies", type=int, default=100, help="concurrent 1 MiB body senders (default 100)")
    ap.add_argument("--half-open", type=int, default=100, help="half-open connections per downstairs")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench-abuse.json")
    args = ap.parse_args(argv)
    if args.duration_s <= 0 or args.idle_s <= 0 or args.bodies < 1 or args.half_open < 1:
        ap.error("--duration-s and --idle-s must be > 0, --bodies and --half-open >= 1")

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="phd-bench-abuse-") as tmp_name:
        result = run(args, Path(tmp_name))
    result.update({
        "targets": TARGETS,
        "command": "ci/bench abuse " + shlex.join(argv),
        "wall_s": round(time.monotonic() - t0, 1),
        "cpus": os.cpu_count(),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'figure':<28}{'value':>10}{'target':>10}  met")
    for key, target in TARGETS.items():
        value = result[key]
        print(f"{key:<28}{value:>10.1f}{target:>10.1f}  {'yes' if value <= target else 'NO'}")
    for name, figures in result["served_during_abuse"].items():
        print(f"  {name}: {figures}  (idle: {result['served_idle'][name]})")
    print(f"served after the abuse: {result['served_after_abuse']}; wrote {args.out}")
    met = all(result[k] <= t for k, t in TARGETS.items()) and all(result["served_after_abuse"].values())
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
