"""Which files a client may make the reference system open, and opening exactly those.

THE RULE: a path that comes from a client (a spec's kernel, initrd and file backends, every
file of a qcow2 overlay's backing chain, a VCR's ``read_only_parent`` path) must be absolute,
free of NUL and newlines, and resolve - symlinks followed, ``..`` collapsed - to an existing
REGULAR file under one of the allowed roots. The server's roots come from ``--allow-path DIR``
(repeatable) and default to its data dir and the phd artifact cache (:func:`default_roots`).

Checking a name and then handing the name to someone else to open leaves a window in which
the name can be pointed elsewhere (a symlink swap). So :meth:`PathPolicy.open` checks the
name, opens it, and then checks the OPEN DESCRIPTOR again (its real path from
``/proc/self/fd`` and its inode against the checked one); callers hand that descriptor on
(QEMU gets it with ``-add-fd``; the storage reads the read-only parent through it) and never
the name.

Stdlib only; used by the server and by the storage (``read_only_parent``).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = [
    "ALLOW_FLAG",
    "OpenedFile",
    "PathPolicy",
    "PathPolicyError",
    "default_roots",
    "installed",
    "open_for_storage",
]

ALLOW_FLAG = "--allow-path"
# Longer than any real image path, far shorter than what makes error messages unreadable.
MAX_PATH_CHARS = 4096
ARTIFACT_DIR_ENV = "PHD_ARTIFACT_DIR"

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symlink",
}


class PathPolicyError(ValueError):
    """A path breaks the policy; ``rule`` names which part, the message says how to fix it."""

    def __init__(self, what: str, message: str, rule: str) -> None:
        self.what = what
        self.reason = message
        self.rule = rule
        super().__init__(f"{what}: {message}")


def _shown(path: str | Path) -> str:
    # A lone surrogate or a control character must not break the JSON error answer.
    text = str(path).encode("utf-8", "backslashreplace").decode("utf-8")
    text = text.replace("\n", "\\n").replace("\0", "\\0")
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"


def default_roots(data_dir: Path) -> list[Path]:
    """The server's data dir and the phd artifact cache (``$PHD_ARTIFACT_DIR`` or
    ``~/.cache/phd/artifacts``, the framework's own default)."""
    cache = os.environ.get(ARTIFACT_DIR_ENV) or str(Path.home() / ".cache" / "phd" / "artifacts")
    return [data_dir, Path(cache)]


@dataclass
class OpenedFile:
    """A checked, open regular file. ``path`` is its real path when checked."""

    fd: int
    path: Path
    size: int
    writable: bool = False
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        if not self._closed and self.fd >= 0:
            os.close(self.fd)
        self._closed = True
        self.fd = -1

    def __enter__(self) -> OpenedFile:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class PathPolicy:
    """Allowed roots (``None``: any directory, for the storage library used without a server)."""

    def __init__(self, roots: Sequence[Path] | None) -> None:
        self.roots: tuple[Path, ...] | None = (
            None if roots is None else tuple(dict.fromkeys(Path(os.path.realpath(r)) for r in roots))
        )

    def __repr__(self) -> str:
        return f"PathPolicy({self.describe()})"

    def describe(self) -> str:
        return "any directory" if self.roots is None else "[" + ", ".join(map(str, self.roots)) + "]"

    def _allowed(self, real: Path) -> bool:
        return self.roots is None or any(real == root or real.is_relative_to(root) for root in self.roots)

    def _resolve(self, path: str | Path, what: str) -> Path:
        text = str(path)
        if "\0" in text:
            raise PathPolicyError(what, f"{_shown(text)} contains a NUL character", "unsafe-characters")
        if "\n" in text or "\r" in text:
            raise PathPolicyError(what, f"{_shown(text)} contains a newline", "unsafe-characters")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise PathPolicyError(what, f"{_shown(text)} is not valid UTF-8 (no file has this name)",
                                  "unsafe-characters") from None
        if len(text) > MAX_PATH_CHARS:
            raise PathPolicyError(what, f"path is too long ({len(text)} > {MAX_PATH_CHARS} characters)",
                                  "too-long")
        if not text.startswith("/"):
            raise PathPolicyError(what, f"path must be absolute, got {_shown(text)}", "not-absolute")
        try:
            return Path(os.path.realpath(text, strict=False))
        except (OSError, ValueError) as exc:
            raise PathPolicyError(what, f"cannot resolve {_shown(text)}: {exc}", "unresolvable") from None

    def _outside(self, what: str, given: str | Path, real: Path) -> PathPolicyError:
        via = "" if str(real) == str(given) else f" (it resolves to {_shown(real)})"
        return PathPolicyError(
            what,
            f"{_shown(given)}{via} is outside the allowed roots {self.describe()}; "
            f"start the server with {ALLOW_FLAG} DIR to allow it",
            "outside-allowed-roots",
        )

    def check(self, path: str | Path, what: str) -> Path:
        """The real path of ``path`` if the policy allows it; else :class:`PathPolicyError`."""
        real, _ = self._check(path, what)
        return real

    def _check(self, path: str | Path, what: str) -> tuple[Path, os.stat_result]:
        real = self._resolve(path, what)
        # The roots first: nothing about a file outside them (not even whether it exists)
        # is the client's business.
        if not self._allowed(real):
            raise self._outside(what, path, real)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise PathPolicyError(what, f"{_shown(path)} does not exist (create it or fix the path)",
                                  "not-found") from None
        except OSError as exc:
            raise PathPolicyError(what, f"cannot check {_shown(path)}: {exc.strerror or exc}",
                                  "unreadable") from None
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a file")
            raise PathPolicyError(what, f"{_shown(path)} is {kind}, not a regular file", "not-regular-file")
        return real, st

    def open(self, path: str | Path, what: str, *, writable: bool = False) -> OpenedFile:
        """Check ``path``, open it, and check the open descriptor is that same allowed file."""
        real, st = self._check(path, what)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        try:
            fd = os.open(str(real), flags | os.O_NOFOLLOW)
        except OSError as exc:
            raise PathPolicyError(what, f"cannot open {_shown(path)}: {exc.strerror or exc}",
                                  "unreadable") from None
        try:
            opened = os.fstat(fd)
            actual = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if not self._allowed(actual):
                raise self._outside(what, path, actual)
            if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                raise PathPolicyError(what, f"{_shown(path)} changed while it was being opened; retry",
                                      "changed-while-opening")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return OpenedFile(fd, real, opened.st_size, writable)


# The storage library opens a VCR's read_only_parent; the server installs its policy around
# the construction of a backend so that open follows the server's roots. Without a server
# (the storage used as a library, its own tests) any directory is allowed, but the other
# rules (absolute, a regular file, the checked file is the opened file) still hold.
_ACTIVE: contextvars.ContextVar[PathPolicy | None] = contextvars.ContextVar("path_policy", default=None)
_ANYWHERE = PathPolicy(None)


@contextlib.contextmanager
def installed(policy: PathPolicy) -> Iterator[PathPolicy]:
    token = _ACTIVE.set(policy)
    try:
        yield policy
    finally:
        _ACTIVE.reset(token)


def open_for_storage(path: str, what: str) -> OpenedFile:
    """Open a file a VCR names, under the installed policy (read-only)."""
    return (_ACTIVE.get() or _ANYWHERE).open(path, what)
