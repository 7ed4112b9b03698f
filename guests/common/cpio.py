"""A minimal writer for the kernel's initramfs format (``newc`` cpio, gzip-compressed).

Written in Python instead of driving ``cpio`` so that the archive can contain
root-owned files and the ``/dev/console`` device node without running as root
(the kernel needs that node to give ``/init`` a console before devtmpfs is
mounted), and so that a build is byte-for-byte reproducible: fixed mtimes,
sorted entries, deterministic inode numbers.
"""

from __future__ import annotations

import gzip
import io
import stat
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

__all__ = ["Archive", "ArchiveError"]

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class ArchiveError(Exception):
    """An entry conflicts with one already in the archive."""


@dataclass(frozen=True)
class _Entry:
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


class Archive:
    """An in-memory file tree serialised as a newc cpio archive.

    Paths are absolute guest paths (``/bin/busybox``); parent directories are
    created implicitly with mode 0755. Everything is owned by root.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __contains__(self, path: str) -> bool:
        return self._key(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(path: str) -> str:
        pure = PurePosixPath(path)
        if not pure.is_absolute() or ".." in pure.parts or pure == PurePosixPath("/"):
            raise ArchiveError(f"archive paths must be absolute, below / and without '..': {path!r}")
        return str(pure)[1:]

    def _add(self, path: str, entry: _Entry) -> None:
        key = self._key(path)
        parent = PurePosixPath(key).parent
        if str(parent) != ".":
            self.add_dir("/" + str(parent))
        old = self._entries.get(key)
        if old is not None and not (stat.S_ISDIR(old.mode) and stat.S_ISDIR(entry.mode)):
            raise ArchiveError(f"{path!r} is already in the archive")
        self._entries[key] = entry

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        key = self._key(path)
        old = self._entries.get(key)
        if old is not None:
            if not stat.S_ISDIR(old.mode):
                raise ArchiveError(f"{path!r} is already in the archive as a non-directory")
            return
        self._add(path, _Entry(mode=stat.S_IFDIR | mode))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(path, _Entry(mode=stat.S_IFREG | mode, data=data))

    def add_symlink(self, path: str, target: str) -> None:
        self._add(path, _Entry(mode=stat.S_IFLNK | 0o777, data=target.encode()))

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(path, _Entry(mode=stat.S_IFCHR | mode, rdev=(major, minor)))

    def to_cpio(self, mtime: int = 0) -> bytes:
        """The uncompressed newc stream; sorted order puts parents before children."""
        out = io.BytesIO()
        for ino, key in enumerate(sorted(self._entries), start=1):
            entry = self._entries[key]
            self._write_header(out, key, entry, ino, mtime)
            out.write(entry.data)
            out.write(_pad4(len(entry.data)))
        self._write_header(out, _TRAILER, _Entry(mode=0), 0, 0)
        # The kernel reads the archive in 512-byte blocks; pad like cpio(1) does.
        out.write(b"\0" * (-out.tell() % 512))
        return out.getvalue()

    @staticmethod
    def _write_header(out: BinaryIO, name: str, entry: _Entry, ino: int, mtime: int) -> None:
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (
            ino, entry.mode, 0, 0, nlink, mtime, len(entry.data),
            0, 0, entry.rdev[0], entry.rdev[1], len(encoded), 0,
        )  # fmt: skip
        header = _MAGIC + b"".join(b"%08X" % value for value in fields)
        out.write(header)
        out.write(encoded)
        out.write(_pad4(len(header) + len(encoded)))

    def to_gzip(self, mtime: int = 0) -> bytes:
        """The gzip-compressed archive (the Debian kernel has CONFIG_RD_GZIP)."""
        return gzip.compress(self.to_cpio(mtime=mtime), compresslevel=6, mtime=mtime)
