"""Debian package plumbing for the guest recipes: resolve versions, download, unpack.

Thin wrappers over ``apt-cache``, ``apt-get download``, ``dpkg-query`` and
``dpkg -x`` (all present on any Debian host). Nothing is installed on the host:
packages are only downloaded and unpacked into a work directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DebianError",
    "Package",
    "apt_cache",
    "candidate_version",
    "download",
    "installed_version",
    "kernel_package",
    "owned_path",
    "run_tool",
    "unpack",
]

# The metapackage that always points at the current versioned kernel package.
KERNEL_METAPACKAGE = "linux-image-amd64"


class DebianError(Exception):
    """An apt/dpkg step failed; the message names the command and a fix."""


@dataclass(frozen=True)
class Package:
    """A Debian package pinned to one version."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}={self.version}"


def run_tool(argv: list[str], *, hint: str, cwd: Path | None = None, stdin_text: str | None = None) -> str:
    """Run a host tool and return its stdout, or raise with argv, stderr and ``hint``.
    ``stdin_text`` is the tool's input (a script for sfdisk, say); without it stdin is empty."""
    try:
        done = subprocess.run(  # noqa: S603 - argv list, no shell
            argv,
            cwd=cwd,
            input=stdin_text,
            stdin=subprocess.DEVNULL if stdin_text is None else None,
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError as exc:
        raise DebianError(f"{argv[0]!r} is not installed: {hint}") from exc
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-10:])
        raise DebianError(
            f"{' '.join(argv)} exited with {done.returncode}: {tail or '(no stderr)'}\nhint: {hint}"
        )
    return done.stdout


# What apt-cache's answers depend on: its configuration and sources, the package lists
# 'apt-get update' fetched, the binary caches built from them, and dpkg's record of what is
# installed (policy shows it, and pins may depend on it).
APT_STATE = (Path("/etc/apt"), Path("/var/lib/apt/lists"), Path("/var/cache/apt/pkgcache.bin"),
             Path("/var/cache/apt/srcpkgcache.bin"), Path("/var/lib/dpkg/status"))
# Answers are kept per user (each is a few KiB; a new apt state gets new keys, so stale ones
# are never read, and any file older than a week is removed when an answer is written).
ANSWER_DIR_ENV = "PHD_APT_ANSWERS"
ANSWER_MAX_AGE_S = 7 * 24 * 3600


def _answer_dir() -> Path:
    explicit = os.environ.get(ANSWER_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "phd" / "apt-answers"


def apt_state(roots: tuple[Path, ...] | None = None) -> str:
    """A fingerprint of everything apt-cache reads: path, size, mtime and inode of each file
    under ``roots`` (missing ones count as missing). Any apt-get update, install or
    sources edit changes it; reading it costs a few stat calls, not apt-cache's 0.5 s."""
    entries: list[str] = [os.environ.get("APT_CONFIG", "")]
    for root in APT_STATE if roots is None else roots:
        paths = [root]
        if root.is_dir():
            paths += sorted(p for p in root.rglob("*"))
        for path in paths:
            try:
                st = path.lstat()
            except OSError:
                entries.append(f"{path} missing")
                continue
            entries.append(f"{path} {st.st_size} {st.st_mtime_ns} {st.st_ino}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def apt_cache(args: list[str], *, hint: str) -> str:
    """``apt-cache ARGS``'s output, answered from the per-user store when apt's state
    (:func:`apt_state`) is the one it was recorded in. Every session checks whether each guest
    build is up to date, and apt-cache, loading its whole cache for each call, was most of that
    check (1-6 s per guest and session on a loaded CI machine). A store that cannot be written
    only costs the memo."""
    argv = ["apt-cache", *args]
    key = hashlib.sha256(json.dumps([argv, apt_state()]).encode()).hexdigest()
    folder = _answer_dir()
    stored = folder / f"{key}.txt"
    try:
        return stored.read_text()
    except (OSError, UnicodeDecodeError):
        pass
    out = run_tool(argv, hint=hint)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".answer-")
        with os.fdopen(fd, "w") as f:
            f.write(out)
        os.replace(tmp, stored)  # whole or absent, whoever reads it meanwhile
        _forget_old_answers(folder)
    except OSError:
        pass
    return out


def _forget_old_answers(folder: Path) -> None:
    cutoff = time.time() - ANSWER_MAX_AGE_S
    for path in folder.iterdir():
        try:
            if path.lstat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass


def parse_depends(text: str, prefix: str) -> str:
    """The first ``Depends:`` target of ``apt-cache depends`` output starting with ``prefix``."""
    for line in text.splitlines():
        kind, _, target = line.strip().partition(":")
        target = target.strip()
        if kind.lstrip("|") == "Depends" and target.startswith(prefix):
            return target
    raise DebianError(
        f"no '{prefix}*' dependency in apt-cache output:\n{text.strip()}\n"
        "hint: run 'apt-get update' so apt knows the kernel packages"
    )


def parse_candidate(text: str, name: str) -> str:
    """The ``Candidate:`` version from ``apt-cache policy`` output."""
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Candidate":
            value = value.strip()
            if value and value != "(none)":
                return value
    raise DebianError(
        f"apt has no installable version of {name}: run 'apt-get update' "
        "(and check /etc/apt/sources.list names Debian bookworm main)"
    )


def kernel_package() -> Package:
    """The versioned kernel package ``linux-image-amd64`` currently depends on."""
    hint = "run 'apt-get update' (apt-cache needs package lists)"
    depends = apt_cache(["depends", KERNEL_METAPACKAGE], hint=hint)
    name = parse_depends(depends, "linux-image-")
    return Package(name, candidate_version(name))


def candidate_version(name: str) -> str:
    policy = apt_cache(["policy", name], hint="run 'apt-get update'")
    return parse_candidate(policy, name)


def installed_version(name: str) -> str | None:
    """The installed version of ``name``, or None when it is not installed."""
    try:
        out = subprocess.run(  # noqa: S603 - argv list, no shell
            ["dpkg-query", "-W", "-f", "${Status}\t${Version}", name],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        return None
    status, _, version = out.stdout.partition("\t")
    if out.returncode != 0 or status != "install ok installed" or not version:
        return None
    return version


def owned_path(name: str, path: str) -> Path | None:
    """``path`` if the installed package ``name`` owns it (``dpkg -L``), else None."""
    try:
        listing = run_tool(["dpkg", "-L", name], hint=f"install {name}")
    except DebianError:
        return None
    return Path(path) if path in listing.splitlines() and Path(path).exists() else None


def download(package: Package, dest: Path) -> Path:
    """``apt-get download`` one exact version into ``dest``; return the ``.deb`` path."""
    argv = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        # As root apt drops to the _apt user, which cannot write into a private
        # temp dir and warns; downloading as root is what would happen anyway.
        argv += ["-o", "APT::Sandbox::User=root"]
    argv.append(str(package))
    run_tool(
        argv,
        cwd=dest,
        hint=f"check that the Debian mirror is reachable and 'apt-get update' knows {package}",
    )
    debs = sorted(dest.glob(f"{package.name}_*.deb"))
    if not debs:
        raise DebianError(f"apt-get download {package} produced no .deb in {dest}")
    return debs[-1]


def unpack(deb: Path, dest: Path) -> None:
    """Unpack a package's files (``dpkg -x``) without installing it."""
    run_tool(["dpkg", "-x", str(deb), str(dest)], hint=f"{deb} may be truncated: delete it")
