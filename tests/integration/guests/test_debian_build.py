"""Build the debian guest for real, twice at once, then once more from the cache.

Two ``guests/debian/build`` processes on one fresh ``--out`` (the pytest-xdist situation):
one builds (mmdebstrap, about a minute), the other waits on the lock and reuses the
result; a third run is a no-op that touches nothing. The image is then inspected without
booting it (``debugfs`` reads the ext4 image directly): the recipe's configuration is in
it, owned by root. Booting it is the suite's job (``--phd-guests debian``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.guests.builds import build_twice_at_once

# Nightly only: a from-scratch mmdebstrap build takes two minutes of one core. On a change the
# PR run still builds the debian guest whenever its recipe changed (the suite stage's cache key
# covers every recipe file), and test_tiny_build_concurrency proves the shared lock-and-cache
# protocol (guests/common/recipe.py) on every run.
pytestmark = [pytest.mark.integration, pytest.mark.nightly]

BUILD = Path(__file__).resolve().parents[3] / "guests" / "debian" / "build"
BUILD_TIMEOUT_S = 900


@pytest.fixture
def out_dir(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("the debian recipe needs root (mmdebstrap --mode=root)")
    missing = [tool for tool in ("mmdebstrap", "mke2fs", "debugfs") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run ci/bootstrap")
    yield tmp_path / "debian"
    # The image is 400 MB on disk: do not leave it to pytest's tmp retention.
    shutil.rmtree(tmp_path, ignore_errors=True)


def partitions(image: Path) -> dict[str, dict[str, Any]]:
    """The image's GPT partitions by name (sfdisk's JSON: start and size in sectors, type)."""
    done = subprocess.run(["sfdisk", "--json", str(image)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=True)
    return {p["name"]: p for p in json.loads(done.stdout)["partitiontable"]["partitions"]}


def debugfs(image: Path, request: str) -> str:
    """debugfs on the root file system, partition 2 (e2fsprogs opens `image?offset=N`)."""
    offset = partitions(image)["root"]["start"] * 512
    done = subprocess.run(["debugfs", "-R", request, f"{image}?offset={offset}"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=True)
    return done.stdout


def test_concurrent_builds_build_once_then_the_cache_is_a_no_op(out_dir: Path) -> None:
    build_twice_at_once(BUILD, out_dir, timeout_s=BUILD_TIMEOUT_S)
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["debian", "debian.lock"]

    disk = out_dir / "disk.raw"
    meta = json.loads((out_dir / "guest.json").read_text())
    stamp = disk.stat()
    started = time.monotonic()
    again = subprocess.run([str(BUILD), "--out", str(out_dir)], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=120)
    cached_s = time.monotonic() - started
    assert again.returncode == 0, again.stderr
    assert "is up to date" in again.stderr and "building" not in again.stderr
    assert json.loads((out_dir / "guest.json").read_text()) == meta
    assert (disk.stat().st_ino, disk.stat().st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    assert cached_s < 10, f"a cache hit took {cached_s:.1f} s"
    print(f"\ndebian build: cold {meta['build_seconds']} s, cached {cached_s:.2f} s", file=sys.stderr)

    # The outputs keep the recipe interface.
    assert (out_dir / "vmlinuz").read_bytes()[0x202:0x206] == b"HdrS", "not a bzImage"
    assert (out_dir / "cmdline").read_text().strip() == meta["cmdline"]
    assert meta["files"]["disk"] == "disk.raw"
    assert disk.stat().st_mode & 0o222 == 0, "the shared image must be read-only"
    assert disk.stat().st_blocks * 512 < disk.stat().st_size / 2, "the image is not sparse"
    assert meta["drivers"]["virtio_blk"] in ("builtin", "initrd")
    assert meta["drivers"]["nvme"] in ("builtin", "initrd", "module")
    assert {"openssh-server", "systemd", "udev"} <= set(meta["packages"])

    # The configuration is inside the image, owned by root.
    assert debugfs(disk, "cat /etc/hostname") == "debian\n"
    assert "\nroot::" in "\n" + debugfs(disk, "cat /etc/shadow")
    assert "/dev/vda2\t/" in debugfs(disk, "cat /etc/fstab")
    # Firmware boot: partition 1 is the EFI system partition, the root file system follows it.
    parts = partitions(disk)
    assert parts["esp"]["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    assert parts["root"]["start"] == parts["esp"]["start"] + parts["esp"]["size"]
    assert meta["files"]["firmware_disk"] == "disk.raw"
    assert "DHCP=ipv4" in debugfs(disk, "cat /etc/systemd/network/10-phd-dhcp.network")
    assert "User:     0   Group:     0" in debugfs(disk, "stat /etc/hostname")
