"""Build the downstairs container image offline, only when it is missing.

Two layers of caching, both keyed by content hashes so a stale image is never reused:
- base ``phd-downstairs-base:<hash>``: ``mmdebstrap --variant=minbase --include=python3``
  from the host's Debian mirror, piped into ``docker import`` (no registry needed);
- final ``phd-downstairs:<hash>``: ``docker build`` of the Dockerfile over the base, adding
  only the source files the downstairs imports. The hash covers the Dockerfile, this script
  and those sources, so editing any of them yields a new tag.
A cross-process file lock makes parallel pytest workers build at most once.
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from filelock import FileLock

__all__ = [
    "IMAGE_LABEL",
    "ImageBuildError",
    "downstairs_sources",
    "ensure_image",
    "image_tag",
]

IMAGE_REPO = "phd-downstairs"
BASE_REPO = "phd-downstairs-base"
IMAGE_LABEL = "phd.image=downstairs"
_SUITE = "bookworm"
_PACKAGES = "python3"
_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
_HERE = Path(__file__).resolve().parent
_SUT_ROOT = _HERE.parent.parent  # .../sut
_ENTRY_MODULE = "sut.storage.downstairs"


class ImageBuildError(RuntimeError):
    """The image could not be built; the message carries the command and its output."""


def _progress(text: str) -> None:
    print(f"[phd-downstairs image] {text}", file=sys.stderr, flush=True)


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != "sut":
        return None
    base = _SUT_ROOT.joinpath(*parts[1:])
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    candidate = base.with_suffix(".py")
    return candidate if candidate.is_file() else None


def downstairs_sources() -> list[Path]:
    """Every ``sut`` source file the downstairs imports (transitively), package inits included."""
    seen: set[Path] = set()
    pending = [_ENTRY_MODULE]
    while pending:
        module = pending.pop()
        parts = module.split(".")
        # a module import also runs every parent package's __init__
        for i in range(1, len(parts) + 1):
            path = _module_file(".".join(parts[:i]))
            if path is None or path in seen:
                continue
            seen.add(path)
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    pending.extend(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    pending.append(node.module)
                    pending.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return sorted(seen)


def _digest(parts: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in parts:
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:16]


def _base_tag() -> str:
    sources = _SOURCES.read_bytes() if _SOURCES.is_file() else b""
    recipe = f"minbase {_SUITE} {_PACKAGES}".encode()
    return f"{BASE_REPO}:{_digest([('recipe', recipe), ('sources', sources)])}"


def image_tag() -> str:
    """The tag the current sources would produce (no Docker access needed)."""
    parts = [
        ("Dockerfile", (_HERE / "Dockerfile").read_bytes()),
        ("build.py", Path(__file__).read_bytes()),
        ("base", _base_tag().encode()),
    ]
    parts += [(str(p.relative_to(_SUT_ROOT.parent)), p.read_bytes()) for p in downstairs_sources()]
    return f"{IMAGE_REPO}:{_digest(parts)}"


def _run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    # argv is built here from constants and our own tags, never from user input
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)  # noqa: S603


def _image_exists(tag: str) -> bool:
    return _run(["docker", "image", "inspect", tag]).returncode == 0


def _fail(what: str, argv: list[str], proc: subprocess.CompletedProcess[bytes]) -> None:
    tail = (proc.stderr or b"").decode(errors="replace")[-3000:]
    raise ImageBuildError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}")


def _build_base(tag: str) -> None:
    mirror = str(_SOURCES) if _SOURCES.is_file() else "http://deb.debian.org/debian"
    mm = ["mmdebstrap", "--variant=minbase", f"--include={_PACKAGES}", "--quiet", _SUITE, "-", mirror]
    imp = ["docker", "import", "--change", "LABEL phd.image=downstairs-base", "-", tag]
    _progress(f"bootstrapping Debian {_SUITE} rootfs: {' '.join(mm)}")
    with tempfile.TemporaryFile() as mm_err, tempfile.TemporaryFile() as imp_err:
        producer = subprocess.Popen(  # noqa: S603 - constant argv
            mm, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=mm_err
        )
        try:
            consumer = subprocess.run(  # noqa: S603 - constant argv
                imp, stdin=producer.stdout, stdout=subprocess.DEVNULL, stderr=imp_err, check=False
            )
        finally:
            if producer.stdout is not None:
                producer.stdout.close()
            producer_rc = producer.wait()
        for argv, rc, err in ((mm, producer_rc, mm_err), (imp, consumer.returncode, imp_err)):
            if rc != 0:
                err.seek(0)
                tail = err.read().decode(errors="replace")[-3000:]
                raise ImageBuildError(f"command failed (exit {rc}): {' '.join(argv)}\n{tail}")


def _build_final(tag: str, base: str) -> None:
    with tempfile.TemporaryDirectory(prefix="phd-downstairs-ctx-") as ctx_name:
        ctx = Path(ctx_name)
        shutil.copy(_HERE / "Dockerfile", ctx / "Dockerfile")
        for src in downstairs_sources():
            dest = ctx / src.relative_to(_SUT_ROOT.parent)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest)
        argv = [
            "docker",
            "build",
            "--build-arg",
            f"BASE_IMAGE={base}",
            "--label",
            IMAGE_LABEL,
            "-t",
            tag,
            str(ctx),
        ]
        _progress(f"building {tag}")
        proc = _run(argv)
        if proc.returncode != 0:
            _fail("docker build", argv, proc)


def ensure_image(lock_dir: Path | None = None) -> str:
    """Return the tag of an up-to-date downstairs image, building it if it is missing."""
    tag = image_tag()
    if _image_exists(tag):
        _progress(f"{tag} already present")
        return tag
    lock_root = lock_dir or Path(tempfile.gettempdir())
    lock_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_root / "phd-downstairs-image.lock")):
        if _image_exists(tag):  # another worker built it while we waited for the lock
            return tag
        started = time.monotonic()
        base = _base_tag()
        if not _image_exists(base):
            _build_base(base)
            _progress(f"base {base} built in {time.monotonic() - started:.1f} s")
        _build_final(tag, base)
        _progress(f"{tag} ready after {time.monotonic() - started:.1f} s")
    return tag


if __name__ == "__main__":  # pragma: no cover - use `python -m sut.storage.image ensure`
    print(ensure_image(Path(os.environ["PHD_LOCK_DIR"]) if "PHD_LOCK_DIR" in os.environ else None))
