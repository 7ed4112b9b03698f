"""Suite benchmark: what the framework costs on top of QEMU, what two xdist workers buy, and what
a Crucible disk costs against a file disk, as the guest sees it.

Usage: ci/bench suite [--runs N] [--guests tiny,debian] [--boot auto|firmware|kernel]
                      [--write-guest tiny] [--write-mib 64] [--skip-boot] [--skip-write]
                      [--skip-xdist] [--downstairs docker|process] [--out PATH]

boot_overhead_ratio[guest]
    framework launch-to-shell / raw QEMU to the same shell: the median over --runs (default 3)
    back-to-back pairs per guest of the pair's ratio (the order alternates, so drift and cache
    warmth hit both; ratio_of_medians is in the JSON too).
    framework: VmFactory.new_vm (incl. the guest's qcow2 boot overlay) -> launch ->
               wait_for_state(Running) -> wait_to_boot, in this process, as a test does it;
               after one untimed boot, so each timed one finds the session's spare server
               warm, as every VM of a suite but the first does (--phd-spare-servers; the JSON
               says per run whether it took one).
    raw:       qemu-img overlay (disk guests) -> qemu-system-x86_64 with the same board,
               boot (the same BOOTROM and boot disk for firmware boot; the same kernel, initrd
               and cmdline for direct kernel boot), disks and NIC as the framework VM's spec
               (-accel as --phd-accel, serial on stdio pipes) -> the same guest adapter's login
               over the same console-matching code (phd.serial.SerialConsole fed from the pipe).
    --boot: how both sides boot (default auto: --phd-boot's rule, firmware for disk-image
    guests, kernel for initramfs guests); each guest's mode is in the JSON (boot[guest].boot).
    Target: <= 1.05 for tiny and debian (issue 17 item 4).
crucible_vs_file_write_ratio
    one tiny VM with a Crucible data disk (vda, 1 GiB, three downstairs) and a raw file data disk
    (vdb, 2 GiB, sparse, in the test directory); `dd if=/dev/zero bs=1M count=--write-mib
    oflag=direct` to each, one untimed pass each first (first writes allocate), then --runs
    alternating timed passes, timed in the guest (the kernel clock of /proc/timer_list around
    dd: busybox dd prints no rate); MB/s = 10^6 bytes/s; ratio of the medians (Crucible / file;
    < 1: Crucible is slower).
xdist_speedup
    wall time of `pytest tests/suite -m "not nightly"` on the default guest with -n 1, then -n 2
    (one run each): wall(-n 1) / wall(-n 2). --skip-xdist leaves it out.

One VM at a time (the xdist part is pytest's own). Everything is torn down on success, failure and
Ctrl-C; raw QEMU runs with PR_SET_PDEATHSIG (phd.process's die_with_parent), so even a SIGKILLed
bench takes it down.
Writes results/bench-suite.json (CONTRACT) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from benchlib import REPO, factories, framework, log

from phd import InstanceState
from phd.artifacts.store import GuestArtifact
from phd.core.process import ManagedProcess
from phd.framework import Framework
from phd.vm.factory import overlay_argv
from phd.vm.guest import adapter_for
from phd.vm.serial import SerialConsole

TARGET_BOOT_RATIO = 1.05
BOOT_TARGET_GUESTS = ("tiny", "debian")
MIB = 1 << 20


# --- boot: framework -------------------------------------------------------------------------
def framework_boot(fw: Framework, tmp: Path, guest: str, run: int,
                   boot: str) -> tuple[float, dict[str, Any]]:
    """Launch-to-shell through the framework; the seconds, plus the VM's spec and boot (the raw
    run copies them) and where the time went."""
    with factories(fw, tmp, "bench-suite", f"fw-{guest}-{run}") as (vms, _):
        taken = fw.spares.taken
        t0 = time.monotonic()
        vm = vms.new_vm(f"boot{run}", guest=guest, boot=boot)
        t_new = time.monotonic()
        spare = fw.spares.taken > taken
        vm.launch()
        t_launched = time.monotonic()
        vm.wait_for_state(InstanceState.RUNNING, timeout_s=120.0)
        t_running = time.monotonic()
        vm.wait_to_boot()
        t_shell = time.monotonic()
        # Proof it is a live shell, outside the timed part.
        assert vm.run_shell_command("echo phd-bench").output == "phd-bench"
        spec = vm.spec()
        base = getattr(vm.boot_disk, "base", None)
        firmware = vm.server.bootrom if vm.config.boot == "firmware" else None
        split = {"new_vm_s": t_new - t0, "launch_s": t_launched - t_new,
                 "to_running_s": t_running - t_launched, "running_to_shell_s": t_shell - t_running}
        return t_shell - t0, {"spec": spec, "base": base, "bootrom": firmware, "boot": vm.config.boot,
                              "split": {k: round(v, 3) for k, v in split.items()}, "spare_server": spare}


# --- boot: raw QEMU ----------------------------------------------------------------------------
class PipeConsole(SerialConsole):
    """The framework's console matcher (escape cleaning, cursor, failure patterns) fed from
    QEMU's stdio serial instead of the server's websocket, so both sides wait the same way."""

    def __init__(self, proc: ManagedProcess, transcript: Path) -> None:
        super().__init__(ws_url="stdio:", transcript=transcript)
        self._out: IO[bytes] = proc.stdout
        self._in: IO[bytes] = proc.stdin
        self._pipe_thread: threading.Thread | None = None

    def connect(self) -> None:
        self._pipe_thread = threading.Thread(target=self._pipe_reader, name="bench-serial", daemon=True)
        self._pipe_thread.start()

    def _pipe_reader(self) -> None:
        fd = self._out.fileno()
        while data := os.read(fd, 65536):
            self._feed(data)
        with self._cond:
            self._closed_reason = "QEMU closed its serial (stdout)"
            self._cond.notify_all()

    def send(self, text: str) -> None:
        self._in.write(text.encode())
        self._in.flush()

    def close(self) -> None:
        if self._pipe_thread is not None:
            self._pipe_thread.join(timeout=5)
        if self._transcript is not None:
            self._transcript.close()
            self._transcript = None


def _disks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Disk device -> its file_storage_backend component, in PCI order (the guest's order)."""
    components = spec["components"]
    kinds = ("virtio_disk", "nvme_disk")
    found = [(key, c["component"]) for key, c in components.items() if c["type"] in kinds]
    devices = sorted(found, key=lambda kc: kc[1]["pci_path"]["device"])
    out = {}
    for key, device in devices:
        backend = components[device["backend_id"]]
        if backend["type"] != "file_storage_backend":
            raise ValueError(f"raw QEMU runs file disks only; {key} is on a {backend['type']}")
        out[key] = backend["component"]
    return out


def _is_qcow2(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"QFI\xfb"


def raw_argv(spec: dict[str, Any], guest: GuestArtifact, accel: str, disks: dict[str, Path],
             ssh_port: int | None, bootrom: Path | None = None) -> list[str]:
    """QEMU as the reference server would start it for the v5 `spec` and its boot - `bootrom`
    booting the first disk (firmware boot), else the guest's direct kernel boot (server
    options) - minus what only a managed VM needs (QMP, -S paused start): same board, file
    disks, user NIC."""
    board = spec["board"]
    argv = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
            "-accel", accel, "-machine", "q35,graphics=off",
            "-smp", str(board["cpus"]), "-m", str(board["memory_mb"]),
            "-chardev", "stdio,id=serial0,signal=off", "-serial", "chardev:serial0"]
    if bootrom is not None:
        argv += ["-bios", str(bootrom)]
    else:
        argv += ["-kernel", str(guest.kernel), "-append", guest.cmdline, "-initrd", str(guest.initrd)]
    for index, device in enumerate(_disks(spec)):
        node = f"{device}-backend"
        fmt = "qcow2" if _is_qcow2(str(disks[device])) else "raw"
        argv += ["-blockdev", f"driver={fmt},node-name={node},read-only=off,"
                              f"file.driver=file,file.filename={disks[device]}",
                 "-device", f"virtio-blk-pci,drive={node},id={device}"
                            + (",bootindex=0" if bootrom is not None and index == 0 else "")]
    for name, c in spec["components"].items():
        if c["type"] != "virtio_nic":
            continue
        netdev = f"user,id={name},restrict=on"
        if ssh_port is not None:
            netdev += f",hostfwd=tcp:127.0.0.1:{ssh_port}-:22"
        argv += ["-netdev", netdev, "-device", f"virtio-net-pci,netdev={name},id={name}-nic"]
    return argv


def raw_boot(fw: Framework, tmp: Path, guest: GuestArtifact, vm_info: dict[str, Any],
             run: int) -> tuple[float, list[str]]:
    """Launch-to-shell of plain QEMU for the same VM; the seconds and the argv used."""
    spec: dict[str, Any] = vm_info["spec"]
    work = tmp / f"raw-{guest.name}-{run}"
    work.mkdir(parents=True)
    ports: list[int] = []
    proc: ManagedProcess | None = None
    console: PipeConsole | None = None
    try:
        t0 = time.monotonic()
        disks: dict[str, Path] = {}
        for device, backend in _disks(spec).items():
            if _is_qcow2(backend["path"]):
                # A fresh overlay of the same image, as new_vm makes (timed on both sides).
                assert vm_info["base"] is not None, f"{guest.name}: a qcow2 boot disk but no image"
                disks[device] = work / f"{device}.qcow2"
                subprocess.run(overlay_argv(vm_info["base"], disks[device]), check=True,  # noqa: S603
                               stdin=subprocess.DEVNULL, capture_output=True)
            else:
                disks[device] = Path(backend["path"])
        ssh_port = None
        if any(c["type"] == "virtio_nic" for c in spec["components"].values()):
            ssh_port = fw.ports.allocate()
            ports.append(ssh_port)
        argv = raw_argv(spec, guest, fw.config.accel, disks, ssh_port, vm_info["bootrom"])
        # The serial console on stdio pipes; PR_SET_PDEATHSIG: the kernel takes QEMU down with
        # this (main) thread, even when the bench is SIGKILLed.
        proc = ManagedProcess(argv, name=f"raw QEMU ({guest.name} run {run})", log_path=work / "qemu.log",
                              pipe_stdio=True, die_with_parent=True).start()
        console = PipeConsole(proc, work / "serial.log")
        console.connect()
        adapter = adapter_for(guest.guest_os or guest.name)(console)
        adapter.login()
        t_shell = time.monotonic()
        assert adapter.run("echo phd-bench").output == "phd-bench"
        return t_shell - t0, argv
    except BaseException:
        qemu_log_path = work / "qemu.log"
        tail = qemu_log_path.read_text(errors="replace")[-2000:] if qemu_log_path.exists() else ""
        log(f"raw {guest.name} run {run} failed; QEMU log:\n{tail}")
        raise
    finally:
        if proc is not None:
            proc.stop()  # SIGTERM, SIGKILL after 10 s; closes the pipes
        if console is not None:
            console.close()
        for port in ports:
            fw.ports.release(port)


def measure_boot(fw: Framework, tmp: Path, guest: str, runs: int, boot: str) -> dict[str, Any]:
    artifact = fw.artifacts.guest(guest)  # built/verified once, outside the timed part
    fw_s: list[float] = []
    raw_s: list[float] = []
    splits: list[dict[str, float]] = []
    vm_info: dict[str, Any] | None = None
    raw_cmd: list[str] = []

    def one_fw(i: int) -> None:
        nonlocal vm_info
        seconds, info = framework_boot(fw, tmp, guest, i, boot)
        vm_info = info
        fw_s.append(seconds)
        splits.append(info["split"])
        spares.append(info["spare_server"])
        log(f"{guest} run {i}: framework {seconds:.2f} s {info['split']} "
            f"spare server: {info['spare_server']}")

    def one_raw(i: int) -> None:
        nonlocal raw_cmd
        assert vm_info is not None
        seconds, raw_cmd = raw_boot(fw, tmp, artifact, vm_info, i)
        raw_s.append(seconds)
        log(f"{guest} run {i}: raw QEMU {seconds:.2f} s")

    # Untimed: a suite's VMs follow one another, so every VM but a session's first finds the
    # session's spare server (phd.vm.spares) warm; so does every timed run after this one.
    framework_boot(fw, tmp, guest, -1, boot)
    spares: list[bool] = []
    for i in range(runs):
        # The first framework boot gives the spec the raw boots copy; after it the order
        # alternates (raw first on odd runs) so neither side always boots into a warm cache.
        fw_first = i % 2 == 0 or vm_info is None
        order: list[Callable[[int], None]] = [one_fw, one_raw] if fw_first else [one_raw, one_fw]
        for step in order:
            step(i)
    framework_median, raw_median = statistics.median(fw_s), statistics.median(raw_s)
    # The headline is the median of the per-run ratios: the two boots of a run are back to
    # back, so a burst of load from elsewhere on the machine hits both, and cancels.
    pairs = [f / r for f, r in zip(fw_s, raw_s, strict=True)]
    assert vm_info is not None
    return {
        "boot": vm_info["boot"],
        "ratio": round(statistics.median(pairs), 3),
        "framework_s": round(framework_median, 3), "raw_qemu_s": round(raw_median, 3),
        "ratio_of_medians": round(framework_median / raw_median, 3),
        "pair_ratios": [round(x, 3) for x in pairs],
        "framework_runs_s": [round(x, 3) for x in fw_s], "raw_runs_s": [round(x, 3) for x in raw_s],
        "framework_split_median_s": {k: round(statistics.median(s[k] for s in splits), 3)
                                     for k in splits[0]},
        "framework_took_a_spare_server": spares,
        "raw_argv": shlex.join(raw_cmd),
    }


# --- Crucible vs file writes -------------------------------------------------------------------
_RECORDS = re.compile(r"^(\d+)\+0 records out", re.M)
_TOOK = re.compile(r"^took (\d+) (\d+)$", re.M)


def measure_writes(fw: Framework, tmp: Path, guest: str, runs: int, mib: int) -> dict[str, Any]:
    with factories(fw, tmp, "bench-suite", f"write-{guest}") as (vms, disks):
        crucible = disks.create_crucible_disk("data", size_gib=1)
        file_disk = disks.create_file_disk("filedata", size_gib=2)
        vm = vms.new_vm("write", guest=guest)
        vm.attach(crucible, device="data0", interface="virtio")
        vm.attach(file_disk, device="data1", interface="virtio")
        vm.launch()
        vm.wait_for_state(InstanceState.RUNNING, timeout_s=120.0)
        vm.wait_to_boot()
        boot_disk = 1 if vm.boot_disk is not None else 0
        names = {"crucible": f"vd{chr(ord('a') + boot_disk)}", "file": f"vd{chr(ord('a') + boot_disk + 1)}"}
        # Evidence the device names are the disks we think: their sizes differ (1 vs 2 GiB).
        for kind, size in (("crucible", crucible.size_bytes), ("file", file_disk.size_bytes)):
            sectors = vm.run_shell_command(f"cat /sys/block/{names[kind]}/size").output
            if int(sectors) * 512 != size:
                raise RuntimeError(f"/dev/{names[kind]} has {sectors} sectors, expected the {kind} disk "
                                   f"({size} bytes)")

        clocks: set[str] = set()

        def dd(kind: str) -> float:
            # busybox dd prints no byte count or time (no third status line) and busybox date
            # has no %N, so the guest times dd by the kernel's own clock: "now at N nsecs" of
            # /proc/timer_list (/proc/uptime, 10 ms, where that file is missing). "N+0 records
            # out" proves every 1 MiB block was written.
            clock = ("{ awk '/^now at/ {print $3; exit}' /proc/timer_list 2>/dev/null || "
                     "awk '{printf \"%.0f\\n\", $1 * 1e9}' /proc/uptime; }")
            out = vm.run_shell_command(
                f"t0=$({clock}); dd if=/dev/zero of=/dev/{names[kind]} bs=1M count={mib} oflag=direct "
                f"2>&1; t1=$({clock}); echo \"took $t0 $t1\"", timeout_s=300.0).output
            records, took = _RECORDS.search(out), _TOOK.search(out)
            if records is None or took is None or int(records.group(1)) != mib:
                raise RuntimeError(f"dd of {mib} MiB to /dev/{names[kind]} did not report {mib} full "
                                   f"records and a time: {out!r}")
            seconds = (int(took.group(2)) - int(took.group(1))) / 1e9
            # /proc/uptime's fallback values are whole multiples of 10 ms.
            clocks.add("timer_list ns" if int(took.group(1)) % 10_000_000 else "uptime 10 ms")
            if seconds <= 0.0:
                raise RuntimeError(f"the guest's clock did not advance over dd: {out!r}")
            return mib * MIB / seconds / 1e6

        warm = {kind: round(dd(kind), 2) for kind in ("crucible", "file")}
        log(f"untimed first pass (allocating): {warm} MB/s")
        rates: dict[str, list[float]] = {"crucible": [], "file": []}
        for i in range(runs):
            for kind in (("crucible", "file") if i % 2 == 0 else ("file", "crucible")):
                rates[kind].append(dd(kind))
            log(f"write run {i}: crucible {rates['crucible'][-1]:.1f} MB/s, "
                f"file {rates['file'][-1]:.1f} MB/s")
    crucible_mb_s, file_mb_s = statistics.median(rates["crucible"]), statistics.median(rates["file"])
    return {"crucible_write_mb_s": round(crucible_mb_s, 2), "file_write_mb_s": round(file_mb_s, 2),
            "ratio": round(crucible_mb_s / file_mb_s, 3),
            "runs_mb_s": {k: [round(x, 2) for x in v] for k, v in rates.items()},
            "first_pass_mb_s": warm, "guest": guest, "mib_per_pass": mib, "guest_clock": sorted(clocks),
            "downstairs": fw.config.downstairs}


# --- xdist -------------------------------------------------------------------------------------
def suite_wall(workers: int, tmp: Path) -> dict[str, Any]:
    junit = tmp / f"xdist-n{workers}.xml"
    out = REPO / "results" / f"bench-suite-xdist-n{workers}.log"
    argv = [sys.executable, "-m", "pytest", "tests/suite", "-m", "not nightly", "-n", str(workers),
            "-p", "no:cacheprovider", "-q", f"--junitxml={junit}"]
    # The default guest and no test shard or regression switch, whatever this shell has set.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PHD_GUEST", "PHD_GUESTS", "PHD_SHARD", "PHD_REGRESSION")}
    log(f"suite with -n {workers} (output: {out.relative_to(REPO)})")
    t0 = time.monotonic()
    with out.open("wb") as sink:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,  # noqa: S603
                                stdout=sink, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.wait(timeout=300)  # it got the Ctrl-C too: let it tear its VMs down
            raise
    wall = time.monotonic() - t0
    tally = {"passed": 0, "failed": 0, "skipped": 0}
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            kind = ("failed" if case.find("failure") is not None or case.find("error") is not None
                    else "skipped" if case.find("skipped") is not None else "passed")
            tally[kind] += 1
    log(f"suite -n {workers}: {wall:.1f} s, exit {rc}, {tally}")
    return {"wall_s": round(wall, 1), "exit": rc, **tally}


def _qemu_count() -> int:
    n = 0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            n += comm.read_text().startswith("qemu-system")
    return n


# --- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ci/bench suite", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs per measurement (default 3)")
    ap.add_argument("--guests", default="tiny,debian", help="guests for the boot overhead")
    ap.add_argument("--boot", choices=["auto", "firmware", "kernel"], default="auto",
                    help="how both sides boot (default auto: firmware for disk-image guests)")
    ap.add_argument("--write-guest", default="tiny", help="guest for the write comparison")
    ap.add_argument("--write-mib", type=int, default=64, help="MiB per dd pass (default 64)")
    ap.add_argument("--skip-boot", action="store_true")
    ap.add_argument("--skip-write", action="store_true")
    ap.add_argument("--skip-xdist", action="store_true", help="leave out the two suite runs")
    ap.add_argument("--downstairs", choices=["docker", "process"], default="docker")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench-suite.json")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.write_mib < 1:
        ap.error("--runs and --write-mib must be >= 1")
    guests = tuple(g.strip() for g in args.guests.split(",") if g.strip())

    t_start = time.monotonic()
    # Other VMs on the machine (another job, a person) slow both sides but add noise; the load
    # and the QEMU processes that are not ours are recorded so a reader can judge the numbers.
    result: dict[str, Any] = {"load_before": [round(x, 2) for x in os.getloadavg()],
                              "other_qemu_before": _qemu_count()}
    (REPO / "results").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="phd-bench-suite-") as tmp_name:
        tmp = Path(tmp_name)
        fw = framework(args.downstairs, tmp, guests)
        try:
            if not args.skip_boot:
                boot = {g: measure_boot(fw, tmp, g, args.runs, args.boot) for g in guests}
                result["boot_overhead_ratio"] = {g: b["ratio"] for g, b in boot.items()}
                result["boot"] = boot
            if not args.skip_write:
                write = measure_writes(fw, tmp, args.write_guest, args.runs, args.write_mib)
                result["crucible_vs_file_write_ratio"] = write["ratio"]
                result["write"] = write
        finally:
            fw.close()
        if not args.skip_xdist:
            n1, n2 = suite_wall(1, tmp), suite_wall(2, tmp)
            result["xdist_speedup"] = round(n1["wall_s"] / n2["wall_s"], 3)
            result["xdist"] = {"n1": n1, "n2": n2, "selection": "tests/suite -m 'not nightly'",
                               "suite_green": n1["exit"] == 0 and n2["exit"] == 0}
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["targets"] = {"boot_overhead_ratio": {g: TARGET_BOOT_RATIO for g in BOOT_TARGET_GUESTS}}
    result["runs"] = args.runs
    result["accel"] = fw.config.accel
    result["command"] = "ci/bench suite " + shlex.join(argv if argv is not None else sys.argv[1:])
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")
    suite_ok = result.get("xdist", {}).get("suite_green", True)
    if not suite_ok:
        print("note: a suite run had failures, so its wall time is not the green suite's")
    return 0 if suite_ok else 1


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{'metric':<34}{'value':>10}  {'detail'}")
    for guest, b in result.get("boot", {}).items():
        target = TARGET_BOOT_RATIO if guest in BOOT_TARGET_GUESTS else None
        met = "" if target is None else (
            f"  target <= {target}: {'met' if b['ratio'] <= target else 'NOT MET'}")
        print(f"{'boot_overhead_ratio[' + guest + ']':<34}{b['ratio']:>10.3f}  {b['boot']} boot: framework "
              f"{b['framework_s']:.2f} s / raw QEMU {b['raw_qemu_s']:.2f} s (medians; pairs "
              f"{', '.join(f'{x:.2f}' for x in b['pair_ratios'])}){met}")
    if "write" in result:
        w = result["write"]
        print(f"{'crucible_vs_file_write_ratio':<34}{w['ratio']:>10.3f}  "
              f"Crucible {w['crucible_write_mb_s']:.1f} MB/s / file {w['file_write_mb_s']:.1f} MB/s "
              f"({w['guest']}, {w['mib_per_pass']} MiB dd "
              "oflag=direct)")
    if "xdist" in result:
        x = result["xdist"]
        print(f"{'xdist_speedup':<34}{result['xdist_speedup']:>10.3f}  -n 1 {x['n1']['wall_s']:.0f} s / -n 2 "
              f"{x['n2']['wall_s']:.0f} s ({x['n2']['passed']} passed, {x['n2']['failed']} failed, "
              f"{x['n2']['skipped']} skipped)")
    print(f"{'wall':<34}{result['wall_s']:>9.0f}s  load average {result['load_before'][0]} before, "
          f"{result['load_after'][0]} after; {result['other_qemu_before']} other QEMU running at the start")


if __name__ == "__main__":
    sys.exit(main())
