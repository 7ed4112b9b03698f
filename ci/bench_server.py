"""Server benchmark: how fast a blocked start is unblocked or stopped, and how the API answers
while the guest writes to a Crucible disk flat out.

Usage: ci/bench server [--runs N] [--load-s S] [--downstairs docker|process] [--out PATH]

Everything goes through the framework exactly as the PHD suite does (a reference server
process per VM, three downstairs per disk, the tiny guest), so the figures are what a test sees:

  unblock_s     PUT .../vcr during a start blocked on an unreachable downstairs -> Running
                observed by the client (includes activating against the new downstairs)
  replace_call_s  the PUT .../vcr call alone (answered once the replacement is applied)
  stop_s        PUT /instance/state "Stop" during a blocked start -> Destroyed observed
  api_p99_ms    GET /instance latency while the guest runs `dd ... oflag=direct` to its Crucible
                disk in a loop (requests back to back, one at a time, for --load-s seconds);
                api_idle_p99_ms is the same with the guest idle, for comparison.
Targets (issue 4): unblock under 1 s plus activation, stop under 1 s, p99 under 100 ms.
Writes results/bench-server.json (CONTRACT) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from benchlib import REPO, factories, framework, log

from phd import CrucibleDisk, InstanceState, TestVm, VolumeStatus, ignore_status, wait_until
from phd.framework import Framework
from phd.vm.factory import DiskFactory, VmFactory

TARGETS = {"unblock_s": 1.0, "stop_s": 1.0, "api_p99_ms": 100.0}


def blocked_vm(vms: VmFactory, disks: DiskFactory, name: str) -> tuple[TestVm, CrucibleDisk]:
    """A VM whose start waits on a black-holed downstairs, with evidence that it does."""
    disk = disks.create_crucible_disk("data", size_gib=1)
    disk.enable_vcr_black_hole()
    vm = vms.new_vm(name)
    vm.attach(disk, device="data0", interface="virtio")
    vm.launch()
    target = disk.black_hole_address

    def blocked(status: VolumeStatus) -> bool:
        # The upstairs is going active, and the black-holed target is still connecting (the
        # reference server also counts its failed attempts).
        ds = status.target(target)
        return (status.state == "go_active" and ds is not None and ds.kind == "connecting"
                and int(ds.detail.get("failed_attempts", 1)) >= 1)

    wait_until(lambda: vm.disk_status(disk), blocked, what=f"activation blocked on {target}",
               timeout_s=60.0, interval_s=0.05)
    return vm, disk


def wait_state(vm: TestVm, state: InstanceState, timeout_s: float = 60.0) -> float:
    """Follow the state monitor until ``state``; returns the monotonic time it was seen."""
    vm.wait_for_state(state, timeout_s=timeout_s)
    return time.monotonic()


def measure_unblock(fw: Framework, tmp: Path, run: int) -> dict[str, float]:
    with factories(fw, tmp, "bench-server", f"unblock{run}") as (vms, disks):
        vm, disk = blocked_vm(vms, disks, f"unblock{run}")
        disk.disable_vcr_black_hole()
        disk.set_generation(2)
        t0 = time.monotonic()
        result = vm.replace_crucible_vcr(disk, timeout_s=30.0)
        t1 = time.monotonic()
        if result != "started":
            raise RuntimeError(f"replacement answered {result!r}, expected 'started'")
        t2 = wait_state(vm, InstanceState.RUNNING)
        return {"unblock_s": t2 - t0, "replace_call_s": t1 - t0}


def measure_stop(fw: Framework, tmp: Path, run: int) -> dict[str, float]:
    with factories(fw, tmp, "bench-server", f"stop{run}") as (vms, disks):
        vm, _ = blocked_vm(vms, disks, f"stop{run}")
        t0 = time.monotonic()
        vm.stop()
        t1 = wait_state(vm, InstanceState.DESTROYED)
        return {"stop_s": t1 - t0}


def sample_latency(url: str, seconds: float) -> list[float]:
    """GET url back to back for ``seconds``; every latency in milliseconds."""
    out: list[float] = []
    with httpx.Client(timeout=10.0) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            http.get(url).raise_for_status()
            out.append((time.perf_counter() - t0) * 1000.0)
    return out


def percentiles(samples: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(samples, n=100, method="inclusive")
    return {"n": len(samples), "p50_ms": round(qs[49], 2), "p90_ms": round(qs[89], 2),
            "p99_ms": round(qs[98], 2), "max_ms": round(max(samples), 2)}


PASS_MIB = 32
MIB = 1 << 20


def measure_api_under_io(fw: Framework, tmp: Path, load_s: float) -> dict[str, Any]:
    with factories(fw, tmp, "bench-server", "api") as (vms, disks):
        disk = disks.create_crucible_disk("data", size_gib=1)
        vm = vms.new_vm("api")
        vm.attach(disk, device="data0", interface="virtio")
        vm.launch()
        vm.wait_for_state(InstanceState.RUNNING, timeout_s=60.0)
        vm.wait_to_boot()
        url = vm.client.base_url + "/instance"
        idle = sample_latency(url, min(load_s, 5.0))
        # The guest writes 1 MiB direct I/O to its Crucible disk in a loop, in the
        # background, while the bench asks the API for the instance back to back.
        vm.run_shell_command(
            f"(while :; do dd if=/dev/zero of=/dev/vda bs=1M count={PASS_MIB} oflag=direct"
            " 2>>/tmp/dd.log; done) >/dev/null 2>&1 & :")

        def passes() -> int:  # busybox dd logs "N+0 records out" once per finished pass
            out = vm.run_shell_command("grep -c 'records out' /tmp/dd.log", check=ignore_status).output
            return int(out.strip() or 0)

        wait_until(passes, lambda n: n >= 1, what="the guest's first dd pass", timeout_s=60.0)
        before, t0 = passes(), time.monotonic()
        busy = sample_latency(url, load_s)
        after, t1 = passes(), time.monotonic()
        vm.run_shell_command("kill %1", check=ignore_status)
        return {
            "idle": percentiles(idle),
            "busy": percentiles(busy),
            "guest_write_mb_s": round((after - before) * PASS_MIB * MIB / (t1 - t0) / 1e6, 2),
            "guest_dd_passes": after - before,
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ci/bench server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="blocked starts per measurement (default 3)")
    ap.add_argument("--load-s", type=float, default=20.0, help="seconds of API sampling under I/O")
    ap.add_argument("--downstairs", choices=["docker", "process"], default="docker")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench-server.json")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.load_s <= 0:
        ap.error("--runs must be >= 1 and --load-s > 0")

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="phd-bench-server-") as tmp_name:
        tmp = Path(tmp_name)
        fw = framework(args.downstairs, tmp)
        try:
            unblock = [measure_unblock(fw, tmp, i) for i in range(args.runs)]
            for i, r in enumerate(unblock):
                log(f"unblock run {i}: replace call {r['replace_call_s']:.3f} s, "
                    f"-> Running {r['unblock_s']:.3f} s")
            stops = [measure_stop(fw, tmp, i) for i in range(args.runs)]
            for i, r in enumerate(stops):
                log(f"stop run {i}: -> Destroyed {r['stop_s']:.3f} s")
            api = measure_api_under_io(fw, tmp, args.load_s)
            log(f"api idle {api['idle']}, busy {api['busy']}, guest {api['guest_write_mb_s']} MB/s")
        finally:
            fw.close()

    result: dict[str, Any] = {
        "unblock_s": round(statistics.median(r["unblock_s"] for r in unblock), 3),
        "replace_call_s": round(statistics.median(r["replace_call_s"] for r in unblock), 3),
        "stop_s": round(statistics.median(r["stop_s"] for r in stops), 3),
        "api_p99_ms": api["busy"]["p99_ms"],
        "api_idle_p99_ms": api["idle"]["p99_ms"],
        "runs": {"unblock": unblock, "stop": stops},
        "api": api,
        "targets": TARGETS,
        "downstairs": args.downstairs,
        "command": "ci/bench server " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")
    return 0


def print_table(result: dict[str, Any]) -> None:
    fmt: dict[str, Callable[[float], str]] = {
        "unblock_s": lambda v: f"{v:.3f} s", "stop_s": lambda v: f"{v:.3f} s",
        "api_p99_ms": lambda v: f"{v:.1f} ms"}
    print(f"{'metric':<16}{'median':>12}{'target':>12}  met")
    for key, show in fmt.items():
        value, target = result[key], TARGETS[key]
        print(f"{key:<16}{show(value):>12}{show(target):>12}  {'yes' if value <= target else 'NO'}")
    print(f"{'replace_call_s':<16}{result['replace_call_s']:>10.3f} s")
    print(f"{'api_idle_p99_ms':<16}{result['api_idle_p99_ms']:>9.1f} ms"
          f"   (guest wrote {result['api']['guest_write_mb_s']} MB/s)")


if __name__ == "__main__":
    sys.exit(main())
