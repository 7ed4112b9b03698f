"""The storage benchmark's ceiling: how close to qemu-nbd ANY upstairs can get on this machine.

Usage: ci/bench ceiling [--size-mib N] [--target-s S] [--runs N] [--out PATH]

``ci/bench storage`` compares our upstairs with qemu-nbd serving a raw file. A Crucible
upstairs cannot do what qemu-nbd does: it must move every byte of a read across one more
socket (downstairs -> upstairs, loopback TCP) and every byte of a write across three (one per
downstairs), and three downstairs must receive and store them. This benchmark measures what
that data movement alone costs, with no protocol logic at all: ``ci/teerelay.c``, a native
relay that copies the NBD byte stream from qemu-img to one or three qemu-nbd servers over
loopback TCP (no parsing, no hashing, no job bookkeeping) and the first server's bytes back.

Per run, one after another, on the same image size and with ``qemu-img bench`` exactly as
``ci/bench storage`` runs it:
  direct   qemu-nbd on a unix socket (the storage benchmark's reference)
  relay1   qemu-img -> teerelay -> 1 qemu-nbd over TCP   (the bytes of a Crucible read)
  relay3   qemu-img -> teerelay -> 3 qemu-nbd over TCP   (the bytes of a Crucible write)
The ceiling of a workload is relayN / direct (median over runs): seq_read takes relay1,
seq_write relay3. A target of ``ci/bench storage`` above its ceiling cannot be met by any
upstairs of this design on this machine, native or not; the JSON says so per target.

Each run also records how busy the machine's CPUs were: when both cores are saturated during
a relay run, more threads in the relay would not help (qemu-img, the relay and the servers
share the two cores), and splice()/zero-copy tricks are not open to a Crucible upstairs, which
must read every byte it relays to check the block hashes.

The 4 KiB workloads are not measured: qemu-nbd sets no TCP_NODELAY on the connections it
accepts (strace shows only SO_REUSEADDR), so with several small requests in flight its replies
wait on delayed ACKs (tens of milliseconds each) and it cannot stand in for a downstairs there.
At 1 MiB the segments are full and Nagle's rule does not hold them back.

Writes results/bench-ceiling.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_storage import MIB, QEMU_TARGETS, Workload, log, qemu_img_bench, sized_count, workloads

from phd.core.ports import PortAllocator
from phd.core.process import ManagedProcess, ready_when_connects, ready_when_unix_socket

REPO = Path(__file__).resolve().parent.parent
RELAY_SOURCE = REPO / "ci" / "teerelay.c"
# Which relay a workload's ceiling comes from: the number of copies Crucible moves.
CEILING_RELAY = {"seq_read": "relay1", "seq_write": "relay3"}
NOT_MEASURED = {
    name: "qemu-nbd sets no TCP_NODELAY on accepted connections, so at 4 KiB its replies wait on "
    "delayed ACKs and it cannot stand in for a downstairs; no ceiling is claimed"
    for name in ("rand_read_4k", "rand_write_4k")
}
# A block of loopback ports of our own, clear of pytest-xdist workers and ci/bench storage.
PORT_BLOCK_INDEX = 9


def build_relay(out_dir: Path) -> Path:
    """Compile ci/teerelay.c with the system's C compiler (gcc, from Debian's build-essential)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("ci/bench ceiling: no C compiler (install gcc: apt-get install gcc)")
    binary = out_dir / "teerelay"
    proc = subprocess.run(  # noqa: S603 - fixed argv
        [cc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(RELAY_SOURCE), "-pthread"],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"ci/bench ceiling: compiling {RELAY_SOURCE} failed:\n{proc.stderr}")
    return binary


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def measure(sock: Path, names: list[str], size_bytes: int, target_s: float) -> dict[str, float]:
    """Fill once (untimed), then each named workload: probe, then a run of about target_s.
    Records MB/s per workload and, as ``<workload>_cpu_busy``, the share of the machine's
    CPU time that was busy during the timed run (1.0: every core saturated)."""
    qemu_img_bench(sock, Workload("fill", True, MIB, MIB, 0, 0), size_bytes // MIB, pattern=0xA5)
    out: dict[str, float] = {}
    for wl in workloads(size_bytes):
        if wl.name not in names:
            continue
        count = sized_count(sock, wl, target_s)
        busy0, total0 = cpu_times()
        out[wl.name] = qemu_img_bench(sock, wl, count, pattern=0x5A)["mb_s"]
        busy1, total1 = cpu_times()
        out[f"{wl.name}_cpu_busy"] = round((busy1 - busy0) / max(1, total1 - total0), 2)
    return out


def qemu_nbd(raw: Path, log_dir: Path, name: str, *, sock: Path | None = None,
             port: int | None = None) -> ManagedProcess:
    argv = ["qemu-nbd", "--format=raw", "--persistent"]
    if sock is not None:
        argv.append(f"--socket={sock}")
        ready = ready_when_unix_socket(sock)
    else:
        assert port is not None
        argv += ["--bind=127.0.0.1", f"--port={port}"]
        ready = ready_when_connects(port)
    return ManagedProcess([*argv, str(raw)], name=name, log_path=log_dir / f"{name}.log",
                          ready=ready, ready_timeout_s=15.0)


def one_run(tmp: Path, relay: Path, ports: PortAllocator, size_bytes: int, target_s: float) -> dict[str, Any]:
    raws = []
    for i in range(3):
        raw = tmp / f"copy{i}.raw"
        with open(raw, "wb") as f:
            f.truncate(size_bytes)
        raws.append(raw)
    names = sorted(CEILING_RELAY)
    result: dict[str, Any] = {}
    with qemu_nbd(raws[0], tmp, "qemu-nbd-direct", sock=tmp / "direct.nbd") as _direct:
        result["direct"] = measure(tmp / "direct.nbd", names, size_bytes, target_s)
    for relay_name, copies in (("relay1", 1), ("relay3", 3)):
        wanted = [n for n, r in CEILING_RELAY.items() if r == relay_name]
        taken = [ports.allocate() for _ in range(copies)]
        try:
            with ExitStack() as stack:
                for i, port in enumerate(taken):
                    stack.enter_context(qemu_nbd(raws[i], tmp, f"qemu-nbd-{relay_name}-{i}", port=port))
                sock = tmp / f"{relay_name}.nbd"
                stack.enter_context(ManagedProcess(
                    [str(relay), str(sock), *map(str, taken)], name=f"teerelay-{relay_name}",
                    log_path=tmp / f"teerelay-{relay_name}.log", ready=ready_when_unix_socket(sock),
                    ready_timeout_s=10.0))
                result[relay_name] = measure(sock, wanted, size_bytes, target_s)
        finally:
            for port in taken:
                ports.release(port)
    for raw in raws:
        raw.unlink(missing_ok=True)
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ceiling: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for name, relay_name in sorted(CEILING_RELAY.items()):
        ratios = [round(r[relay_name][name] / r["direct"][name], 3) for r in runs]
        median = round(statistics.median(ratios), 3)
        ceiling[name] = {"relay": relay_name, "ratios": ratios, "median": median}
        target = QEMU_TARGETS[name]
        targets[name] = {"target": target, "ceiling": median, "reachable": target <= median}
    for name, why in NOT_MEASURED.items():
        targets[name] = {"target": QEMU_TARGETS[name], "ceiling": None, "reachable": None, "why": why}
    return {"ceiling": ceiling, "targets": targets}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ci/bench ceiling", description=__doc__.split("\n")[0])
    p.add_argument("--size-mib", type=int, default=256, help="image size in MiB (whole MiB)")
    p.add_argument("--target-s", type=float, default=2.0, help="approximate seconds per workload run")
    p.add_argument("--runs", type=int, default=3, help="repetitions (the ceiling is their median)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench-ceiling.json")
    a = p.parse_args(argv)
    if a.size_mib < 16 or a.runs < 1 or not 0.1 <= a.target_s <= 60:
        p.error("--size-mib >= 16, --runs >= 1 and 0.1 <= --target-s <= 60")
    if shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None:
        raise SystemExit("ci/bench ceiling: qemu-nbd and qemu-img are needed (apt-get install qemu-utils)")
    started = time.monotonic()
    runs = []
    with tempfile.TemporaryDirectory(prefix="phd-ceiling-") as tmp_name, \
            PortAllocator(index=PORT_BLOCK_INDEX, owner="ci/bench ceiling") as ports:
        tmp = Path(tmp_name)
        relay = build_relay(tmp)
        for i in range(a.runs):
            log(f"run {i + 1}/{a.runs}")
            runs.append(one_run(tmp, relay, ports, a.size_mib * MIB, a.target_s))
            log(f"  {json.dumps(runs[-1])}")
    summary = summarise(runs)
    result = {
        "what": "relayN / qemu-nbd: the most an upstairs moving a Crucible read's (1) or write's "
                "(3) copies over loopback TCP can reach, with no logic at all",
        "size_mib": a.size_mib, "runs": runs, **summary, "not_measured": NOT_MEASURED,
        "wall_s": round(time.monotonic() - started, 1),
    }
    print("workload       ceiling (median)   runs                  target  reachable")
    for name, t in summary["targets"].items():
        c = summary["ceiling"].get(name)
        if c is None:
            print(f"{name:<14} {'-':>16}   {'-':<21} {t['target']:>6}  not measured")
        else:
            print(f"{name:<14} {c['median']:>16}   {c['ratios']!s:<21} {t['target']:>6}  "
                  f"{'yes' if t['reachable'] else 'NO: target above the ceiling'}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"results in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
