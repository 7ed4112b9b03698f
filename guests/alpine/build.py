"""Build the alpine guest into ``--out DIR`` from a minirootfs tarball, cached by input hash.

    guests/alpine/build --out DIR --input minirootfs=PATH [--force]

Output: the recipe interface of guests/README.md (``vmlinuz``, ``initrd.img``, ``cmdline``,
``guest.json``). The input hash covers the recipe's files, the guests/common/ modules it
imports (kernel, cpio and module-order code, as tiny does), the exact Debian kernel package
version and the sha256 of the tarball's content (not its path: the artifact store may hand
over the same file from its cache or from a user's ``local_path``). Building, locking and the atomic
rename are guests/common/recipe.py's, as for every recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guests.alpine.assemble import Assembled, AssemblyError, assemble
from guests.common import debian, efi, kmods
from guests.common.kernel import FAST_BOOT_ARGS
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

__all__ = [
    "CMDLINE",
    "LOGIN_PROMPT",
    "SHELL_PROMPT",
    "BuildError",
    "BuildResult",
    "Inputs",
    "build",
    "input_hash",
    "main",
]

RECIPE = "alpine"
SCHEMA = 1
RECIPE_DIR = Path(__file__).resolve().parent
# The guests/common/ modules the recipe imports (directly or through each other), which
# shape its output.
SHARED_FILES = ("cpio.py", "debian.py", "efi.py", "kernel.py", "kmods.py", "pvh.py")
LOGIN_PROMPT = "localhost login: "
LOGIN_USER = "root"
SHELL_PROMPT = "localhost:~# "  # Alpine's /etc/profile: PS1='\h:\w\$ '
# rdinit: busybox init straight from the initramfs (the minirootfs has no /init).
# quiet keeps the console short; panic=-1 ends QEMU (-no-reboot) on a panic.
CMDLINE = f"console=ttyS0 rdinit=/sbin/init quiet panic=-1 {FAST_BOOT_ARGS}"
OUTPUT_FILES = ("vmlinuz", "initrd.img", "cmdline", "boot.raw", "guest.json")


@dataclass(frozen=True)
class Inputs:
    kernel: debian.Package
    minirootfs: Path
    minirootfs_sha256: str
    stub: debian.Package  # systemd-boot-efi: the EFI stub of boot.raw's unified kernel image


def _log(message: str) -> None:
    print(f"alpine: {message}", file=sys.stderr, flush=True)


def recipe_files_digest(recipe_dir: Path = RECIPE_DIR, common_dir: Path = COMMON_DIR) -> str:
    """The recipe's own files (names, exec bits, contents) and the shared modules it imports."""
    parts = (recipe_digest(recipe_dir), shared_digest(SHARED_FILES, common_dir))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def input_hash(inputs: Inputs, recipe: str) -> str:
    payload = json.dumps(
        {
            "schema": SCHEMA,
            "recipe": recipe,
            "kernel": str(inputs.kernel),
            "minirootfs": inputs.minirootfs_sha256,
            "stub": str(inputs.stub),
            "cmdline": CMDLINE,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def resolve_inputs(minirootfs: Path) -> Inputs:
    if not minirootfs.is_file():
        raise BuildError(f"--input minirootfs={minirootfs}: no such file")
    return Inputs(debian.kernel_package(), minirootfs.resolve(), sha256_file(minirootfs), efi.stub_package())


Assembler = Callable[..., Assembled]


def build(
    out: Path,
    minirootfs: Path,
    *,
    force: bool = False,
    resolve: Callable[[Path], Inputs] = resolve_inputs,
    assembler: Assembler = assemble,
    lock_timeout: float = LOCK_TIMEOUT_S,
) -> BuildResult:
    """Make ``out`` hold the alpine guest for this tarball; build only when stale.

    ``resolve`` and ``assembler`` are seams for unit tests.
    """
    out = out.resolve()
    try:
        inputs = resolve(minirootfs)
    except debian.DebianError as exc:
        raise BuildError(f"cannot resolve the kernel package: {exc}") from exc
    wanted = input_hash(inputs, recipe_files_digest())
    return cached_build(out, wanted, recipe=RECIPE, output_files=OUTPUT_FILES, force=force,
                        lock_timeout=lock_timeout, log=_log,
                        make=lambda: _build_into(out, inputs, wanted, assembler))


def _build_into(out: Path, inputs: Inputs, wanted: str, assembler: Assembler) -> dict[str, Any]:
    started = time.monotonic()
    _log(f"building into {out} (inputs {inputs.kernel}, {inputs.minirootfs.name} "
         f"{inputs.minirootfs_sha256[:12]})")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="phd-alpine-work-") as work:
            try:
                made = assembler(inputs.kernel, inputs.minirootfs, Path(work), staging, cmdline=CMDLINE,
                                 stub=inputs.stub)
            except (debian.DebianError, kmods.ModuleError, AssemblyError) as exc:
                raise BuildError(str(exc)) from exc
        meta: dict[str, Any] = {
            "schema": SCHEMA,
            "recipe": RECIPE,
            "input_hash": wanted,
            "kernel_version": made.kernel_version,
            "kernel_package": inputs.kernel.name,
            "kernel_package_version": inputs.kernel.version,
            "minirootfs": inputs.minirootfs.name,
            "minirootfs_sha256": inputs.minirootfs_sha256,
            "alpine_release": made.alpine_release,
            "modules": list(made.modules),
            "cmdline": CMDLINE,
            "login_prompt": LOGIN_PROMPT,
            "login_user": LOGIN_USER,
            "shell_prompt": SHELL_PROMPT,
            "files": {"kernel": made.kernel_file, "initrd": "initrd.img", "cmdline": "cmdline",
                      "firmware_disk": "boot.raw"},
            "sha256": {name: sha256_file(staging / name)
                       for name in sorted({"vmlinuz", made.kernel_file, "initrd.img", "boot.raw"})},
            "build_seconds": round(time.monotonic() - started, 2),
        }
        (staging / "boot.raw").chmod(0o444)  # VMs boot overlays of it
        publish(staging, out, meta)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log(f"built {out} in {meta['build_seconds']} s")
    return meta


def _parse_inputs(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, Path]:
    inputs: dict[str, Path] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            parser.error(f"--input takes NAME=PATH, got {pair!r}")
        inputs[name] = Path(value)
    unknown = sorted(set(inputs) - {"minirootfs"})
    if unknown:
        parser.error(f"unknown --input {', '.join(unknown)}; this recipe takes minirootfs=PATH")
    if "minirootfs" not in inputs:
        parser.error("needs --input minirootfs=PATH: the Alpine minirootfs tarball "
                     "(`phd artifacts build alpine` passes the manifest's alpine-minirootfs)")
    return inputs


def main(argv: Sequence[str] | None = None) -> int:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--input", action="append", default=[], metavar="NAME=PATH",
                            help="minirootfs=PATH: alpine-minirootfs-<version>-x86_64.tar.gz")

    def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> BuildResult:
        return build(args.out, _parse_inputs(parser, args.input)["minirootfs"], force=args.force)

    return recipe_main(
        argv, name=RECIPE,
        description="Build the alpine guest (Alpine minirootfs + Debian kernel as an initramfs).",
        build=run, add_arguments=add_arguments)


if __name__ == "__main__":
    sys.exit(main())
