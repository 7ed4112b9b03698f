"""Debian package plumbing for the guest recipes: resolve versions, download, unpack.

Thin wrappers over ``apt-cache``, ``apt-get download``, ``dpkg-query`` and
``dpkg -x`` (all present on any Debian host). Nothing is installed on the host:
packages are only downloaded and unpacked into a work directory.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DebianError",
    "Package",
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
    depends = run_tool(["apt-cache", "depends", KERNEL_METAPACKAGE], hint=hint)
    name = parse_depends(depends, "linux-image-")
    return Package(name, candidate_version(name))


def candidate_version(name: str) -> str:
    policy = run_tool(["apt-cache", "policy", name], hint="run 'apt-get update'")
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
