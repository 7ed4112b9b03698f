"""Build the tiny guest into ``--out DIR``, cached by a hash of everything that shapes it.

Output (the recipe interface shared by all guests, see guests/README.md)::

    DIR/vmlinuz     kernel
    DIR/initrd.img  initramfs (gzip newc cpio)
    DIR/cmdline     kernel command line, one line
    DIR/boot.raw    the same kernel, initramfs and command line as a firmware-bootable disk
                    (GPT, an EFI system partition holding one unified kernel image)
    DIR/guest.json  metadata: versions, input hash, login and shell prompts

The input hash covers the recipe files, the guests/common/ modules it imports
(``SHARED_FILES``) and the exact Debian versions of the kernel package and
busybox-static and the systemd EFI stub. When ``DIR/guest.json`` already holds it,
the build does nothing. Otherwise it builds into a temporary sibling of DIR and
renames it into place, holding a file lock (``DIR.lock``) so that concurrent
builds (pytest-xdist workers) build once and the others reuse the result.
"""

from __future__ import annotations

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

from guests.common import debian, efi
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
from guests.tiny.assemble import Assembled, assemble

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
    "recipe_digest",
    "recipe_files_digest",
    "resolve_inputs",
]

RECIPE = "tiny"
SCHEMA = 1
RECIPE_DIR = Path(__file__).resolve().parent
# The guests/common/ modules the recipe imports (directly or through each other): they shape
# the kernel, the module order and the initramfs, so they are in the input hash.
SHARED_FILES = ("cpio.py", "debian.py", "efi.py", "kernel.py", "kmods.py", "pvh.py")
LOGIN_PROMPT = "tiny login: "
LOGIN_USER = "root"
SHELL_PROMPT = "root@tiny:~# "
# quiet keeps the console short (the banner and getty still print); panic=-1
# reboots at once on a panic, which ends QEMU when it runs with -no-reboot.
CMDLINE = f"console=ttyS0 quiet panic=-1 {FAST_BOOT_ARGS}"
OUTPUT_FILES = ("vmlinuz", "initrd.img", "cmdline", "boot.raw", "guest.json")


@dataclass(frozen=True)
class Inputs:
    """Everything outside the recipe files that decides the build's output."""

    kernel: debian.Package
    busybox: debian.Package
    stub: debian.Package  # systemd-boot-efi: the EFI stub of boot.raw's unified kernel image


def _log(message: str) -> None:
    print(f"tiny: {message}", file=sys.stderr, flush=True)


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
            "busybox": str(inputs.busybox),
            "stub": str(inputs.stub),
            "cmdline": CMDLINE,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def resolve_inputs() -> Inputs:
    """Pin the kernel, busybox-static and EFI stub versions apt would use right now."""
    busybox_name = "busybox-static"
    busybox_version = debian.installed_version(busybox_name) or debian.candidate_version(busybox_name)
    return Inputs(kernel=debian.kernel_package(), busybox=debian.Package(busybox_name, busybox_version),
                  stub=efi.stub_package())


Assembler = Callable[..., Assembled]


def build(
    out: Path,
    *,
    force: bool = False,
    resolve: Callable[[], Inputs] = resolve_inputs,
    assembler: Assembler = assemble,
    lock_timeout: float = LOCK_TIMEOUT_S,
) -> BuildResult:
    """Make ``out`` hold the current tiny guest; build only when the cache is stale.

    ``resolve`` and ``assembler`` are seams for unit tests.
    """
    out = out.resolve()
    try:
        inputs = resolve()
    except debian.DebianError as exc:
        raise BuildError(f"cannot resolve package versions: {exc}") from exc
    wanted = input_hash(inputs, recipe_files_digest())
    return cached_build(out, wanted, recipe=RECIPE, output_files=OUTPUT_FILES, force=force,
                        lock_timeout=lock_timeout, log=_log,
                        make=lambda: _build_into(out, inputs, wanted, assembler))


def _build_into(out: Path, inputs: Inputs, wanted: str, assembler: Assembler) -> dict[str, Any]:
    started = time.monotonic()
    _log(f"building into {out} (inputs {inputs.kernel}, {inputs.busybox})")
    # Staging is a sibling of out so the final rename stays on one filesystem.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="phd-tiny-work-") as work:
            try:
                made = assembler(inputs.kernel, inputs.busybox, Path(work), staging, cmdline=CMDLINE,
                                 stub=inputs.stub)
            except debian.DebianError as exc:
                raise BuildError(str(exc)) from exc
        meta: dict[str, Any] = {
            "schema": SCHEMA,
            "recipe": RECIPE,
            "input_hash": wanted,
            "kernel_version": made.kernel_version,
            "kernel_package": inputs.kernel.name,
            "kernel_package_version": inputs.kernel.version,
            "busybox_version": inputs.busybox.version,
            "stub_package_version": inputs.stub.version,
            "modules": list(made.modules),
            "busybox_applets": made.busybox_applets,
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
        # VMs boot copy-on-write overlays of it; read-only keeps a stray writer from
        # changing every later boot.
        (staging / "boot.raw").chmod(0o444)
        publish(staging, out, meta)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log(f"built {out} in {meta['build_seconds']} s")
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    return recipe_main(argv, name=RECIPE,
                       description="Build the tiny busybox guest (kernel, initramfs, cmdline, "
                                   "firmware-bootable boot.raw, guest.json).",
                       build=lambda _parser, args: build(args.out, force=args.force))


if __name__ == "__main__":
    sys.exit(main())
