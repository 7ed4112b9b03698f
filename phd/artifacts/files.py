"""Untrusted files, opened safely: what the manifest loader reads and the store opens, hashes,
chmods and replaces.

A regular file is checked before it is opened and again on its descriptor; the cache's
files are never followed through a symlink (O_NOFOLLOW); a file is sealed (made read-only)
through the descriptor that was hashed; a name in the cache is freed without touching a
symlink's target or deleting a folder the store did not create.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "CHUNK",
    "NotRegular",
    "clear_slot",
    "file_kind",
    "kind_of",
    "one_line",
    "open_regular",
    "os_reason",
    "read_at_most",
    "seal",
    "sha256_fd",
]

CHUNK = 1 << 16


class NotRegular(Exception):
    """Found where a regular file was expected: ``what`` is "a symlink", "a folder", ..."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


_KINDS = ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a regular file"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def file_kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "a special file")


def kind_of(path: Path, *, follow: bool) -> str | None:
    """What is at ``path`` ("a folder", "a symlink", ...); None when nothing is."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return f"unreadable ({os_reason(exc)})"
    return file_kind(st.st_mode)


def os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def one_line(text: str) -> str:
    return " ".join(text.split())


@contextlib.contextmanager
def open_regular(path: Path, *, follow: bool) -> Iterator[int]:
    """A read-only descriptor on ``path`` if it is a regular file, else `NotRegular`.

    Checked before opening (opening a FIFO blocks, opening a device can have effects) and
    again on the descriptor (the name may have changed in between). ``follow=False`` (the
    cache) refuses a symlink itself, with O_NOFOLLOW; ``follow=True`` is for a local_path,
    which the manifest could as well have named by its target."""
    st = os.stat(path) if follow else os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegular(file_kind(st.st_mode))
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegular("a symlink") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegular(file_kind(mode))
        yield fd
    finally:
        os.close(fd)


def read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(CHUNK, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def seal(fd: int) -> None:
    """Read-only, through the descriptor that was hashed: never a path, so never a symlink's
    target, and never a file other than the one verified."""
    if stat.S_IMODE(os.fstat(fd).st_mode) != 0o444:
        os.fchmod(fd, 0o444)


def clear_slot(path: Path) -> None:
    """Free a name inside the cache for the store's own file. A symlink is unlinked (its
    target is never touched), as is any other non-folder; a folder is renamed aside to a
    hidden ``.<name>.corrupt-<random>``, since the store deletes nothing it did not create."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        os.rename(path, path.with_name(f".{path.name}.corrupt-{secrets.token_hex(4)}"))
    else:
        path.unlink(missing_ok=True)
