"""The newc cpio writer that produces the tiny guest's initramfs."""

from __future__ import annotations

import gzip
import stat

import pytest

from guests.common.cpio import Archive, ArchiveError


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes, int, int]]:
    """name -> (mode, data, rdevmajor, rdevminor); an independent reader for the test."""
    entries: dict[str, tuple[int, bytes, int, int]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = (
            fields[1], fields[6], fields[9], fields[10], fields[11],
        )  # fmt: skip
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[data_start : data_start + filesize], rmaj, rmin)
        pos = data_start + filesize + (-filesize % 4)


def test_round_trip_of_files_links_dirs_and_device_nodes() -> None:
    archive = Archive()
    archive.add_file("/bin/busybox", b"\x7fELF...", 0o755)
    archive.add_symlink("/bin/sh", "/bin/busybox")
    archive.add_chardev("/dev/console", 5, 1)
    archive.add_file("/etc/shadow", b"root::1:0:99999:7:::\n", 0o600)
    entries = parse_newc(archive.to_cpio())

    mode, data, _, _ = entries["bin/busybox"]
    assert stat.S_ISREG(mode)
    assert stat.S_IMODE(mode) == 0o755
    assert data == b"\x7fELF..."
    mode, data, _, _ = entries["bin/sh"]
    assert stat.S_ISLNK(mode)
    assert data == b"/bin/busybox"
    mode, _, major, minor = entries["dev/console"]
    assert stat.S_ISCHR(mode)
    assert (major, minor) == (5, 1)
    assert stat.S_IMODE(entries["etc/shadow"][0]) == 0o600
    # Parent directories are created implicitly, before their children.
    assert stat.S_ISDIR(entries["bin"][0])
    assert list(entries).index("bin") < list(entries).index("bin/sh")


def test_archive_is_reproducible_and_block_padded() -> None:
    def make() -> bytes:
        archive = Archive()
        archive.add_file("/init", b"#!/bin/sh\n", 0o755)
        archive.add_dir("/proc")
        return archive.to_gzip()

    first = make()
    assert first == make()
    raw = gzip.decompress(first)
    assert len(raw) % 512 == 0
    assert set(parse_newc(raw)) == {"init", "proc"}


@pytest.mark.parametrize("path", ["relative", "/", "/a/../b"])
def test_bad_paths_are_rejected(path: str) -> None:
    with pytest.raises(ArchiveError, match="absolute"):
        Archive().add_file(path, b"")


def test_duplicates_are_rejected_but_directories_merge() -> None:
    archive = Archive()
    archive.add_file("/etc/passwd", b"")
    archive.add_dir("/etc")
    with pytest.raises(ArchiveError, match="already"):
        archive.add_symlink("/etc/passwd", "/x")
    with pytest.raises(ArchiveError, match="non-directory"):
        archive.add_dir("/etc/passwd")
    assert "/etc/passwd" in archive
    assert len(archive) == 2
