"""The build protocol every guest recipe follows: the input-hash cache, the build lock, the
atomic swap, the command line.

A recipe (`guests/<name>/build.py`) knows how to resolve its inputs, hash them and assemble
its files into a staging directory; `cached_build` decides whether that is needed at all and
makes concurrent builders (pytest-xdist workers) build once while the others wait and reuse.
This module shapes no guest, so no recipe's input hash covers it; the other modules of
guests/common/ do, for each recipe that imports them (`shared_digest`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

__all__ = [
    "LOCK_TIMEOUT_S",
    "BuildError",
    "BuildResult",
    "cached_build",
    "current_metadata",
    "main",
    "publish",
    "read_metadata",
    "recipe_digest",
    "replace_dir",
    "sha256_file",
    "shared_digest",
]

COMMON_DIR = Path(__file__).resolve().parent

# A cold Debian build takes about a minute on two cores; a waiter gives up long after.
LOCK_TIMEOUT_S = 900.0


class BuildError(Exception):
    """The guest could not be built; the message says why and what to do."""


@dataclass(frozen=True)
class BuildResult:
    out: Path
    built: bool  # False when the cache was already current
    metadata: dict[str, Any]


def recipe_digest(recipe_dir: Path) -> str:
    """sha256 over a recipe's source files (names, exec bits and contents, sorted)."""
    digest = hashlib.sha256()
    for path in sorted(recipe_dir.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        rel = path.relative_to(recipe_dir).as_posix()
        digest.update(f"{rel}\0{path.stat().st_mode & 0o111:o}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def shared_digest(names: Sequence[str], common_dir: Path = COMMON_DIR) -> str:
    """sha256 over the contents of the guests/common/ files a recipe imports (its SHARED_FILES).

    Contents only, in no particular order: moving the folder or renaming a file keeps every
    guest's key, editing a file changes the key of each recipe that lists it.
    """
    digests = sorted(hashlib.sha256((common_dir / name).read_bytes()).digest() for name in names)
    return hashlib.sha256(b"".join(digests)).hexdigest()


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_metadata(out: Path, output_files: Sequence[str] = ("guest.json",)) -> dict[str, Any] | None:
    """``DIR/guest.json`` if DIR holds a complete build (every output file present), else None."""
    try:
        meta = json.loads((out / "guest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not all((out / name).is_file() for name in output_files):
        return None
    return meta


def current_metadata(out: Path, wanted: str, output_files: Sequence[str]) -> dict[str, Any] | None:
    meta = read_metadata(out, output_files)
    return meta if meta is not None and meta.get("input_hash") == wanted else None


def replace_dir(new: Path, out: Path) -> None:
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


def publish(staging: Path, out: Path, meta: dict[str, Any]) -> None:
    """Write ``guest.json`` into ``staging`` LAST (its presence marks a build complete), then
    swap the directory in as ``out``."""
    (staging / "guest.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    staging.chmod(0o755)
    replace_dir(staging, out)


def main(
    argv: Sequence[str] | None,
    *,
    name: str,
    description: str,
    build: Callable[[argparse.ArgumentParser, argparse.Namespace], BuildResult],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """The command line every recipe has: ``guests/<name>/build --out DIR [--force]`` (plus
    the recipe's own arguments). Prints the output directory, or one error line and exits 1
    (one line, so CI logs and the framework's skip reason show all of it)."""
    parser = argparse.ArgumentParser(prog=f"guests/{name}/build", description=description)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        result = build(parser, args)
    except BuildError as exc:
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"{name}: error: {message}", file=sys.stderr)
        return 1
    print(result.out)
    return 0


def cached_build(
    out: Path,
    wanted: str,
    *,
    recipe: str,
    output_files: Sequence[str],
    make: Callable[[], dict[str, Any]],
    log: Callable[[str], None],
    force: bool = False,
    lock_timeout: float = LOCK_TIMEOUT_S,
    before_build: Callable[[], None] | None = None,
) -> BuildResult:
    """Make ``out`` hold the build whose input hash is ``wanted``; call ``make`` only if stale.

    ``make`` assembles into ``out`` (atomically, see replace_dir) and returns its metadata.
    ``before_build`` runs only when a build is really needed (e.g. a root check), before
    the lock is taken.
    """
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a directory: choose another path")
    meta = None if force else current_metadata(out, wanted, output_files)
    if meta is not None:
        log(f"{out} is up to date ({wanted[:12]})")
        return BuildResult(out, built=False, metadata=meta)
    if before_build is not None:
        before_build()

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
        meta = None if force else current_metadata(out, wanted, output_files)
        if meta is not None:
            log(f"{out} was built by a concurrent build ({wanted[:12]})")
            return BuildResult(out, built=False, metadata=meta)
        if out.exists() and any(out.iterdir()) and read_metadata(out) is None:
            raise BuildError(
                f"--out {out} is a non-empty directory that holds no {recipe} guest build; "
                "refusing to replace it: pass an empty or new directory"
            )
        return BuildResult(out, built=True, metadata=make())
    finally:
        lock.release()
