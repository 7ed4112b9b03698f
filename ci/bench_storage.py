"""Storage benchmark: our Crucible-style stack vs qemu-nbd, both over NBD on a unix socket.

Usage: ci/bench storage [--size-mib N] [--target-s S] [--no-docker] [--no-published]
                         [--flush-timeout S] [--out PATH]

Reference: ``qemu-nbd --format=raw --persistent`` serving a sparse raw file in a temp dir.
Ours: three downstairs (containers from ``python -m sut.storage.image ensure``; local
``python -m sut.storage.downstairs`` processes if Docker is missing) and a ``CrucibleBackend``
export in a helper process (this file, ``_serve`` mode). The containers share the host's
network namespace (``--network host``) and the downstairs bind 127.0.0.1:PORT themselves: with
ports published by Docker every byte also crosses docker-proxy (two more copies and process
wake-ups per transfer). That published-port setup is measured too, as an extra run
(``published`` in the JSON), so its cost stays visible.

Workloads (``qemu-img bench``, queue depth 4, ``-t none -i threads -f raw``):
  seq_write / seq_read      1 MiB requests, step 1 MiB (sequential, wraps at the end)
  rand_write_4k / rand_read_4k
                            4 KiB requests; qemu-img bench has no random mode, so the step is
                            4 KiB * 7919 (a prime): offsets advance by that step modulo the image
                            size (qemu-img wraps the offset), which visits every 4 KiB block once
                            per cycle in a scattered, non-sequential order.
Before the workloads both targets are filled with one untimed sequential 1 MiB write pass so
reads hit written data (our region files are sparse; unwritten reads would be cheaper).
Each workload runs a short probe, then a run sized to about ``--target-s`` seconds (clamped).
MB/s = bytes / seconds (10^6), IOPS = requests / seconds, seconds = qemu-img's "Run completed in".
qemu-img bench sends no flush until it closes the image (after the timed part), so qemu-nbd's
writes stay in the page cache. An upstairs that flushes on its own (the VCR's flush_timeout)
must get three copies to the disk meanwhile; ``--flush-timeout`` sets it, to show that cost.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sut.storage.vcr import dump_vcr, region_volume

REPO = Path(__file__).resolve().parent.parent
BLOCK_SIZE = 512
EXTENT_BLOCKS = 32768  # 16 MiB extents
CONTAINER_PORT = 3810
MIB = 1024 * 1024
RAND_STEP_BLOCKS = 7919  # prime, coprime with any power-of-two number of 4 KiB blocks
RUN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Workload:
    name: str
    write: bool
    size: int  # request size in bytes
    step: int  # offset step in bytes
    probe: int  # request count of the calibration run
    max_count: int


def workloads(size_bytes: int) -> list[Workload]:
    return [
        Workload("seq_write", True, MIB, MIB, 16, 4096),
        Workload("seq_read", False, MIB, MIB, 16, 4096),
        Workload("rand_read_4k", False, 4096, 4096 * RAND_STEP_BLOCKS, 256, 400_000),
        Workload("rand_write_4k", True, 4096, 4096 * RAND_STEP_BLOCKS, 256, 400_000),
    ]


# ---------------------------------------------------------------------------------------------
# helpers


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(argv: list[str], *, timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(  # noqa: S603 - argv lists built here, no shell
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def stop_proc(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_socket(path: Path, proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(path))
                return
            except OSError:
                pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}) before {path} was ready")
        time.sleep(0.05)  # polling interval of a deadline-bounded wait
    raise RuntimeError(f"timed out waiting for {path}")


_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


def qemu_img_bench(sock: Path, wl: Workload, count: int, *, pattern: int | None = None) -> dict[str, Any]:
    argv = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-i", "threads", "-d", "4"]
    argv += ["-c", str(count), "-s", str(wl.size), "-S", str(wl.step)]
    if wl.write:
        argv.append("-w")
        if pattern is not None:
            argv.append(f"--pattern={pattern}")
    argv.append(f"nbd+unix:///?socket={sock}")
    t0 = time.monotonic()
    proc = run(argv, timeout=RUN_TIMEOUT_S)
    wall = time.monotonic() - t0
    m = _COMPLETED.search(proc.stdout)
    seconds = float(m.group(1)) if m else wall
    seconds = max(seconds, 1e-6)
    nbytes = count * wl.size
    return {
        "count": count,
        "request_bytes": wl.size,
        "step_bytes": wl.step,
        "bytes": nbytes,
        "seconds": seconds,
        "wall_seconds": round(wall, 3),
        "mb_s": round(nbytes / seconds / 1e6, 2),
        "iops": round(count / seconds, 1),
    }


def measure(sock: Path, size_bytes: int, target_s: float) -> dict[str, Any]:
    """Fill once (untimed), then every workload: probe, then a run of about target_s."""
    fill = Workload("fill", True, MIB, MIB, 0, 0)
    res = qemu_img_bench(sock, fill, size_bytes // MIB, pattern=0xA5)
    log(f"  fill {size_bytes // MIB} MiB: {res['seconds']:.2f} s ({res['mb_s']} MB/s)")
    out: dict[str, Any] = {"fill": res}
    for wl in workloads(size_bytes):
        probe = qemu_img_bench(sock, wl, wl.probe, pattern=0x5A)
        count = int(wl.probe * target_s / probe["seconds"])
        count = max(wl.probe, min(wl.max_count, count))
        res = qemu_img_bench(sock, wl, count, pattern=0x5A)
        took = f"{res['seconds']:.3f} s -> {res['mb_s']} MB/s, {res['iops']} IOPS"
        log(f"  {wl.name}: {count} x {wl.size} B in {took}")
        out[wl.name] = res
    return out


# ---------------------------------------------------------------------------------------------
# reference: qemu-nbd


def bench_qemu_nbd(tmp: Path, size_bytes: int, target_s: float) -> dict[str, Any]:
    raw = tmp / "ref.raw"
    with open(raw, "wb") as f:
        f.truncate(size_bytes)
    sock = tmp / "ref.nbd"
    proc: subprocess.Popen[bytes] | None = None
    logf = open(tmp / "qemu-nbd.log", "wb")  # noqa: SIM115 - closed in finally
    try:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            ["qemu-nbd", "--format=raw", f"--socket={sock}", "--persistent", str(raw)],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
        )
        wait_socket(sock, proc)
        return measure(sock, size_bytes, target_s)
    finally:
        stop_proc(proc)
        logf.close()
        raw.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# ours: downstairs + CrucibleBackend helper


@dataclass
class Downstairs:
    mode: str  # "docker" or "local"
    label: str
    tmp: Path
    image: str = ""
    network: str = "host"  # containers: "host" (share the host's loopback) or "published"
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)

    def start(self, n: int, extent_count: int) -> None:
        for i in range(n):
            if self.mode == "docker":
                self.targets.append(self._start_container(i, extent_count))
            else:
                self.targets.append(self._start_local(i, extent_count))

    def _create_args(self, data_dir: str, extent_count: int) -> list[str]:
        return [
            "create",
            "-u",
            str(uuid.uuid4()),
            "-d",
            data_dir,
            "--block-size",
            str(BLOCK_SIZE),
            "--extent-size",
            str(EXTENT_BLOCKS),
            "--extent-count",
            str(extent_count),
        ]

    def _start_container(self, i: int, extent_count: int) -> str:
        sess = self.label.split("=", 1)[1]
        name = f"{sess}-{self.network}-ds{i}"
        volume = run(["docker", "volume", "create", "--label", self.label, f"{name}-data"]).stdout.strip()
        common = ["--read-only", "--label", self.label, "-v", f"{volume}:/data"]
        run(["docker", "run", "--rm", *common, self.image, *self._create_args("/data/region", extent_count)])
        last_err = ""
        for _attempt in range(5):  # the free port may be taken between probe and bind/publish
            port = free_port()
            if self.network == "host":
                # the host's network namespace: the downstairs binds loopback itself, no proxy
                net = ["--network", "host"]
                listen = ["-a", "127.0.0.1", "-p", str(port)]
            else:
                net = ["-p", f"127.0.0.1:{port}:{CONTAINER_PORT}"]
                listen = ["-a", "0.0.0.0", "-p", str(CONTAINER_PORT)]  # inside its own namespace
            argv = ["docker", "run", "-d", "--name", name, *common, *net, self.image]
            proc = run([*argv, "run", "-d", "/data/region", *listen], check=False)
            if proc.returncode == 0:
                listening, logs = self._wait_listening(proc.stdout.strip())
                if listening:
                    return f"127.0.0.1:{port}"
                last_err = logs[-2000:]
            else:
                last_err = proc.stderr.strip()
            run(["docker", "rm", "-f", name], check=False)
        raise RuntimeError(f"could not start container {name}: {last_err}")

    def _wait_listening(self, cid: str) -> tuple[bool, str]:
        deadline = time.monotonic() + 30
        logs = ""
        while time.monotonic() < deadline:
            logs = run(["docker", "logs", cid], check=False).stderr
            if '"event": "listening"' in logs:
                return True, logs
            state = run(["docker", "inspect", "-f", "{{.State.Running}}", cid], check=False).stdout.strip()
            if state != "true":
                return False, logs  # exited, e.g. the port was taken meanwhile
            time.sleep(0.1)  # polling interval of a deadline-bounded wait
        return False, f"never listened within 30 s; logs:\n{logs}"

    def _start_local(self, i: int, extent_count: int) -> str:
        data = self.tmp / f"ds{i}"
        logp = self.tmp / f"ds{i}.log"
        run([sys.executable, "-m", "sut.storage.downstairs", *self._create_args(str(data), extent_count)])
        with open(logp, "wb") as logf:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [
                    sys.executable,
                    "-m",
                    "sut.storage.downstairs",
                    "run",
                    "-d",
                    str(data),
                    "-a",
                    "127.0.0.1",
                    "-p",
                    "0",
                ],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                cwd=REPO,
            )
        self.procs.append(proc)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for line in logp.read_text(errors="replace").splitlines():
                if '"event": "listening"' in line:
                    return f"127.0.0.1:{json.loads(line)['port']}"
            if proc.poll() is not None:
                break
            time.sleep(0.05)  # polling interval of a deadline-bounded wait
        raise RuntimeError(f"local downstairs {i} did not listen: {logp.read_text(errors='replace')[-2000:]}")

    def close(self) -> None:
        for proc in self.procs:
            stop_proc(proc)
        if self.mode == "docker":
            ids = run(["docker", "ps", "-aq", "--filter", f"label={self.label}"], check=False).stdout.split()
            if ids:
                run(["docker", "stop", "-t", "10", *ids], check=False)
                run(["docker", "rm", "-f", *ids], check=False)
            vols = run(
                ["docker", "volume", "ls", "-q", "--filter", f"label={self.label}"], check=False
            ).stdout.split()
            if vols:
                run(["docker", "volume", "rm", "-f", *vols], check=False)


def make_vcr(targets: list[str], extent_count: int, flush_timeout: float | None = None) -> str:
    vcr = json.loads(dump_vcr(region_volume(str(uuid.uuid4()), targets, block_size=BLOCK_SIZE,
                                            blocks_per_extent=EXTENT_BLOCKS, extent_count=extent_count)))
    if flush_timeout is not None:
        vcr["sub_volumes"][0]["opts"]["flush_timeout"] = flush_timeout
    return json.dumps(vcr)


def start_export(tmp: Path, vcr: str) -> tuple[subprocess.Popen[bytes], Path]:
    sock = tmp / "ours.nbd"
    vcr_file = tmp / "vcr.json"
    vcr_file.write_text(vcr)
    logf = open(tmp / "export.log", "wb")  # noqa: SIM115 - the child holds its own copy
    try:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "_serve",
                "--socket",
                str(sock),
                "--vcr",
                str(vcr_file),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=logf,
            cwd=REPO,
        )
    finally:
        logf.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + 90
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            if b'"ready"' in buf:
                return proc, sock
        elif proc.poll() is not None:
            break
    stop_proc(proc)
    tail = (tmp / "export.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"export helper never became ready; stdout {buf!r}; log:\n{tail}")


def downstairs_image(use_docker: bool) -> str:
    """The downstairs image tag, or "" to run the downstairs as local processes."""
    if not use_docker:
        return ""
    if not shutil.which("docker") or run(["docker", "info"], check=False, timeout=30).returncode != 0:
        print("NOTE: Docker is not available; downstairs run as local processes")
        return ""
    proc = run([sys.executable, "-m", "sut.storage.image", "ensure"], check=False, timeout=900)
    if proc.returncode == 0 and proc.stdout.strip():
        return proc.stdout.strip().splitlines()[-1]
    print(f"NOTE: downstairs image unavailable ({proc.stderr.strip()[-300:]}); using local processes")
    return ""


def bench_ours(
    tmp: Path, size_bytes: int, target_s: float, image: str, label: str, network: str,
    flush_timeout: float | None,
) -> dict[str, Any]:
    mode = "docker" if image else "local"
    extent_count = size_bytes // (BLOCK_SIZE * EXTENT_BLOCKS)
    ds = Downstairs(mode, label, tmp, image=image, network=network)
    export: subprocess.Popen[bytes] | None = None
    try:
        ds.start(3, extent_count)
        where = f"docker, network {network}, {image}" if image else "local processes"
        log(f"  downstairs ({where}): {', '.join(ds.targets)}")
        export, sock = start_export(tmp, make_vcr(ds.targets, extent_count, flush_timeout))
        return measure(sock, size_bytes, target_s)
    finally:
        if export is not None:
            stop_proc(export, timeout=30)
            if export.stdout is not None:
                export.stdout.close()
        ds.close()


# ---------------------------------------------------------------------------------------------
# helper process: serve one CrucibleBackend export until SIGTERM


def serve(sock: Path, vcr_path: Path) -> int:
    import asyncio
    import logging

    sys.path.insert(0, str(REPO))
    from sut.storage.backend import CrucibleBackend, RetryPolicy

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        backend = CrucibleBackend(
            "bench",
            vcr_path.read_text(),
            sock,
            retry=RetryPolicy(connect_timeout_s=2.0, reconnect_delay_s=0.2),
        )
        try:
            await backend.start_export()
            await asyncio.wait_for(backend.activate(), 60)
            print(json.dumps({"event": "ready", "size_bytes": backend.size_bytes}), flush=True)
            await stop.wait()
        finally:
            await backend.close()

    asyncio.run(main())
    return 0


# ---------------------------------------------------------------------------------------------


def leftovers(tmp: Path, label: str) -> list[str]:
    """What this run started and did not remove: processes naming its temp dir, labelled
    containers and volumes (other users' downstairs on the same machine are not ours)."""
    found = []
    pg = run(["pgrep", "-af", "qemu-nbd|sut.storage|bench_storage"], check=False).stdout.strip()
    found += [f"process: {line}" for line in pg.splitlines() if str(tmp) in line]
    if shutil.which("docker"):
        ids = run(["docker", "ps", "-aq", "--filter", f"label={label}"], check=False).stdout.split()
        vols = run(["docker", "volume", "ls", "-q", "--filter", f"label={label}"], check=False).stdout.split()
        found += [f"container: {c}" for c in ids] + [f"volume: {v}" for v in vols]
    return found


def ratios_of(ours: dict[str, Any], ref: dict[str, Any], names: list[str]) -> dict[str, float | None]:
    return {n: round(ours[n]["mb_s"] / ref[n]["mb_s"], 4) if ref[n]["mb_s"] else None for n in names}


def print_table(title: str, ref: dict[str, Any], ours: dict[str, Any], names: list[str]) -> None:
    ratios = ratios_of(ours, ref, names)
    print(title)
    print(f"{'workload':<15} {'qemu-nbd MB/s':>14} {'IOPS':>10} {'ours MB/s':>11} {'IOPS':>10} {'ratio':>8}")
    for n in names:
        r, o = ref[n], ours[n]
        cols = f"{r['mb_s']:>14.1f} {r['iops']:>10.0f} {o['mb_s']:>11.1f} {o['iops']:>10.0f}"
        print(f"{n:<15} {cols} {ratios[n]:>8.3f}")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "_serve":
        p = argparse.ArgumentParser(prog="bench_storage.py _serve")
        p.add_argument("--socket", type=Path, required=True)
        p.add_argument("--vcr", type=Path, required=True)
        a = p.parse_args(argv[1:])
        return serve(a.socket, a.vcr)

    p = argparse.ArgumentParser(prog="ci/bench storage", description=__doc__.split("\n")[0])
    p.add_argument("--size-mib", type=int, default=256, help="image size (multiple of 16 MiB)")
    p.add_argument("--target-s", type=float, default=2.0, help="approximate seconds per workload run")
    p.add_argument("--no-docker", action="store_true", help="always run the downstairs as local processes")
    p.add_argument(
        "--no-published", action="store_true", help="skip the extra run with ports published by Docker"
    )
    p.add_argument(
        "--flush-timeout",
        type=float,
        default=None,
        metavar="S",
        help="the VCR's flush_timeout (the upstairs flushes written data on its own after S"
        " seconds); default: the upstairs' default. qemu-nbd never flushes on its own.",
    )
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench-storage.json")
    a = p.parse_args(argv)
    if a.size_mib <= 0 or a.size_mib % 16:
        p.error("--size-mib must be a positive multiple of 16")
    size_bytes = a.size_mib * MIB

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="phd-bench-storage-"))
    label = f"phd.session=bench-{secrets.token_hex(6)}"
    published: dict[str, Any] | None = None
    try:
        image = downstairs_image(not a.no_docker)
        log(f"reference: qemu-nbd, {a.size_mib} MiB raw file")
        ref = bench_qemu_nbd(tmp, size_bytes, a.target_s)
        log(f"ours: 3 downstairs + CrucibleBackend export, {a.size_mib} MiB region")
        ours = bench_ours(tmp, size_bytes, a.target_s, image, label, "host", a.flush_timeout)
        if image and not a.no_published:
            log("ours again, downstairs ports published by Docker (docker-proxy on the data path)")
            published = bench_ours(tmp, size_bytes, a.target_s, image, label, "published", a.flush_timeout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.monotonic() - t0

    names = [w.name for w in workloads(size_bytes)]
    ratios = ratios_of(ours, ref, names)
    result: dict[str, Any] = {
        "seq_read_ratio": ratios["seq_read"],
        "seq_write_ratio": ratios["seq_write"],
        "rand_read_4k_ratio": ratios["rand_read_4k"],
        "rand_write_4k_ratio": ratios["rand_write_4k"],
        "size_mib": a.size_mib,
        "downstairs_mode": "docker" if image else "local",
        "downstairs_network": "host" if image else "loopback (local processes)",
        "flush_timeout_s": a.flush_timeout if a.flush_timeout is not None else "upstairs default",
        "method": {
            "tool": "qemu-img bench -f raw -t none -i threads -d 4 over nbd+unix",
            "seq": "1 MiB requests, step 1 MiB",
            "rand_4k": f"4 KiB requests, step 4 KiB * {RAND_STEP_BLOCKS} (prime) modulo image size",
            "fill": "one untimed sequential 1 MiB write pass before the workloads",
            "ratio": "ours MB/s / qemu-nbd MB/s (equal to the IOPS ratio)",
            "network": "ours: containers share the host's network namespace and bind 127.0.0.1:PORT;"
            " published: the same with -p 127.0.0.1:PORT:3810 (docker-proxy), same qemu-nbd reference",
        },
        "qemu_nbd": ref,
        "ours": ours,
        "wall_seconds": round(wall, 1),
        # other work on the machine skews both sides; a ratio is comparable only at similar load
        "loadavg_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "cpus": os.cpu_count(),
    }
    if published is not None:
        result["published"] = {
            "ratios": ratios_of(published, ref, names),
            "ours": published,
        }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")

    where = f"docker ({image}), network host" if image else "local processes"
    print_table(f"ours: downstairs {where}", ref, ours, names)
    if published is not None:
        print_table("ours: downstairs docker, ports published (docker-proxy)", ref, published, names)
    load = result["loadavg_1min"]
    print(f"image {a.size_mib} MiB; wall {wall:.1f} s; load {load['before']} -> {load['after']} on "
          f"{result['cpus']} CPUs; results in {a.out}")
    left = leftovers(tmp, label)
    if left:
        print("WARNING: left behind:\n  " + "\n  ".join(left))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
