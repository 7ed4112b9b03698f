"""Migration benchmark: how long a live migration takes and how long the guest stands still.

Usage: ci/bench migration [--runs N] [--memory-mib M] [--downstairs docker|process] [--out PATH]

Everything goes through the framework as the suite does (a reference server per VM, the tiny
guest with a Crucible data disk of three downstairs), once idle and once while the guest
writes to that disk (a dd loop with a flush per write). Per scenario, the median of --runs:

  total_s               vm.migrate_from(source) as a test sees it: the target's PUT /instance
                        until its migration_in is Finish and it is Running
  downtime_ms           the guest's vCPUs stand still: the source's Pause phase (paused before
                        the switch-over) until the target's Server phase (the target ran QMP
                        cont); both servers stamp their phases with the host's CLOCK_MONOTONIC
                        (the source sees the pause by polling QMP every 10 ms: up to that much
                        of the downtime can go uncounted)
  crucible_handover_ms  the target's Resume phase until its Server phase: the Crucible disk
                        activates at the next generation (fencing the source's upstairs), then
                        cont; part of downtime_ms
  qemu_downtime_ms      QEMU's own figure on the source (query-migrate "downtime"), for comparison

The top-level downtime_ms, total_s and crucible_handover_ms are the idle scenario's (CONTRACT);
"under_writes" has the same keys. Writes results/bench-migration.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import REPO, factories, framework, log

from phd import InstanceState, TestVm, wait_until
from phd.framework import Framework

KEYS = ("downtime_ms", "total_s", "crucible_handover_ms", "qemu_downtime_ms")
TMPFS = "/run/phd-bench"


def _log_records(vm: TestVm) -> list[dict[str, Any]]:
    path = vm.server.log_path
    if path is None:
        raise RuntimeError(f"VM {vm.config.name} has no server log (--phd-output-mode null?)")
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _phase_time(vm: TestVm, migration_id: str, direction: str, phase: str) -> float:
    for record in _log_records(vm):
        if (record.get("msg") == "migration phase" and record.get("migration_id") == migration_id
                and record.get("direction") == direction and record.get("phase") == phase):
            return float(record["monotonic"])
    raise RuntimeError(f"VM {vm.config.name}'s server logged no {direction} phase {phase} of {migration_id}")


def _qemu_downtime(vm: TestVm, migration_id: str) -> float | None:
    for record in _log_records(vm):
        if record.get("msg") == "QEMU migration completed" and record.get("migration_id") == migration_id:
            value = record.get("qemu_downtime_ms")
            return float(value) if value is not None else None
    return None


def measure(fw: Framework, tmp: Path, scenario: str, run: int, memory_mib: int) -> dict[str, float | None]:
    with factories(fw, tmp, "bench-migration", f"{scenario}{run}") as (vms, disks):
        disk = disks.create_crucible_disk("data", size_gib=1)
        source = vms.new_vm(f"{scenario}{run}-src", guest="tiny", memory_mib=memory_mib)
        source.attach(disk, device="data0")
        source.launch()
        source.wait_for_state(InstanceState.RUNNING, timeout_s=120.0)
        source.wait_to_boot()
        if scenario == "writes":
            dev = source.device_path(disk)
            source.run_shell_command(f"mkdir -p {TMPFS} && mount -t tmpfs phd {TMPFS} && echo 0 > {TMPFS}/n")
            source.run_shell_command(
                f"(i=0; while true; do i=$((i+1)); dd if=/dev/urandom of={dev} bs=64k count=1 "
                f"seek=$((i % 1024)) conv=notrunc,fsync 2>/dev/null && echo $i > {TMPFS}/n; done) "
                ">/dev/null 2>&1 &")
            wait_until(lambda: int(source.run_shell_command(f"cat {TMPFS}/n").output), lambda n: n >= 5,
                       what="the guest's writer to get going", timeout_s=60.0)
        target = vms.new_migration_target(source, f"{scenario}{run}-dst")
        migration_id = f"00000000-0000-4000-8000-{run:04d}{len(scenario):08d}"
        t0 = time.monotonic()
        target.migrate_from(source, timeout_s=600.0, migration_id=migration_id)
        total = time.monotonic() - t0
        source.wait_for_state(InstanceState.DESTROYED, timeout_s=60.0)
        pause = _phase_time(source, migration_id, "out", "Pause")
        resume = _phase_time(target, migration_id, "in", "Resume")
        running = _phase_time(target, migration_id, "in", "Server")
        return {"total_s": round(total, 3), "downtime_ms": round((running - pause) * 1000, 1),
                "crucible_handover_ms": round((running - resume) * 1000, 1),
                "qemu_downtime_ms": _qemu_downtime(source, migration_id)}


def _median(runs: list[dict[str, float | None]], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return round(statistics.median(v for v in values if v is not None), 3) if values else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ci/bench migration", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="migrations per scenario (default 3)")
    ap.add_argument("--memory-mib", type=int, default=256, help="guest memory (default 256)")
    ap.add_argument("--downstairs", choices=["docker", "process"], default="docker")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench-migration.json")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.memory_mib < 64:
        ap.error("--runs must be >= 1 and --memory-mib >= 64")

    t_start = time.monotonic()
    runs: dict[str, list[dict[str, float | None]]] = {}
    with tempfile.TemporaryDirectory(prefix="phd-bench-migration-") as tmp_name:
        tmp = Path(tmp_name)
        fw = framework(args.downstairs, tmp)
        try:
            for scenario in ("idle", "writes"):
                runs[scenario] = []
                for i in range(args.runs):
                    r = measure(fw, tmp, scenario, i, args.memory_mib)
                    log(f"{scenario} run {i}: {r}")
                    runs[scenario].append(r)
        finally:
            fw.close()

    idle = {key: _median(runs["idle"], key) for key in KEYS}
    writes = {key: _median(runs["writes"], key) for key in KEYS}
    result: dict[str, Any] = {
        **idle,
        "under_writes": writes,
        "runs": runs,
        "guest": "tiny",
        "memory_mib": args.memory_mib,
        "downstairs": args.downstairs,
        "command": "ci/bench migration " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'metric':<22}{'idle':>12}{'under writes':>16}")
    for key in KEYS:
        print(f"{key:<22}{idle[key]!s:>12}{writes[key]!s:>16}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
