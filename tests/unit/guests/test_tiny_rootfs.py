"""The tiny guest's rootfs files keep the login contract the harness relies on."""

from __future__ import annotations

import stat

import pytest

from guests.common.cpio import Archive
from guests.common.debian import DebianError, parse_candidate, parse_depends
from guests.common.kernel import WANTED_MODULES
from guests.tiny.assemble import add_rootfs
from guests.tiny.build import CMDLINE, LOGIN_PROMPT, SHELL_PROMPT

from .test_common_cpio import parse_newc


@pytest.fixture(scope="module")
def entries() -> dict[str, tuple[int, bytes, int, int]]:
    archive = Archive()
    add_rootfs(archive)
    return parse_newc(archive.to_cpio())


def text(entries: dict[str, tuple[int, bytes, int, int]], name: str) -> str:
    return entries[name][1].decode()


def test_init_is_executable_and_mounts_devtmpfs_before_using_ttys(
    entries: dict[str, tuple[int, bytes, int, int]],
) -> None:
    mode, data, _, _ = entries["init"]
    assert stat.S_IMODE(mode) & 0o111
    init = data.decode()
    assert init.startswith("#!/bin/busybox sh\n")
    assert init.index("devtmpfs") < init.index("insmod") < init.index("exec /sbin/init")
    assert "phd-tiny: modules loaded, disks:" in init
    code = [line for line in init.splitlines() if not line.lstrip().startswith("#")]
    first_mount = next(i for i, line in enumerate(code) if "devtmpfs" in line)
    assert not any("ttyS0" in line or "/dev/" in line for line in code[:first_mount])


def test_console_node_exists_for_init(entries: dict[str, tuple[int, bytes, int, int]]) -> None:
    mode, _, major, minor = entries["dev/console"]
    assert stat.S_ISCHR(mode)
    assert (major, minor) == (5, 1)


def test_getty_and_passwordless_root(entries: dict[str, tuple[int, bytes, int, int]]) -> None:
    assert "ttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100" in text(entries, "etc/inittab")
    assert text(entries, "etc/hostname").strip() + " login: " == LOGIN_PROMPT
    # busybox's own passwd parser rejects an empty password field in /etc/passwd
    # (getpwuid fails, the prompt loses "root"); the empty password lives in shadow.
    assert text(entries, "etc/passwd").startswith("root:x:0:0:")
    assert text(entries, "etc/shadow").startswith("root::")
    assert stat.S_IMODE(entries["etc/shadow"][0]) == 0o600


def test_prompt_matches_guest_json(entries: dict[str, tuple[int, bytes, int, int]]) -> None:
    assert SHELL_PROMPT == "root@tiny:~# "
    assert "export PS1='\\u@\\h:\\w\\$ '" in text(entries, "etc/profile")


def test_cmdline_uses_serial_console() -> None:
    assert "console=ttyS0" in CMDLINE.split()
    assert WANTED_MODULES[:2] == ("virtio_pci", "virtio_blk")


def test_apt_output_parsing() -> None:
    depends = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n"
    assert parse_depends(depends, "linux-image-") == "linux-image-6.1.0-56-amd64"
    policy = "x:\n  Installed: (none)\n  Candidate: 6.1.192-2\n  Version table:\n"
    assert parse_candidate(policy, "x") == "6.1.192-2"
    with pytest.raises(DebianError, match="apt-get update"):
        parse_candidate("x:\n  Candidate: (none)\n", "x")
    with pytest.raises(DebianError, match="apt-get update"):
        parse_depends("linux-image-amd64\n", "linux-image-")
