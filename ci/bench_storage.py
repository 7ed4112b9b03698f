"""Storage benchmark: qemu-nbd vs our upstairs on our downstairs vs our upstairs on the REAL
crucible-downstairs, all over NBD on a unix socket, in one run.

Usage: ci/bench storage [--size-mib N] [--target-s S] [--no-docker]
                         [--downstairs-binary PATH] [--flush-timeout S] [--out PATH]

Reference: ``qemu-nbd --format=raw --persistent`` serving a sparse raw file in a temp dir.
Ours: three downstairs and a ``CrucibleBackend`` export (our upstairs) in a helper process
(this file, ``_serve`` mode). The downstairs run the way the framework runs them
(``phd.storage.dsc.DownstairsSet`` of ``phd.storage.downstairs`` members, each on a port pair from
``PortAllocator.allocate_pair``: a Crucible downstairs' repair server listens on port + 4000
and the OTHER downstairs connect to it): containers of ``python -m sut.storage.image ensure``
on the host's network, bound to 127.0.0.1, or local processes with ``--no-docker`` (or when
Docker is missing). The same upstairs then runs on three REAL ``crucible-downstairs``
(``--downstairs-binary``, default ``$PHD_DOWNSTAIRS_BINARY``, else
``<repo>/../shared/crucible/crucible-downstairs`` if it exists; containers of
``python -m sut.storage.image ensure --binary PATH``, or processes of the binary); without one
that part is skipped with the reason printed and in the JSON.
There is no "published ports" run any more: Docker-published ports put each downstairs in its
own network namespace, where the repair address it names (127.0.0.1:port+4000) is not the
address the other downstairs could reach, so a Crucible-protocol set must use host networking.

Workloads (``qemu-img bench``, queue depth 4, ``-t none -i threads -f raw``):
  seq_write / seq_read      1 MiB requests, step 1 MiB (sequential, wraps at the end)
  rand_write_4k / rand_read_4k
                            4 KiB requests; qemu-img bench has no random mode, so the step is
                            4 KiB * 7919 (a prime): offsets advance by that step modulo the image
                            size (qemu-img wraps the offset), which visits every 4 KiB block once
                            per cycle in a scattered, non-sequential order.
Before the workloads every target is filled with one untimed sequential 1 MiB write pass so
reads hit written data (region files are sparse; unwritten reads would be cheaper).
Each workload runs a short probe, then a run sized to about ``--target-s`` seconds (clamped).
MB/s = bytes / seconds (10^6), IOPS = requests / seconds, seconds = qemu-img's "Run completed in".
qemu-img bench sends no flush until it closes the image (after the timed part), so qemu-nbd's
writes stay in the page cache. An upstairs that flushes on its own (the VCR's flush_timeout)
must get three copies to the disk meanwhile; ``--flush-timeout`` sets it, to show that cost.

The JSON keeps ``<workload>_ratio`` (ours on ours / qemu-nbd) and adds
``real_downstairs_ratios`` (ours on the real downstairs / qemu-nbd) and
``ours_vs_real_downstairs`` (our downstairs' MB/s / the real downstairs' MB/s, same upstairs),
plus ``targets``: each target with its value and pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phd.core.errors import HarnessError
from phd.core.ports import PortAllocator
from phd.core.process import ManagedProcess, ready_when_logged, ready_when_unix_socket
from phd.storage.downstairs import OURS, DsProgram, binary_program, check_binary
from phd.storage.dsc import DownstairsSet, RegionGeometry, docker_members, process_members
from sut.storage.vcr import dump_vcr, region_volume

REPO = Path(__file__).resolve().parent.parent
BLOCK_SIZE = 512
EXTENT_BLOCKS = 32768  # 16 MiB extents
MIB = 1024 * 1024
RAND_STEP_BLOCKS = 7919  # prime, coprime with any power-of-two number of 4 KiB blocks
RUN_TIMEOUT_S = 120.0
# Our own block of loopback port pairs (PortAllocator worker index), clear of the blocks of
# pytest-xdist workers gw0..gw7 that may run beside a benchmark; a bind probe guards anyway.
PORT_BLOCK_INDEX = 8
# Targets (issue 13 item 8): ours / qemu-nbd not below these; our downstairs / the real one
# (behind the same upstairs) not below REAL_TARGET on any workload.
QEMU_TARGETS = {"seq_write": 0.33, "seq_read": 0.84, "rand_read_4k": 0.30, "rand_write_4k": 0.21}
REAL_TARGET = 0.7


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


def run(argv: list[str], *, timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(  # noqa: S603 - argv lists built here, no shell
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


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


def sized_count(sock: Path, wl: Workload, target_s: float) -> int:
    """The request count for a run of about ``target_s``, from a short probe run."""
    probe = qemu_img_bench(sock, wl, wl.probe, pattern=0x5A)
    return max(wl.probe, min(wl.max_count, int(wl.probe * target_s / probe["seconds"])))


def measure(sock: Path, size_bytes: int, target_s: float) -> dict[str, Any]:
    """Fill once (untimed), then every workload: probe, then a run of about target_s."""
    fill = Workload("fill", True, MIB, MIB, 0, 0)
    res = qemu_img_bench(sock, fill, size_bytes // MIB, pattern=0xA5)
    log(f"  fill {size_bytes // MIB} MiB: {res['seconds']:.2f} s ({res['mb_s']} MB/s)")
    out: dict[str, Any] = {"fill": res}
    for wl in workloads(size_bytes):
        count = sized_count(sock, wl, target_s)
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
    try:
        with ManagedProcess(["qemu-nbd", "--format=raw", f"--socket={sock}", "--persistent", str(raw)],
                            name="qemu-nbd", log_path=tmp / "qemu-nbd.log",
                            ready=ready_when_unix_socket(sock), ready_timeout_s=15.0):
            return measure(sock, size_bytes, target_s)
    finally:
        raw.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# ours: downstairs + CrucibleBackend helper


def local_downstairs(tmp: Path, ports: list[int], extent_count: int) -> DownstairsSet:
    """Three of our downstairs as local processes on `ports` (pairs), not yet opened: for
    ci/bench_abuse.py (the storage benchmark itself runs its sets in ``bench_set``)."""
    geometry = RegionGeometry(BLOCK_SIZE, EXTENT_BLOCKS, extent_count)
    return DownstairsSet(process_members(OURS.cmd, tmp), ports, count=3, geometry=geometry)


def make_vcr(targets: list[str], extent_count: int, flush_timeout: float | None = None) -> str:
    vcr = json.loads(dump_vcr(region_volume(str(uuid.uuid4()), targets, block_size=BLOCK_SIZE,
                                            blocks_per_extent=EXTENT_BLOCKS, extent_count=extent_count)))
    if flush_timeout is not None:
        vcr["sub_volumes"][0]["opts"]["flush_timeout"] = flush_timeout
    return json.dumps(vcr)


def start_export(tmp: Path, vcr: str) -> tuple[ManagedProcess, Path]:
    """Our upstairs' NBD export in a helper process (this file, ``_serve`` mode), ready once it
    has activated against the VCR's downstairs."""
    sock = tmp / "ours.nbd"
    vcr_file = tmp / "vcr.json"
    vcr_file.write_text(vcr)
    export = ManagedProcess(
        [sys.executable, str(Path(__file__).resolve()), "_serve", "--socket", str(sock),
         "--vcr", str(vcr_file)],
        name="export helper", log_path=tmp / "export.log", cwd=REPO,
        ready=ready_when_logged('"event": "ready"'), ready_timeout_s=90.0, stop_timeout_s=30.0)
    return export.start(), sock


def docker_client() -> Any | None:
    """A Docker client when the engine answers, else None (the downstairs run as processes)."""
    if not shutil.which("docker"):
        return None
    try:
        import docker

        client = docker.from_env(timeout=120)
        client.ping()
    except Exception:  # noqa: BLE001 - any failure means "no engine here"
        return None
    return client


def ensure_image(extra: list[str]) -> tuple[str, str]:
    """(tag, "") of ``python -m sut.storage.image ensure EXTRA``, or ("", why it failed)."""
    proc = run([sys.executable, "-m", "sut.storage.image", "ensure", *extra], check=False, timeout=900)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return lines[-1].strip(), ""
    why = f"`sut.storage.image ensure {' '.join(extra)}` exited {proc.returncode}"
    return "", f"{why}: {proc.stderr.strip()[-300:]}"


def default_binary() -> Path | None:
    """$PHD_DOWNSTAIRS_BINARY, else <repo>/../shared/crucible/crucible-downstairs if it exists."""
    env = os.environ.get("PHD_DOWNSTAIRS_BINARY")
    if env:
        return Path(env)
    beside = REPO.parent / "shared" / "crucible" / "crucible-downstairs"
    return beside if beside.exists() else None


@dataclass
class Setup:
    """How this run starts downstairs: Docker (client + labels) or processes, and its ports."""

    tmp: Path
    client: Any | None  # None: processes
    labels: dict[str, str]
    ports: PortAllocator

    @property
    def flavour(self) -> str:
        return "docker" if self.client is not None else "process"


def bench_set(
    setup: Setup, name: str, program: DsProgram, image: str, size_bytes: int, target_s: float,
    flush_timeout: float | None,
) -> dict[str, Any]:
    """Three downstairs of ``program`` (containers of ``image`` on the host's network, or
    processes when ``setup.client`` is None) behind our upstairs' NBD export, measured."""
    extent_count = size_bytes // (BLOCK_SIZE * EXTENT_BLOCKS)
    work = setup.tmp / name
    work.mkdir()
    if setup.client is not None:
        sess = setup.labels["phd.session"]
        make = docker_members(setup.client, image, setup.labels, f"phd-{sess}-{name}", log_dir=work,
                              program=program)
    else:
        make = process_members(program.cmd, work, program=program)
    ports = [setup.ports.allocate_pair() for _ in range(3)]
    try:
        geometry = RegionGeometry(BLOCK_SIZE, EXTENT_BLOCKS, extent_count)
        with DownstairsSet(make, ports, count=3, geometry=geometry) as dss:
            where = f"{setup.flavour}, {image or program.describe()}"
            log(f"  downstairs {program.kind} ({where}): {', '.join(dss.targets)}")
            export, sock = start_export(work, make_vcr(dss.targets, extent_count, flush_timeout))
            try:
                return measure(sock, size_bytes, target_s)
            finally:
                export.stop()
    finally:
        for port in ports:
            setup.ports.release(port)


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


def leftovers(tmp: Path, session: str) -> list[str]:
    """What this run started and did not remove: processes naming its temp dir, containers and
    volumes with its session label (other users' downstairs on the same machine are not ours)."""
    found = []
    pg = run(["pgrep", "-af", "qemu-nbd|sut.storage|bench_storage|crucible-downstairs"], check=False)
    found += [f"process: {line}" for line in pg.stdout.strip().splitlines() if str(tmp) in line]
    if shutil.which("docker"):
        label = f"label=phd.session={session}"
        ids = run(["docker", "ps", "-aq", "--filter", label], check=False).stdout.split()
        vols = run(["docker", "volume", "ls", "-q", "--filter", label], check=False).stdout.split()
        found += [f"container: {c}" for c in ids] + [f"volume: {v}" for v in vols]
    return found


def ratios_of(ours: dict[str, Any], ref: dict[str, Any], names: list[str]) -> dict[str, float | None]:
    return {n: round(ours[n]["mb_s"] / ref[n]["mb_s"], 4) if ref[n]["mb_s"] else None for n in names}


def judge(values: dict[str, float | None], minimum: dict[str, float]) -> dict[str, Any]:
    """Each workload's value against its minimum: {"min", "value", "pass"}; "pass" overall."""
    out: dict[str, Any] = {}
    for n, m in minimum.items():
        value = values.get(n)
        out[n] = {"min": m, "value": value, "pass": value is not None and value >= m}
    out["pass"] = all(v["pass"] for v in out.values())
    return out


def print_table(title: str, ref: dict[str, Any], ours: dict[str, Any], names: list[str],
                ref_name: str = "qemu-nbd", ours_name: str = "ours") -> None:
    ratios = ratios_of(ours, ref, names)
    print(title)
    head = f"{ref_name + ' MB/s':>16} {'IOPS':>9} {ours_name + ' MB/s':>16} {'IOPS':>9}"
    print(f"{'workload':<15} {head} {'ratio':>7}")
    for n in names:
        r, o = ref[n], ours[n]
        cols = f"{r['mb_s']:>16.1f} {r['iops']:>9.0f} {o['mb_s']:>16.1f} {o['iops']:>9.0f}"
        print(f"{n:<15} {cols} {ratios[n]:>7.3f}")


def print_targets(title: str, verdict: dict[str, Any]) -> None:
    print(f"{title}: {'PASS' if verdict['pass'] else 'FAIL'}")
    for n, v in verdict.items():
        if n == "pass":
            continue
        value = "n/a" if v["value"] is None else f"{v['value']:.3f}"
        print(f"  {n:<15} {value:>7} >= {v['min']:.2f}  {'pass' if v['pass'] else 'FAIL'}")


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
    p.add_argument("--no-docker", action="store_true", help="run the downstairs as local processes")
    p.add_argument(
        "--downstairs-binary",
        type=Path,
        default=None,
        metavar="PATH",
        help="a real crucible-downstairs to run our upstairs on as well (default: $PHD_DOWNSTAIRS_BINARY,"
        " else ../shared/crucible/crucible-downstairs beside the repo if it exists; none: skipped)",
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
    binary: Path | None = a.downstairs_binary or default_binary()

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="phd-bench-storage-"))
    session = f"bench-{secrets.token_hex(6)}"
    labels = {"phd.session": session, "phd.test": "ci/bench storage", "phd.pid": str(os.getpid()),
              "phd.host": os.uname().nodename}
    client = None if a.no_docker else docker_client()
    if client is None and not a.no_docker:
        print("NOTE: Docker is not available; downstairs run as local processes")
    real: dict[str, Any] | None = None
    real_skipped = ""
    real_program: DsProgram | None = None
    images = {"ours": "", "binary": ""}
    try:
        if binary is None:
            real_skipped = ("no crucible-downstairs: pass --downstairs-binary PATH or set "
                            "PHD_DOWNSTAIRS_BINARY (or place it at ../shared/crucible/crucible-downstairs)")
        else:
            try:
                check_binary(binary)
                real_program = binary_program(binary)
            except HarnessError as exc:
                real_skipped = f"--downstairs-binary {binary}: {exc}"
        if client is not None:
            images["ours"], why = ensure_image(["--program", "ours"])
            if not images["ours"]:
                print(f"NOTE: our downstairs image is unavailable ({why}); downstairs run as local processes")
                client.close()
                client = None
            elif real_program is not None:
                images["binary"], why = ensure_image(["--binary", str(binary)])
                if not images["binary"]:
                    real_skipped, real_program = f"the real downstairs' image is unavailable: {why}", None
        setup = Setup(tmp, client, labels, PortAllocator(index=PORT_BLOCK_INDEX))
        log(f"reference: qemu-nbd, {a.size_mib} MiB raw file")
        ref = bench_qemu_nbd(tmp, size_bytes, a.target_s)
        log(f"ours: our upstairs (CrucibleBackend export) on 3 of our downstairs, {a.size_mib} MiB region")
        ours = bench_set(setup, "ours", OURS, images["ours"], size_bytes, a.target_s, a.flush_timeout)
        if real_program is not None:
            log(f"real: our upstairs on 3 real crucible-downstairs ({binary}), {a.size_mib} MiB region")
            real = bench_set(setup, "real", real_program, images["binary"], size_bytes, a.target_s,
                             a.flush_timeout)
        else:
            print(f"NOTE: real downstairs part skipped: {real_skipped}")
    finally:
        if client is not None:
            client.close()
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.monotonic() - t0

    names = [w.name for w in workloads(size_bytes)]
    ratios = ratios_of(ours, ref, names)
    real_ratios = ratios_of(real, ref, names) if real is not None else None
    ours_vs_real = ratios_of(ours, real, names) if real is not None else None
    targets: dict[str, Any] = {"ours_vs_qemu_nbd": judge(ratios, QEMU_TARGETS)}
    if ours_vs_real is not None:
        targets["ours_vs_real_downstairs"] = judge(ours_vs_real, dict.fromkeys(names, REAL_TARGET))
    result: dict[str, Any] = {
        "seq_read_ratio": ratios["seq_read"],
        "seq_write_ratio": ratios["seq_write"],
        "rand_read_4k_ratio": ratios["rand_read_4k"],
        "rand_write_4k_ratio": ratios["rand_write_4k"],
        "real_downstairs_ratios": real_ratios,
        "ours_vs_real_downstairs": ours_vs_real,
        "targets": targets,
        "size_mib": a.size_mib,
        "downstairs_mode": setup.flavour,
        "downstairs_network": "host (127.0.0.1)" if client is not None else "loopback (local processes)",
        "images": images if client is not None else None,
        "downstairs_binary": str(binary) if binary is not None else None,
        "real_downstairs_skipped": real_skipped or None,
        "flush_timeout_s": a.flush_timeout if a.flush_timeout is not None else "upstairs default",
        "method": {
            "tool": "qemu-img bench -f raw -t none -i threads -d 4 over nbd+unix",
            "seq": "1 MiB requests, step 1 MiB",
            "rand_4k": f"4 KiB requests, step 4 KiB * {RAND_STEP_BLOCKS} (prime) modulo image size",
            "fill": "one untimed sequential 1 MiB write pass before the workloads",
            "ratio": "<workload>_ratio: ours (our upstairs on our downstairs) MB/s / qemu-nbd MB/s;"
            " real_downstairs_ratios: our upstairs on the real downstairs / qemu-nbd;"
            " ours_vs_real_downstairs: our downstairs / the real downstairs, same upstairs (MB/s ="
            " IOPS ratios)",
            "downstairs": "3 per set via phd.storage.dsc.DownstairsSet, each on a port pair (repair server"
            " at port + 4000); containers share the host's network namespace and bind 127.0.0.1",
        },
        "qemu_nbd": ref,
        "ours": ours,
        "real_downstairs": real,
        "wall_seconds": round(wall, 1),
        # other work on the machine skews both sides; a ratio is comparable only at similar load
        "loadavg_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "cpus": os.cpu_count(),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")

    where = f"{setup.flavour} ({images['ours']}), network host" if client is not None else "local processes"
    print_table(f"ours: our upstairs on our downstairs, {where}", ref, ours, names)
    if real is not None:
        print_table(f"real: our upstairs on the real downstairs ({binary})", ref, real, names,
                    ours_name="real")
        print_table("our downstairs vs the real one, same upstairs", real, ours, names, ref_name="real",
                    ours_name="ours")
    print_targets("targets ours / qemu-nbd", targets["ours_vs_qemu_nbd"])
    if "ours_vs_real_downstairs" in targets:
        print_targets("targets ours / real downstairs", targets["ours_vs_real_downstairs"])
    else:
        print(f"targets ours / real downstairs: not measured ({real_skipped})")
    load = result["loadavg_1min"]
    print(f"image {a.size_mib} MiB; wall {wall:.1f} s; load {load['before']} -> {load['after']} on "
          f"{result['cpus']} CPUs; results in {a.out}")
    left = leftovers(tmp, session)
    if left:
        print("WARNING: left behind:\n  " + "\n  ".join(left))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
