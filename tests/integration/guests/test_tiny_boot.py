"""Build the tiny guest for real and boot it under raw QEMU (TCG), no server in between.

Proves the recipe's contract: the login prompt and shell prompt in guest.json are
exactly what the console shows, both disk interfaces are visible, exit statuses
come through, and ``poweroff -f`` ends QEMU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from guests.tiny.build import BuildResult, build

pytestmark = pytest.mark.integration

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT_S = 120.0
COMMAND_TIMEOUT_S = 30.0
VIRTIO_DISK_BYTES = 64 * 1024 * 1024
NVME_DISK_BYTES = 32 * 1024 * 1024
# Fail at once instead of waiting out the deadline when the guest is dead.
FAILURE_MARKERS = ("Kernel panic", "not syncing")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class SerialConsole:
    """Collects QEMU's ``-serial stdio`` output on a thread; waits poll it to a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes], transcript: Path) -> None:
        assert proc.stdout is not None
        assert proc.stdin is not None
        self._proc = proc
        self._stdin: IO[bytes] = proc.stdin
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._transcript = transcript.open("wb")
        self._thread = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[bytes]) -> None:
        fd = stream.fileno()
        while chunk := os.read(fd, 4096):
            self._transcript.write(chunk)
            self._transcript.flush()
            with self._cond:
                self._buf += chunk
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def text(self, start: int = 0, end: int | None = None) -> str:
        with self._cond:
            return self._buf[start:end].decode(errors="replace")

    @property
    def offset(self) -> int:
        with self._cond:
            return len(self._buf)

    def wait_for(self, needle: str, *, after: int, timeout: float) -> int:
        """Offset just past the first ``needle`` at or after ``after``."""
        wanted = needle.encode()
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self._buf.find(wanted, after)
                if found >= 0:
                    return found + len(wanted)
                seen = self._buf[after:].decode(errors="replace")
                if any(marker in seen for marker in FAILURE_MARKERS):
                    pytest.fail(f"guest failed while waiting for {needle!r}:\n{seen[-2000:]}")
                if self._eof:
                    pytest.fail(
                        f"QEMU exited ({self._proc.poll()}) before {needle!r} appeared; "
                        f"last output:\n{seen[-2000:]}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"no {needle!r} within {timeout:.0f} s; last output:\n{seen[-2000:]}")
                self._cond.wait(remaining)

    def send(self, text: str) -> None:
        self._stdin.write(text.encode())
        self._stdin.flush()

    def close(self) -> None:
        self._thread.join(timeout=10)
        self._transcript.close()


def shell(console: SerialConsole, command: str, prompt: str) -> str:
    """Run one command at the shell prompt and return its output (echo and prompt removed)."""
    start = console.offset
    console.send(command + "\n")
    end = console.wait_for(prompt, after=start, timeout=COMMAND_TIMEOUT_S)
    raw = _ANSI.sub("", console.text(start, end - len(prompt.encode())))
    lines = raw.replace("\r", "").split("\n")
    # The first line is the shell's echo of what was typed.
    assert command in lines[0], f"expected the echo of {command!r}, got {lines[0]!r}"
    return "\n".join(lines[1:]).strip()


@pytest.fixture(scope="module")
def tiny_guest(tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    base = os.environ.get("PHD_ARTIFACT_DIR")
    root = Path(base) if base else tmp_path_factory.getbasetemp() / "artifacts"
    started = time.monotonic()
    result = build(root / "tiny")
    print(f"\ntiny build: {time.monotonic() - started:.2f} s (built={result.built})")
    return result


@pytest.fixture
def qemu_disks(tmp_path: Path) -> tuple[Path, Path]:
    disks = []
    for name, size in (("virtio.raw", VIRTIO_DISK_BYTES), ("nvme.raw", NVME_DISK_BYTES)):
        path = tmp_path / name
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "raw", str(path), str(size)],
            stdin=subprocess.DEVNULL,
            check=True,
        )
        disks.append(path)
    return disks[0], disks[1]


@pytest.fixture
def booted(
    tiny_guest: BuildResult, qemu_disks: tuple[Path, Path], tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], SerialConsole, float]]:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed: run ci/bootstrap")
    out = tiny_guest.out
    virtio, nvme = qemu_disks
    argv = [
        QEMU, "-accel", "tcg", "-m", "256", "-smp", "2",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", "stdio",
        # the file direct kernel boot loads (the PVH ELF; firmware boot covers the bzImage)
        "-kernel", str(out / json.loads((out / "guest.json").read_text())["files"]["kernel"]),
        "-initrd", str(out / "initrd.img"),
        "-append", (out / "cmdline").read_text().strip(),
        "-drive", f"file={virtio},if=none,id=vd0,format=raw",
        "-device", "virtio-blk-pci,drive=vd0",
        "-drive", f"file={nvme},if=none,id=nv0,format=raw",
        "-device", "nvme,serial=phd0,drive=nv0",
    ]  # fmt: skip
    started = time.monotonic()
    # stdin is a pipe on purpose: it is the serial line's keyboard.
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    console = SerialConsole(proc, tmp_path / "serial.log")
    try:
        yield proc, console, started
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        assert proc.stdin is not None
        proc.stdin.close()
        console.close()
        assert proc.stdout is not None
        proc.stdout.close()


def test_tiny_guest_boots_logs_in_and_powers_off(
    tiny_guest: BuildResult,
    booted: tuple[subprocess.Popen[bytes], SerialConsole, float],
    record_property: Callable[[str, object], None],
) -> None:
    proc, console, started = booted
    meta = json.loads((tiny_guest.out / "guest.json").read_text())
    login_prompt, shell_prompt = meta["login_prompt"], meta["shell_prompt"]
    assert (login_prompt, shell_prompt) == ("tiny login: ", "root@tiny:~# ")

    at_login = console.wait_for(login_prompt, after=0, timeout=BOOT_TIMEOUT_S)
    login_s = time.monotonic() - started
    banner = console.text(0, at_login)
    assert "phd-tiny: modules loaded, disks:" in banner
    assert "insmod" not in banner, f"a module failed to load:\n{banner}"

    console.send(meta["login_user"] + "\n")
    console.wait_for(shell_prompt, after=at_login, timeout=COMMAND_TIMEOUT_S)
    shell_s = time.monotonic() - started

    sectors = shell(console, "cat /sys/block/vda/size", shell_prompt)
    assert sectors == str(VIRTIO_DISK_BYTES // 512)
    assert shell(console, "cat /sys/block/nvme0n1/size", shell_prompt) == str(NVME_DISK_BYTES // 512)
    assert {"vda", "nvme0n1"} <= set(shell(console, "ls /sys/block", shell_prompt).split())
    assert shell(console, "hostname", shell_prompt) == "tiny"

    assert shell(console, "sh -c 'exit 3'", shell_prompt) == ""
    assert shell(console, "echo $?", shell_prompt) == "3"
    assert shell(console, "true; echo $?", shell_prompt) == "0"

    console.send("poweroff -f\n")
    try:
        code = proc.wait(timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"QEMU still running after poweroff -f; console:\n{console.text()[-2000:]}")
    assert code == 0

    record_property("boot_to_login_s", round(login_s, 2))
    record_property("boot_to_shell_s", round(shell_s, 2))
    print(f"\ntiny boot: login prompt after {login_s:.2f} s, shell prompt after {shell_s:.2f} s")


def test_boot_raw_is_a_gpt_disk_whose_esp_boots_this_kernel_initrd_and_cmdline(
    tiny_guest: BuildResult, tmp_path: Path
) -> None:
    """boot.raw, the firmware-bootable form (booted through OVMF by tests/suite/test_firmware.py):
    one EFI system partition whose removable-media boot file is a unified kernel image made of
    exactly the recipe's vmlinuz, initrd.img and cmdline."""
    for tool in ("sfdisk", "mcopy", "objcopy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: run ci/bootstrap")
    out = tiny_guest.out
    meta = json.loads((out / "guest.json").read_text())
    assert meta["files"]["firmware_disk"] == "boot.raw"
    image = out / meta["files"]["firmware_disk"]
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    (esp,) = table["partitions"]
    assert (esp["type"], esp["name"]) == ("C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "esp")
    uki = tmp_path / "BOOTX64.EFI"
    subprocess.run(["mcopy", "-i", f"{image}@@{esp['start'] * 512}", "::/EFI/BOOT/BOOTX64.EFI", str(uki)],
                   check=True, capture_output=True)
    for section, expected in ((".linux", out / "vmlinuz"), (".initrd", out / "initrd.img")):
        dumped = tmp_path / section.strip(".")
        subprocess.run(["objcopy", "-O", "binary", f"--only-section={section}", str(uki), str(dumped)],
                       check=True, capture_output=True)
        assert dumped.read_bytes() == expected.read_bytes(), f"{section} is not {expected.name}"
    dumped = tmp_path / "cmdline"
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.cmdline", str(uki), str(dumped)],
                   check=True, capture_output=True)
    assert dumped.read_text() == (out / "cmdline").read_text().strip()
