"""Build the debian guest into ``--out DIR``, cached by a hash of everything that shapes it.

Output (the recipe interface shared by all guests, see guests/README.md)::

    DIR/vmlinuz     kernel (Debian's cloud kernel: virtio and NVMe, few other drivers)
    DIR/initrd.img  its initramfs (initramfs-tools, only the virtio modules)
    DIR/cmdline     kernel command line, one line
    DIR/disk.raw    GPT disk, sparse, read-only (VMs boot an overlay): an EFI system partition
                    with a unified kernel image (firmware boot), then the ext4 root (vda2)
    DIR/guest.json  metadata: versions, input hash, login and shell prompts

The input hash covers the recipe files and the exact Debian versions of the packages
the recipe names (the versioned kernel package, not its metapackage); guest.json also
lists every installed package. The cache, lock and replace protocol is tiny's (same
helpers): a current ``DIR/guest.json`` means nothing to do; otherwise build into a
temporary sibling and rename it into place, holding ``DIR.lock`` so that concurrent
builds (pytest-xdist workers) build once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from guests.common import debian
from guests.common.recipe import (
    COMMON_DIR,
    LOCK_TIMEOUT_S,
    BuildError,
    BuildResult,
    cached_build,
    publish,
    recipe_digest,
    sha256_file,
    shared_digest,
)
from guests.common.recipe import (
    main as recipe_main,
)
from guests.debian.assemble import DISK_SIZE, SUITE, Assembled, assemble

__all__ = [
    "CMDLINE",
    "LOGIN_PROMPT",
    "PACKAGES",
    "SHELL_PROMPT",
    "BuildError",
    "BuildResult",
    "build",
    "input_hash",
    "main",
    "resolve_inputs",
]

RECIPE = "debian"
SCHEMA = 1
RECIPE_DIR = Path(__file__).resolve().parent
LOGIN_PROMPT = "debian login: "
LOGIN_USER = "root"
SHELL_PROMPT = "root@debian:~# "
# Packages on top of minbase. The kernel comes from its metapackage, pinned to the
# versioned package it points at (resolve_inputs).
# systemd-boot-efi brings the EFI stub of the disk's unified kernel image (about 300 KB of
# files, no scripts), so the image carries what booted it.
PACKAGES = ("systemd-sysv", "udev", "openssh-server", "iproute2", "procps", "systemd-boot-efi")
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
# quiet + systemd.show_status=error: the console carries the login prompt and the
# commands' output, not boot chatter that could land between a command's markers
# (failures still print); panic=-1 reboots at once on a panic instead of hanging.
CMDLINE = "console=ttyS0 root=/dev/vda2 rw quiet systemd.show_status=error panic=-1"
OUTPUT_FILES = ("vmlinuz", "initrd.img", "cmdline", "disk.raw", "guest.json")


def _log(message: str) -> None:
    print(f"debian: {message}", file=sys.stderr, flush=True)


# What shapes the output. The README is left out so that editing the docs does not cost
# every machine a one-minute rebuild.
_SHAPING_FILES = ("build", "build.py", "assemble.py")
_SHAPING_DIRS = ("rootfs", "initramfs")
# The guests/common/ modules the recipe imports that shape its output: the Debian helpers
# (apt-cache parsing that pins every package version, the tool runner and its environment).
# As for every recipe; guests/common/recipe.py only caches and publishes.
SHARED_FILES = ("debian.py", "efi.py", "pvh.py")


def recipe_files_digest(recipe_dir: Path = RECIPE_DIR, common_dir: Path = COMMON_DIR) -> str:
    parts = [recipe_digest(recipe_dir / d) for d in _SHAPING_DIRS]
    parts += [hashlib.sha256((recipe_dir / name).read_bytes()).hexdigest() for name in _SHAPING_FILES]
    parts.append(shared_digest(SHARED_FILES, common_dir))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def input_hash(packages: Sequence[debian.Package], recipe: str) -> str:
    payload = json.dumps(
        {
            "schema": SCHEMA,
            "recipe": recipe,
            "suite": SUITE,
            "packages": sorted(str(p) for p in packages),
            "cmdline": CMDLINE,
            "disk_size": DISK_SIZE,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def resolve_inputs() -> tuple[debian.Package, ...]:
    """Pin every named package, and the kernel, to the version apt would install now."""
    depends = debian.apt_cache(["depends", KERNEL_METAPACKAGE],
                               hint="run 'apt-get update' (apt-cache needs package lists)")
    kernel = debian.parse_depends(depends, "linux-image-")
    names = (*PACKAGES, kernel)
    # One apt-cache call for all of them: each call costs about half a second, and this
    # runs on every cache check.
    policy = debian.apt_cache(["policy", *names], hint="run 'apt-get update'")
    sections = split_policy(policy)
    return tuple(debian.Package(name, debian.parse_candidate(sections.get(name, ""), name)) for name in names)


def split_policy(text: str) -> dict[str, str]:
    """``apt-cache policy A B ...`` output split into one section per package name."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = sections.setdefault(line[:-1], [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


Assembler = Callable[..., Assembled]


def build(
    out: Path,
    *,
    force: bool = False,
    resolve: Callable[[], Sequence[debian.Package]] | None = None,
    assembler: Assembler = assemble,
    lock_timeout: float = LOCK_TIMEOUT_S,
    need_root: bool = True,
) -> BuildResult:
    """Make ``out`` hold the current debian guest; build only when the cache is stale.

    ``resolve``, ``assembler`` and ``need_root`` are seams for unit tests.
    """
    out = out.resolve()
    try:
        packages = tuple((resolve or resolve_inputs)())
    except debian.DebianError as exc:
        raise BuildError(f"cannot resolve package versions: {exc}") from exc
    wanted = input_hash(packages, recipe_files_digest())

    def check_root() -> None:
        if need_root and os.geteuid() != 0:
            raise BuildError(
                "building the debian guest needs root (mmdebstrap --mode=root and mke2fs -d record "
                "the tree's real file owners): run it as root or with sudo"
            )

    return cached_build(out, wanted, recipe=RECIPE, output_files=OUTPUT_FILES, force=force,
                        lock_timeout=lock_timeout, log=_log, before_build=check_root,
                        make=lambda: _build_into(out, packages, wanted, assembler))


def _build_into(out: Path, packages: Sequence[debian.Package], wanted: str,
                assembler: Assembler) -> dict[str, Any]:
    started = time.monotonic()
    _log(f"building into {out} ({', '.join(str(p) for p in packages)})")
    # Staging is a sibling of out so the final rename stays on one filesystem; the work
    # tree (about 300 MB) lives there too rather than in a possibly small /tmp.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    # apt inside mmdebstrap downloads as the _apt user, which must reach the tree.
    work.chmod(0o755)
    try:
        try:
            made = assembler(packages, work, staging, cmdline=CMDLINE)
        except debian.DebianError as exc:
            raise BuildError(str(exc)) from exc
        disk = staging / "disk.raw"
        meta: dict[str, Any] = {
            "schema": SCHEMA,
            "recipe": RECIPE,
            "input_hash": wanted,
            "suite": SUITE,
            "kernel_version": made.kernel_version,
            "inputs": {p.name: p.version for p in packages},
            "packages": made.packages,
            "drivers": made.drivers,
            "cmdline": CMDLINE,
            "login_prompt": LOGIN_PROMPT,
            "login_user": LOGIN_USER,
            "shell_prompt": SHELL_PROMPT,
            "has_sshd": True,
            "disk_size": DISK_SIZE,
            "files": {"kernel": made.kernel_file, "initrd": "initrd.img", "cmdline": "cmdline",
                      "disk": "disk.raw",
                      "firmware_disk": "disk.raw"},
            "sha256": {name: sha256_file(staging / name)
                       for name in sorted({"vmlinuz", made.kernel_file, "initrd.img", "disk.raw"})},
            "build_seconds": round(time.monotonic() - started, 2),
        }
        # VMs boot copy-on-write overlays of the image; read-only keeps a stray writer
        # (a VM given the raw file itself) from changing every later boot.
        disk.chmod(0o444)
        publish(staging, out, meta)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    _log(f"built {out} in {meta['build_seconds']} s")
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    return recipe_main(
        argv, name=RECIPE,
        description="Build the Debian 12 guest (kernel, initrd, cmdline, GPT disk.raw, guest.json).",
        build=lambda _parser, args: build(args.out, force=args.force))


if __name__ == "__main__":
    sys.exit(main())
