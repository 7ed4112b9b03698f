"""Build the tiny guest into ``--out DIR``, cached by a hash of everything that shapes it.

Output (the recipe interface shared by all guests, see guests/README.md)::

    DIR/vmlinuz     kernel
    DIR/initrd.img  initramfs (gzip newc cpio)
    DIR/cmdline     kernel command line, one line
    DIR/guest.json  metadata: versions, input hash, login and shell prompts

The input hash covers the recipe files and the exact Debian versions of the
kernel package and busybox-static. When ``DIR/guest.json`` already holds it,
the build does nothing. Otherwise it builds into a temporary sibling of DIR and
renames it into place, holding a file lock (``DIR.lock``) so that concurrent
builds (pytest-xdist workers) build once and the others reuse the result.
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

from filelock import FileLock, Timeout

from guests.tiny import debian
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
    "resolve_inputs",
]

RECIPE = "tiny"
SCHEMA = 1
RECIPE_DIR = Path(__file__).resolve().parent
LOGIN_PROMPT = "tiny login: "
LOGIN_USER = "root"
SHELL_PROMPT = "root@tiny:~# "
# quiet keeps the console short (the banner and getty still print); panic=-1
# reboots at once on a panic, which ends QEMU when it runs with -no-reboot.
CMDLINE = "console=ttyS0 quiet panic=-1"
OUTPUT_FILES = ("vmlinuz", "initrd.img", "cmdline", "guest.json")
LOCK_TIMEOUT_S = 900.0


class BuildError(Exception):
    """The guest could not be built; the message says why and what to do."""


@dataclass(frozen=True)
class Inputs:
    """Everything outside the recipe files that decides the build's output."""

    kernel: debian.Package
    busybox: debian.Package


@dataclass(frozen=True)
class BuildResult:
    out: Path
    built: bool  # False when the cache was already current
    metadata: dict[str, Any]


def _log(message: str) -> None:
    print(f"tiny: {message}", file=sys.stderr, flush=True)


def recipe_digest(recipe_dir: Path = RECIPE_DIR) -> str:
    """sha256 over the recipe's source files (names and contents, in sorted order)."""
    digest = hashlib.sha256()
    for path in sorted(recipe_dir.rglob("*")):
        rel = path.relative_to(recipe_dir).as_posix()
        if path.is_dir() or "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        digest.update(f"{rel}\0{path.stat().st_mode & 0o111:o}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def input_hash(inputs: Inputs, recipe: str) -> str:
    payload = json.dumps(
        {
            "schema": SCHEMA,
            "recipe": recipe,
            "kernel": str(inputs.kernel),
            "busybox": str(inputs.busybox),
            "cmdline": CMDLINE,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def resolve_inputs() -> Inputs:
    """Pin the kernel and busybox-static versions apt would use right now."""
    busybox_name = "busybox-static"
    busybox_version = debian.installed_version(busybox_name) or debian.candidate_version(busybox_name)
    return Inputs(kernel=debian.kernel_package(), busybox=debian.Package(busybox_name, busybox_version))


def read_metadata(out: Path) -> dict[str, Any] | None:
    """``DIR/guest.json`` if DIR holds a complete build, else None."""
    try:
        meta = json.loads((out / "guest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not all((out / name).is_file() for name in OUTPUT_FILES):
        return None
    return meta


def _is_current(out: Path, wanted: str) -> dict[str, Any] | None:
    meta = read_metadata(out)
    return meta if meta is not None and meta.get("input_hash") == wanted else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a directory: choose another path")
    try:
        inputs = resolve()
    except debian.DebianError as exc:
        raise BuildError(f"cannot resolve package versions: {exc}") from exc
    wanted = input_hash(inputs, recipe_digest())

    meta = None if force else _is_current(out, wanted)
    if meta is not None:
        _log(f"{out} is up to date ({wanted[:12]})")
        return BuildResult(out, built=False, metadata=meta)

    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out.parent / f"{out.name}.lock"))
    try:
        lock.acquire(timeout=lock_timeout)
    except Timeout as exc:
        raise BuildError(
            f"another build has held {lock.lock_file} for {lock_timeout:.0f} s: "
            "wait for it, or remove the lock file if no build is running"
        ) from exc
    try:
        # Another worker may have finished the same build while we waited.
        meta = None if force else _is_current(out, wanted)
        if meta is not None:
            _log(f"{out} was built by a concurrent build ({wanted[:12]})")
            return BuildResult(out, built=False, metadata=meta)
        if out.exists() and any(out.iterdir()) and read_metadata(out) is None:
            raise BuildError(
                f"--out {out} is a non-empty directory that holds no tiny guest build; "
                "refusing to replace it: pass an empty or new directory"
            )
        meta = _build_into(out, inputs, wanted, assembler)
        return BuildResult(out, built=True, metadata=meta)
    finally:
        lock.release()


def _build_into(out: Path, inputs: Inputs, wanted: str, assembler: Assembler) -> dict[str, Any]:
    started = time.monotonic()
    _log(f"building into {out} (inputs {inputs.kernel}, {inputs.busybox})")
    # Staging is a sibling of out so the final rename stays on one filesystem.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="phd-tiny-work-") as work:
            try:
                made = assembler(inputs.kernel, inputs.busybox, Path(work), staging, cmdline=CMDLINE)
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
            "modules": list(made.modules),
            "busybox_applets": made.busybox_applets,
            "cmdline": CMDLINE,
            "login_prompt": LOGIN_PROMPT,
            "login_user": LOGIN_USER,
            "shell_prompt": SHELL_PROMPT,
            "files": {"kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "cmdline"},
            "sha256": {name: _sha256(staging / name) for name in ("vmlinuz", "initrd.img")},
            "build_seconds": round(time.monotonic() - started, 2),
        }
        # guest.json last: its presence marks the directory complete.
        (staging / "guest.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        staging.chmod(0o755)
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log(f"built {out} in {meta['build_seconds']} s")
    return meta


def _replace_dir(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an old ``out`` is renamed aside first, then deleted.

    Linux cannot atomically swap two directories with ``os.rename``; the window
    between the two renames is tiny and readers check guest.json anyway.
    """
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{time.monotonic_ns()}")
        out.rename(old)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="guests/tiny/build",
        description="Build the tiny busybox guest (kernel, initramfs, cmdline, guest.json).",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    try:
        result = build(args.out, force=args.force)
    except BuildError as exc:
        print(f"tiny: error: {exc}", file=sys.stderr)
        return 1
    print(result.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
