"""Build downstairs container images offline, only when they are missing.

Two images, one per downstairs *program* (see ``phd.storage.downstairs``); both speak Crucible's
protocol v13:
- ``ours``: ``phd-downstairs:<hash>``, ``python -m sut.storage.downstairs`` (Debian's python3
  and python3-xxhash for the block hash);
- ``binary``: ``phd-downstairs-bin:<binary sha256>-<recipe>``, a given ``crucible-downstairs``
  executable plus what its ``ldd`` needs: the Debian package of each library where ``dpkg -S``
  names one (libsqlite3-0, say), a copy of the library only where none does; and
  ca-certificates, which it loads at start although ldd cannot tell.

Two layers of caching, both keyed by content hashes so a stale image is never reused:
- base ``phd-downstairs-base:<hash>``: ``mmdebstrap --variant=minbase --include=<packages>``
  from the host's Debian mirror, piped into ``docker import`` (no registry needed);
- final image: ``docker build`` of the program's Dockerfile over the base, adding only the
  source files the downstairs imports (or the binary). The hash covers the Dockerfile, this
  script and those files, so editing any of them yields a new tag.
Every final image runs as uid 10001 with ``/data`` as a volume, works on a read-only root and
carries the label ``phd.image=downstairs``. A cross-process file lock makes parallel pytest
workers build at most once.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from filelock import FileLock, Timeout

__all__ = [
    "IMAGE_LABEL",
    "PROGRAMS",
    "BinaryRuntime",
    "ImageBuildError",
    "binary_image_tag",
    "binary_runtime",
    "downstairs_sources",
    "ensure_binary_image",
    "ensure_image",
    "image_tag",
]

IMAGE_LABEL = "phd.image=downstairs"
BASE_REPO = "phd-downstairs-base"
BIN_REPO = "phd-downstairs-bin"
BIN_PATH = "/opt/phd/bin/crucible-downstairs"
_SUITE = "bookworm"
_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
_HERE = Path(__file__).resolve().parent
_SUT_ROOT = _HERE.parent.parent  # .../sut
_LOCK_NAME = "phd-downstairs-image.lock"
# Needed by a crucible-downstairs although ldd cannot tell: its repair client (reqwest with
# rustls) loads the system's CA certificates at start and panics without any ("No CA
# certificates were loaded from the system").
_BINARY_EXTRA_PACKAGES = ("ca-certificates",)


@dataclass(frozen=True)
class _Recipe:
    repo: str
    dockerfile: str
    packages: tuple[str, ...]
    entry_module: str


# Our Python program; the binary one is built by ensure_binary_image.
_RECIPES = {
    "ours": _Recipe("phd-downstairs", "Dockerfile", ("python3", "python3-xxhash"), "sut.storage.downstairs"),
}
PROGRAMS = tuple(_RECIPES)


class ImageBuildError(RuntimeError):
    """The image could not be built; the message carries the command and its output."""


def _progress(text: str) -> None:
    print(f"[phd-downstairs image] {text}", file=sys.stderr, flush=True)


def _recipe(program: str) -> _Recipe:
    try:
        return _RECIPES[program]
    except KeyError:
        raise ImageBuildError(
            f"unknown downstairs program {program!r}; use one of {PROGRAMS} "
            "(or ensure_binary_image for a crucible-downstairs binary)"
        ) from None


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != "sut":
        return None
    base = _SUT_ROOT.joinpath(*parts[1:])
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    candidate = base.with_suffix(".py")
    return candidate if candidate.is_file() else None


def downstairs_sources(program: str = "ours") -> list[Path]:
    """Every ``sut`` source file the program's downstairs imports (transitively), package
    inits included."""
    seen: set[Path] = set()
    pending = [_recipe(program).entry_module]
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


def _digest(parts: Sequence[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in parts:
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:16]


def _base_tag(packages: Sequence[str] = ("python3",)) -> str:
    sources = _SOURCES.read_bytes() if _SOURCES.is_file() else b""
    recipe = f"minbase {_SUITE} {','.join(packages)}".encode()
    return f"{BASE_REPO}:{_digest([('recipe', recipe), ('sources', sources)])}"


def image_tag(program: str = "ours") -> str:
    """The tag the current sources would produce for a Python program (no Docker needed)."""
    recipe = _recipe(program)
    parts = [
        ("Dockerfile", (_HERE / recipe.dockerfile).read_bytes()),
        ("build.py", Path(__file__).read_bytes()),
        ("base", _base_tag(recipe.packages).encode()),
    ]
    parts += [(str(p.relative_to(_SUT_ROOT.parent)), p.read_bytes()) for p in downstairs_sources(program)]
    return f"{recipe.repo}:{_digest(parts)}"


def _run(argv: list[str], timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
    # argv is built here from constants, our own tags and a path the caller vouched for
    return subprocess.run(  # noqa: S603
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
        timeout=timeout,
    )


def _image_exists(tag: str) -> bool:
    return _run(["docker", "image", "inspect", tag]).returncode == 0


def _fail(what: str, argv: list[str], proc: subprocess.CompletedProcess[bytes]) -> None:
    tail = ((proc.stderr or b"") + (proc.stdout or b"")).decode(errors="replace")[-3000:]
    raise ImageBuildError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{tail}")


def _build_base(tag: str, packages: Sequence[str]) -> None:
    mirror = str(_SOURCES) if _SOURCES.is_file() else "http://deb.debian.org/debian"
    mm = [
        "mmdebstrap",
        "--variant=minbase",
        f"--include={','.join(packages)}",
        _SUITE,
        "-",
        mirror,
    ]
    imp = ["docker", "import", "--change", "LABEL phd.image=downstairs-base", "-", tag]
    _progress(f"bootstrapping Debian {_SUITE} rootfs: {' '.join(mm)}")
    with tempfile.TemporaryFile() as mm_err, tempfile.TemporaryFile() as imp_err:
        producer = subprocess.Popen(  # noqa: S603 - constant argv
            mm, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        # mmdebstrap's phases ("I: downloading packages with apt...") are the progress of
        # the longest part of a first build; every line is kept for the error message.
        reader = threading.Thread(target=_relay, args=(producer.stderr, mm_err, "I: "), daemon=True)
        reader.start()
        try:
            consumer = subprocess.run(  # noqa: S603 - constant argv
                imp, stdin=producer.stdout, stdout=subprocess.DEVNULL, stderr=imp_err, check=False
            )
        finally:
            if producer.stdout is not None:
                producer.stdout.close()
            producer_rc = producer.wait()
            reader.join(timeout=30)
        for argv, rc, err in ((mm, producer_rc, mm_err), (imp, consumer.returncode, imp_err)):
            if rc != 0:
                err.seek(0)
                tail = err.read().decode(errors="replace")[-3000:]
                raise ImageBuildError(f"command failed (exit {rc}): {' '.join(argv)}\n{tail}")


def _relay(stream: IO[bytes] | None, keep: IO[bytes], shown: str) -> None:
    """Copy `stream` to `keep`, reporting each line that starts with `shown` as progress."""
    if stream is None:
        return
    for raw in stream:
        keep.write(raw)
        text = raw.decode(errors="replace").rstrip()
        if text.startswith(shown):
            _progress(text)


def _run_shown(argv: list[str], shown: str) -> subprocess.CompletedProcess[bytes]:
    """`_run`, reporting each output line that starts with `shown` as it comes (docker
    build's "Step 3/6 : ..." lines, which phd turns into a percentage)."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(  # noqa: S603 - argv from constants and our own tags
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        _relay(proc.stdout, out, shown)
        code = proc.wait()
        out.seek(0)
        return subprocess.CompletedProcess(argv, code, out.read(), b"")


def _docker_build(tag: str, base: str, ctx: Path, labels: dict[str, str]) -> None:
    argv = ["docker", "build", "--build-arg", f"BASE_IMAGE={base}", "--label", IMAGE_LABEL]
    for key, value in sorted(labels.items()):
        argv += ["--label", f"{key}={value}"]
    argv += ["-t", tag, str(ctx)]
    _progress(f"building {tag}")
    proc = _run_shown(argv, "Step ")
    if proc.returncode != 0:
        _fail("docker build", argv, proc)


def _build_final(tag: str, base: str, program: str) -> None:
    recipe = _recipe(program)
    with tempfile.TemporaryDirectory(prefix="phd-downstairs-ctx-") as ctx_name:
        ctx = Path(ctx_name)
        shutil.copy(_HERE / recipe.dockerfile, ctx / "Dockerfile")
        for src in downstairs_sources(program):
            dest = ctx / src.relative_to(_SUT_ROOT.parent)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest)
        _docker_build(tag, base, ctx, {"phd.downstairs.program": program})


def _locked_build(tag: str, lock_dir: Path | None, build: Callable[[float], None]) -> str:
    """Run `build()` under the cross-process lock unless `tag` exists (before or after it)."""
    if _image_exists(tag):
        _progress(f"{tag} already present")
        return tag
    lock_root = lock_dir or Path(tempfile.gettempdir())
    lock_root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_root / _LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _progress(f"waiting for another process building an image ({lock.lock_file})")
        lock.acquire()
    try:
        if _image_exists(tag):  # another worker built it while we waited for the lock
            return tag
        started = time.monotonic()
        build(started)
        _progress(f"{tag} ready after {time.monotonic() - started:.1f} s")
    finally:
        lock.release()
    return tag


def _ensure_base(packages: Sequence[str], started: float) -> str:
    base = _base_tag(packages)
    if not _image_exists(base):
        _build_base(base, packages)
        _progress(f"base {base} built in {time.monotonic() - started:.1f} s")
    return base


def ensure_image(lock_dir: Path | None = None, program: str = "ours") -> str:
    """Return the tag of an up-to-date image of a Python program, building it if missing."""
    tag = image_tag(program)
    packages = _recipe(program).packages
    return _locked_build(
        tag, lock_dir, lambda started: _build_final(tag, _ensure_base(packages, started), program)
    )


# --- the image around a crucible-downstairs binary ---------------------------------------------
@dataclass(frozen=True)
class BinaryRuntime:
    """What a binary needs at run time beyond itself: Debian packages to install and
    libraries no package provides (copied next to it)."""

    packages: tuple[str, ...]
    copied: tuple[Path, ...]


_LDD_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(\S+|not found)\s*(?:\(0x[0-9a-f]+\))?\s*$")


def _ldd(binary: Path) -> list[tuple[str, str]]:
    """(soname, resolved path or "not found") of every library ldd lists, vdso left out."""
    try:
        proc = _run(["ldd", str(binary)], timeout=60)
    except FileNotFoundError:
        raise ImageBuildError("ldd is not installed (Debian package libc-bin)") from None
    text = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        if "not a dynamic executable" in text + proc.stderr.decode(errors="replace"):
            return []  # static: needs nothing
        _fail("ldd", ["ldd", str(binary)], proc)
    libs = []
    for line in text.splitlines():
        match = _LDD_LINE.match(line)
        if match is None:
            continue
        name, path = match.group(1) or match.group(2), match.group(2)
        if "vdso" in name:
            continue
        libs.append((name, path))
    return libs


def _path_variants(path: Path) -> list[str]:
    """The names dpkg may know a library by (usr-merge: /lib is a link to /usr/lib)."""
    out = [str(path), str(path.resolve())]
    for p in list(out):
        if p.startswith("/usr/"):
            out.append(p.removeprefix("/usr"))
        else:
            out.append("/usr" + p)
    return list(dict.fromkeys(out))


def _package_of(path: Path) -> str | None:
    if shutil.which("dpkg") is None:
        return None
    for candidate in _path_variants(path):
        proc = _run(["dpkg", "-S", candidate], timeout=60)
        if proc.returncode == 0:
            line = proc.stdout.decode(errors="replace").splitlines()[0]
            pkg = line.split(":", 1)[0].split(",")[0].strip()
            if pkg:
                return pkg
    return None


def binary_runtime(binary: Path) -> BinaryRuntime:
    """The packages (via dpkg -S) and leftover libraries (copied) `binary` needs."""
    packages: set[str] = set()
    copied: list[Path] = []
    for name, path in _ldd(binary):
        if path == "not found":
            raise ImageBuildError(
                f"{binary} needs {name}, which is not installed here either: "
                "install its Debian package on this machine first (ldd says "
                "'not found')"
            )
        pkg = _package_of(Path(path))
        if pkg is not None:
            packages.add(pkg)
        elif not Path(path).name.startswith("ld-linux"):
            copied.append(Path(path).resolve())
    packages.update(_BINARY_EXTRA_PACKAGES)
    return BinaryRuntime(tuple(sorted(packages)), tuple(copied))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def binary_image_tag(binary: Path, runtime: BinaryRuntime | None = None) -> str:
    """`phd-downstairs-bin:<first 16 of the binary's sha256>-<recipe hash>`."""
    runtime = runtime or binary_runtime(binary)
    parts = [
        ("Dockerfile", (_HERE / "Dockerfile.binary").read_bytes()),
        ("build.py", Path(__file__).read_bytes()),
        ("base", _base_tag(runtime.packages).encode()),
    ]
    parts += [(f"lib/{p.name}", p.read_bytes()) for p in runtime.copied]
    return f"{BIN_REPO}:{_sha256(binary)[:16]}-{_digest(parts)[:8]}"


def ensure_binary_image(binary: Path, lock_dir: Path | None = None) -> str:
    """Return the tag of an image running `binary` (a crucible-downstairs), building it if
    missing; the build ends by creating a region and running it in the image until it
    listens, so a library or file it lacks fails here and not in a test."""
    binary = binary.resolve()
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise ImageBuildError(f"{binary} is not an executable file")
    runtime = binary_runtime(binary)
    tag = binary_image_tag(binary, runtime)
    sha = _sha256(binary)

    def build(started: float) -> None:
        base = _ensure_base(runtime.packages, started)
        with tempfile.TemporaryDirectory(prefix="phd-downstairs-bin-ctx-") as ctx_name:
            ctx = Path(ctx_name)
            shutil.copy(_HERE / "Dockerfile.binary", ctx / "Dockerfile")
            shutil.copy(binary, ctx / "crucible-downstairs")
            (ctx / "lib").mkdir()
            for lib in runtime.copied:
                shutil.copy(lib, ctx / "lib" / lib.name)
            _docker_build(
                tag, base, ctx, {"phd.downstairs.program": "binary", "phd.downstairs.binary-sha256": sha}
            )
        # Smoke check: create a tiny region and run it until it listens, inside the image (a
        # library or file the binary needs at start fails the build, not a test).
        script = (
            f"{BIN_PATH} create -u 00000000-0000-4000-8000-000000000001 -d /tmp/r "
            f"--extent-size 8 --extent-count 1 >/dev/null && exec timeout -s KILL 5 "
            f"{BIN_PATH} run -d /tmp/r -a 127.0.0.1 -p 9000"
        )
        check = [
            "docker",
            "run",
            "--rm",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--network",
            "none",
            "--entrypoint",
            "/bin/sh",
            tag,
            "-c",
            script,
        ]
        proc = _run(check, timeout=120)
        if b"downstairs listening on" not in proc.stdout:
            _run(["docker", "image", "rm", "-f", tag])
            _fail("the built image's smoke check (create, then run until it listens)", check, proc)

    return _locked_build(tag, lock_dir, build)


if __name__ == "__main__":  # pragma: no cover - use `python -m sut.storage.image ensure`
    print(ensure_image(Path(os.environ["PHD_LOCK_DIR"]) if "PHD_LOCK_DIR" in os.environ else None))
