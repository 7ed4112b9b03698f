"""Artifact store: resolve a manifest key to verified files on disk.

The manifest (``phd.artifacts.manifest``) gives every artifact exactly one source:

- ``remote``: downloaded into ``<artifact_dir>/<sha256>/<filename>``, made read-only,
  verified once per process; a corrupt cached copy is deleted and fetched again.
- ``local_path``: a file the user already has (relative paths are read against the
  manifest's folder), checked against ``sha256`` when one is given, used in place.
- ``recipe``: built by ``<root>/<recipe>/build --out <artifact_dir>/guests/<key>``, where
  ``<root>`` holds the ``guests`` package (the checkout, or site-packages when installed); the
  recipe keeps its own cache keyed by a hash of its inputs. ``inputs`` names other
  artifacts, handed over as ``--input NAME=PATH`` once they are available.

The manifest and the cache are untrusted input (the path policy of ``phd.artifacts.manifest``,
the file access of ``phd.artifacts.files``): a file name taken from the manifest must be a
plain name, every cache path stays inside the cache, and the store never follows a symlink
in the cache, never opens what is not a regular file, and never deletes or chmods a file
outside the cache (a ``local_path`` is only read).

Anything that cannot be had here (no network, a recipe that fails) raises
`ArtifactUnavailable`, whose message says how to provide it; the pytest plugin turns it
into a SKIP. A file whose content does not match its sha256 raises `ArtifactHashMismatch`
instead: that is a broken manifest or a tampered file, never something to skip quietly.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shlex
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import httpx
from filelock import FileLock, Timeout

from phd.artifacts.files import (
    CHUNK,
    NotRegular,
    clear_slot,
    kind_of,
    one_line,
    open_regular,
    os_reason,
    read_at_most,
    seal,
    sha256_fd,
)
from phd.artifacts.manifest import (
    SHA256_HEX,
    ArtifactEntry,
    LocalPathSource,
    RemoteSource,
    escape_unsafe,
    load_manifest,
    name_problem,
    short_repr,
)
from phd.core.errors import ArtifactUnavailable, HarnessError
from phd.core.progress import build_lock

__all__ = [
    "ArtifactHashMismatch",
    "ArtifactStore",
    "CacheCheck",
    "GuestArtifact",
    "NullProgress",
    "Progress",
]

CONNECT_TIMEOUT_S = 10.0  # an unreachable mirror must not hang a test session
READ_TIMEOUT_S = 60.0  # between two chunks of a download
LOCK_TIMEOUT_S = 1800.0  # another worker's download or build of the same artifact
RECIPE_TIMEOUT_S = 1800.0
# Bounds on untrusted input: a guest.json or cmdline larger than this is not one.
GUEST_JSON_MAX_BYTES = 1 << 20
CMDLINE_MAX_BYTES = 1 << 16


# --- errors -------------------------------------------------------------------------------
class ArtifactHashMismatch(HarnessError):
    """A file's sha256 is not the manifest's: a wrong manifest entry or a tampered file.
    ``fix`` says what to change; it never advises deleting a file the store does not own."""

    def __init__(self, key: str, path_or_url: str, expected: str, actual: str, *,
                 fix: str = "fix the manifest's sha256") -> None:
        super().__init__(f"artifact {key!r}: {path_or_url} has sha256 {actual}, the manifest "
                         f"expects {expected}; refusing it: {fix}")
        self.key = key
        self.expected = expected
        self.actual = actual


# --- progress -------------------------------------------------------------------------------
class Progress(Protocol):
    """Where long steps report; the CLI draws rich progress bars, pytest runs stay quiet."""

    def begin(self, key: str, what: str, total: int | None) -> None: ...

    def advance(self, key: str, nbytes: int) -> None: ...

    def line(self, key: str, text: str) -> None: ...

    def end(self, key: str) -> None: ...


class NullProgress:
    def begin(self, key: str, what: str, total: int | None) -> None:
        pass

    def advance(self, key: str, nbytes: int) -> None:
        pass

    def line(self, key: str, text: str) -> None:
        pass

    def end(self, key: str) -> None:
        pass


# --- results --------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuestArtifact:
    name: str
    kernel: Path
    initrd: Path
    cmdline: str
    login_prompt: str
    shell_prompt: str
    # The guest's root disk image (raw), for recipes that boot from a disk (guest.json
    # "files": {"disk": ...}); None for initramfs-only guests such as tiny.
    disk: Path | None = None
    # A disk image UEFI firmware boots (GPT with an EFI system partition; guest.json "files":
    # {"firmware_disk": ...}): debian's root disk itself, tiny's boot.raw. None: the guest can
    # only be booted directly (a recipe from before firmware boot).
    firmware_disk: Path | None = None
    # The adapter family from the manifest (`kind = { guest_os = ... }`); it equals `name`
    # for every entry today, but lets two keys (say alpine-3.20, alpine-3.21) share one adapter.
    guest_os: str | None = None


@dataclass(frozen=True)
class CacheCheck:
    """One file looked at by `ArtifactStore.verify`."""

    key: str | None  # None: a cache entry that no manifest key points at (any more)
    path: Path
    status: str  # "ok" | "bad" | "missing" | "unchecked"
    detail: str = ""
    # What to do about a bad file, in one line. Deleting is only ever advised for what
    # lives in the cache; a local_path's fix is the manifest.
    fix: str = ""


# --- the store ------------------------------------------------------------------------------
class ArtifactStore:
    """Resolves manifest keys to files; one instance per process (each xdist worker).

    Thread-safe within a process (one re-entrant lock: a recipe resolves its inputs
    through the same store); across processes, fetches hold a file lock next to the cached
    file and recipes hold their own, so nothing is downloaded or built twice.

    ``manifest_option`` / ``artifact_dir_option`` are how the tool the user ran takes those
    two paths (the pytest plugin's by default; the CLI passes ``--manifest`` /
    ``--artifact-dir``): error messages name them.
    """

    def __init__(self, manifest: Path, artifact_dir: Path, repo_root: Path, *,
                 transport: httpx.BaseTransport | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 lock_timeout_s: float = LOCK_TIMEOUT_S,
                 manifest_option: str = "--phd-manifest",
                 artifact_dir_option: str = "--phd-artifact-dir") -> None:
        self.manifest_path = manifest
        self.artifact_dir = artifact_dir
        self.repo_root = repo_root
        self.manifest = load_manifest(manifest, option=manifest_option)
        self._dir_option = artifact_dir_option
        self._transport = transport  # a seam for unit tests (httpx.MockTransport)
        self._timeout = httpx.Timeout(READ_TIMEOUT_S, connect=connect_timeout_s)
        self._lock_timeout_s = lock_timeout_s
        self._lock = threading.RLock()
        # key -> ready path: each artifact is verified (or its recipe asked) once per process.
        self._ready: dict[str, Path] = {}
        self._guests: dict[str, GuestArtifact] = {}
        # Where `ensure` reports when its caller names no sink (the pytest plugin sets its
        # phd.core.progress reporter here).
        self.progress: Progress | None = None

    # --- lookup ---------------------------------------------------------------------------
    @property
    def entries(self) -> Mapping[str, ArtifactEntry]:
        return self.manifest.artifacts

    def entry(self, key: str) -> ArtifactEntry:
        try:
            return self.entries[key]
        except KeyError:
            raise HarnessError(f"artifact {short_repr(key)} is not in {self.manifest_path}; "
                               f"known: {sorted(self.entries)}") from None

    def cache_path(self, key: str) -> Path | None:
        """Where a remote artifact lives once fetched: ``<artifact_dir>/<sha256>/<filename>``
        (both parts checked by `load_manifest`: a digest and a plain file name)."""
        entry = self.entry(key)
        if entry.source.remote is None:
            return None
        return self.artifact_dir / entry.source.remote.sha256 / entry.file_name()

    def local_path(self, key: str) -> Path | None:
        entry = self.entry(key)
        if entry.source.local_path is None:
            return None
        path = Path(entry.source.local_path.path)
        with contextlib.suppress(RuntimeError):  # `~nosuchuser/...`: left as written (missing)
            path = path.expanduser()
        return path if path.is_absolute() else self.manifest_path.parent / path

    def recipe_out(self, key: str) -> Path | None:
        """A recipe's output directory (where it has always been: ``<artifact_dir>/guests/<key>``)."""
        return None if self.entry(key).source.recipe is None else self.artifact_dir / "guests" / key

    def status(self, key: str) -> str:
        """One cheap line for `phd artifacts list` (no hashing: that is `verify`)."""
        cached, local, out = self.cache_path(key), self.local_path(key), self.recipe_out(key)
        if cached is not None:
            folder_kind = kind_of(cached.parent, follow=False)
            kind = kind_of(cached, follow=False) if folder_kind == "a folder" else folder_kind
            if kind is None:
                return "not fetched"
            if kind == "a regular file":
                return f"cached {cached}"
            where = cached if folder_kind == "a folder" else cached.parent
            return f"corrupt: {where} is {kind} (`phd artifacts fetch {key}` replaces it)"
        if local is not None:
            kind = kind_of(local, follow=True)
            if kind is None:
                return f"missing {local}"
            return f"present {local}" if kind == "a regular file" else f"not a file: {local} is {kind}"
        assert out is not None
        kind = kind_of(out, follow=False)
        if kind not in (None, "a folder"):
            return f"corrupt: {out} is {kind} (`phd artifacts build {key} --force` replaces it)"
        meta = None if kind is None else _read_guest_json(out)
        if meta is None:
            return "not built"
        return f"built {out} (inputs {escape_unsafe(str(meta.get('input_hash', '?'))[:12], 12)})"

    # --- resolving ------------------------------------------------------------------------
    def guest(self, name: str) -> GuestArtifact:
        """The guest built by the recipe of manifest entry ``name`` (built or reused once)."""
        with self._lock:
            if name not in self._guests:
                if name not in self.entries:
                    raise HarnessError(f"guest {short_repr(name)} is not in {self.manifest_path}; "
                                       f"known: {sorted(self.entries)}")
                entry = self.entries[name]
                if entry.kind.guest_os is None:
                    raise HarnessError(f"artifacts.{name}.kind is \"file\", not a guest_os: "
                                       "it cannot boot a VM")
                self._guests[name] = _guest_from(name, entry.kind.guest_os, self.ensure(name))
            return self._guests[name]

    def ensure(self, key: str, *, progress: Progress | None = None, force: bool = False) -> Path:
        """Make ``key`` available and return its path (a file, or a recipe's output folder).

        ``force`` rebuilds a recipe (``--force``) even when its cache is current; for a
        file it re-verifies the cached copy instead of trusting this process's memo.
        """
        sink = progress or self.progress or NullProgress()
        with self._lock:
            if not force and key in self._ready:
                return self._ready[key]
            entry = self.entry(key)
            if entry.source.remote is not None:
                path = self._fetch_remote(key, entry, entry.source.remote, sink)
            elif entry.source.local_path is not None:
                path = self._check_local(key, entry.source.local_path)
            else:
                path = self._build_recipe(key, entry, sink, force=force)
            self._ready[key] = path
            return path

    def _check_local(self, key: str, source: LocalPathSource) -> Path:
        """A local_path is the user's file: read (hashed), never chmodded, moved or deleted."""
        path = self.local_path(key)
        assert path is not None
        fix = f"point [artifacts.{key}].source.local_path at the file in {self.manifest_path}"
        try:
            with open_regular(path, follow=True) as fd:
                actual = None if source.sha256 is None else sha256_fd(fd)
        except (FileNotFoundError, NotADirectoryError):
            raise ArtifactUnavailable(
                f"artifact {key!r}",
                f"its local_path {path} does not exist; put the file there, or change "
                f"[artifacts.{key}].source in {self.manifest_path}") from None
        except NotRegular as exc:
            raise HarnessError(f"artifact {key!r}: its local_path {path} is {exc.what}, not a "
                               f"regular file; {fix}") from None
        except OSError as exc:
            raise HarnessError(f"artifact {key!r}: cannot read its local_path {path} "
                               f"({os_reason(exc)}); {fix}") from None
        if source.sha256 is not None and actual != source.sha256:
            raise ArtifactHashMismatch(key, str(path), source.sha256, str(actual), fix=_LOCAL_FIX)
        return path

    def _cache_folder(self, folder: Path, key: str, progress: Progress) -> None:
        """Make ``folder``, a child of the artifact dir, a real folder inside the cache: a
        symlink there is removed, never followed (nothing is written through it)."""
        try:
            self.artifact_dir.mkdir(parents=True, exist_ok=True)
            kind = kind_of(folder, follow=False)
            if kind not in (None, "a folder"):
                progress.line(key, f"{folder} is {kind}, not a folder of the cache: replacing it")
                clear_slot(folder)
            folder.mkdir(exist_ok=True)
            real, expected = folder.resolve(strict=True), self.artifact_dir.resolve(strict=True) / folder.name
        except OSError as exc:
            raise HarnessError(f"artifact {key!r}: cannot create the artifact cache {folder} "
                               f"({os_reason(exc)}); pass a writable {self._dir_option} "
                               "(or PHD_ARTIFACT_DIR)") from None
        if real != expected or kind_of(folder, follow=False) != "a folder":
            raise HarnessError(f"artifact {key!r}: the cache folder {folder} resolves to {real}, "
                               f"outside {self.artifact_dir}; remove it and run the command again")

    def _clear(self, key: str, path: Path, why: str, progress: Progress) -> None:
        progress.line(key, why)
        try:
            clear_slot(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise HarnessError(f"artifact {key!r}: cannot replace {path} ({os_reason(exc)}); remove "
                               f"it (it is inside the cache) and run `phd artifacts fetch {key}`") from None

    def _fetch_remote(self, key: str, entry: ArtifactEntry, source: RemoteSource,
                      progress: Progress) -> Path:
        final = self.cache_path(key)
        assert final is not None
        self._cache_folder(final.parent, key, progress)
        lock_path = final.parent / f".{final.name}.lock"
        kind = kind_of(lock_path, follow=False)
        if kind not in (None, "a regular file"):
            self._clear(key, lock_path, f"{lock_path} is {kind}, not a lock file: replacing it", progress)
        lock = FileLock(str(lock_path))
        self._acquire(lock, key, progress)
        try:
            # Checked under the lock: a copy another worker is still writing is never seen
            # (it writes a temporary file and renames it), and only one worker deletes.
            if self._cached_copy_ok(key, final, source.sha256, progress):
                return final
            for stale in final.parent.glob(glob.escape(f".{final.name}.") + "*.part"):
                with contextlib.suppress(OSError):  # left by a killed fetch; we hold the lock
                    clear_slot(stale)
            self._download(key, entry, source, final, progress)
            return final
        finally:
            lock.release()

    def _acquire(self, lock: FileLock, key: str, progress: Progress) -> None:
        try:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                progress.line(key, f"waiting for {lock.lock_file}: another process is fetching {key}")
                lock.acquire(timeout=self._lock_timeout_s)
        except Timeout as exc:
            raise HarnessError(
                f"another process has held {lock.lock_file} for {self._lock_timeout_s:.0f} s "
                f"while fetching {key!r}: wait for it, or remove the lock file if none is "
                "running") from exc
        except OSError as exc:
            raise HarnessError(f"artifact {key!r}: cannot lock {lock.lock_file} ({os_reason(exc)}); "
                               f"pass a writable {self._dir_option} (or PHD_ARTIFACT_DIR)") from None

    def _cached_copy_ok(self, key: str, final: Path, sha256: str, progress: Progress) -> bool:
        """Hash the cached copy without following a symlink; seal it if it is good. A copy
        that is not a regular file, or is corrupt, is cleared for a fresh download."""
        try:
            with open_regular(final, follow=False) as fd:
                actual = sha256_fd(fd)
                if actual == sha256:
                    seal(fd)
                    return True
        except FileNotFoundError:
            return False
        except NotRegular as exc:
            self._clear(key, final, f"cached {final} is {exc.what}, not a regular file: treating it as "
                        "corrupt and fetching again (it is not followed)", progress)
            return False
        except OSError as exc:
            raise HarnessError(f"artifact {key!r}: cannot check or seal its cached copy {final} "
                               f"({os_reason(exc)}); remove it (it is inside the cache) and run "
                               f"`phd artifacts fetch {key}`") from None
        self._clear(key, final, f"cached {final} is corrupt (sha256 {actual[:12]}...): deleting it "
                    "and fetching again", progress)
        return False

    def _download(self, key: str, entry: ArtifactEntry, source: RemoteSource, final: Path,
                  progress: Progress) -> None:
        failures: list[str] = []
        mismatch: ArtifactHashMismatch | None = None
        with httpx.Client(transport=self._transport, timeout=self._timeout,
                          follow_redirects=True) as client:
            for url in source.urls:
                tmp: Path | None = None
                try:
                    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.",
                                                    suffix=".part")
                    tmp = Path(tmp_name)
                    with os.fdopen(fd, "wb") as out:
                        digest = _stream(client, url, out, key, progress)
                        if digest == source.sha256:
                            out.flush()
                            os.fchmod(out.fileno(), 0o444)
                    if digest != source.sha256:
                        mismatch = ArtifactHashMismatch(
                            key, url, source.sha256, digest,
                            fix="the mirror served a different file: fix the URL or the manifest's sha256")
                        failures.append(f"{url}: wrong sha256 {digest}")
                        continue
                    os.replace(tmp, final)  # replaces a name; never writes through a symlink
                    return
                except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
                    failures.append(f"{url}: {type(exc).__name__}: {one_line(str(exc))}")
                except OSError as exc:
                    raise HarnessError(f"artifact {key!r}: cannot write {final} ({os_reason(exc)}); free "
                                       f"some space or pass another {self._dir_option}") from None
                finally:
                    if tmp is not None:
                        tmp.unlink(missing_ok=True)
        if mismatch is not None:
            raise mismatch
        raise ArtifactUnavailable(f"artifact {key!r}", self._offline_how_to(key, entry, final, failures))

    def _offline_how_to(self, key: str, entry: ArtifactEntry, final: Path, failures: list[str]) -> str:
        assert entry.source.remote is not None
        sha = entry.source.remote.sha256
        return (
            f"it cannot be downloaded here ({'; '.join(failures)}). To provide it: download "
            f"{entry.source.remote.urls[0]} (sha256 {sha}) on a machine with internet access, "
            f"then either copy it to {final} (mkdir -p {final.parent} first), or set "
            f'[artifacts.{key}].source = {{ local_path = {{ path = "/path/to/{entry.file_name()}", '
            f'sha256 = "{sha}" }} }} in {self.manifest_path}; `phd artifacts fetch {key}` checks it')

    def _recipe_script(self, key: str, recipe: str) -> Path:
        """``<repo>/guests/<name>/build``, resolved; refused when it (or its folder) is a
        symlink out of ``guests/<name>``: only the repository's recipes run."""
        name = recipe.split("/", 1)[1]
        build = self.repo_root / "guests" / name / "build"
        field = f"artifacts.{key}.source.recipe"
        try:
            real = build.resolve(strict=True)
            folder = (self.repo_root / "guests").resolve(strict=True) / name
            st = os.stat(real)
        except (OSError, RuntimeError):
            raise HarnessError(f"{field}: {build} is missing or not executable") from None
        if not real.is_relative_to(folder):
            raise HarnessError(f"{field}: {build} resolves to {real}, outside guests/{name}; only "
                               f"a recipe's own build script runs (replace the symlink with the script)")
        if not stat.S_ISREG(st.st_mode) or not os.access(real, os.X_OK):
            raise HarnessError(f"{field}: {build} is missing or not executable")
        return real

    def _build_recipe(self, key: str, entry: ArtifactEntry, progress: Progress, *, force: bool) -> Path:
        out = self.recipe_out(key)
        assert out is not None and entry.source.recipe is not None
        build = self._recipe_script(key, entry.source.recipe)
        argv = [str(build), "--out", str(out)]
        for name, ref in sorted(entry.source.inputs.items()):
            try:
                argv += ["--input", f"{name}={self.ensure(ref, progress=progress)}"]
            except ArtifactUnavailable as exc:
                raise ArtifactUnavailable(f"artifact {key!r} (its input {name} = {ref!r})",
                                          exc.how_to) from exc
        if force:
            argv.append("--force")
        self._cache_folder(out.parent, key, progress)
        kind = kind_of(out, follow=False)
        if kind not in (None, "a folder"):
            self._clear(key, out, f"{out} is {kind}, not a recipe's output folder: replacing it", progress)
        # The recipe locks too, silently; this lock lets a waiting xdist worker say whom it
        # waits for (phd.core.progress), so a session shows one build and the others waiting.
        with build_lock(out.parent / f".{key}.phd-build.lock", key, f"build {key}", progress,
                        timeout_s=self._lock_timeout_s,
                        on_timeout=lambda why: HarnessError(f"artifact {key!r}: {why}; wait for it, "
                                                            "or remove the lock file if no build runs")):
            progress.begin(key, f"build {key}", None)
            try:
                code, lines = _run_recipe(argv, lambda text: progress.line(key, text))
            finally:
                progress.end(key)
        if code != 0:
            # One line: recipes end with one error line (guests/common/recipe.py); the CLI has shown
            # every line as it came.
            raise ArtifactUnavailable(
                f"artifact {key!r}",
                f"its recipe failed ({shlex.join(argv)} exited {code}): {_last_line(lines)}; run "
                "it by hand to see all of its output")
        if kind_of(out, follow=False) != "a folder" or _read_guest_json(out) is None:
            raise HarnessError(f"recipe {entry.source.recipe} exited 0 but {out}/guest.json is "
                               "missing or not JSON: the recipe breaks guests/README.md's interface")
        return out

    # --- verification -----------------------------------------------------------------------
    def verify(self, keys: Iterable[str] | None = None) -> list[CacheCheck]:
        """Re-hash cached files (ignoring the memo): manifest files, recipe outputs against
        their guest.json digests, and - when no keys are given - every other entry under
        ``<artifact_dir>/<sha256>/``, whose folder name is its expected digest. Nothing is
        followed: a symlink (or a folder, a FIFO) where a file belongs is reported bad."""
        selected = list(self.entries) if keys is None else list(keys)
        checks: list[CacheCheck] = []
        seen: set[Path] = set()
        for key in selected:
            entry = self.entry(key)
            cached, local, out = self.cache_path(key), self.local_path(key), self.recipe_out(key)
            if cached is not None:
                seen.add(cached)
                checks.append(_check_cached(key, cached, cached.parent.name,
                                            f"run `phd artifacts fetch {key}`, which replaces it"))
            elif local is not None:
                checks.append(_check_local_file(key, local, entry.sha256))
            elif out is not None:
                checks.extend(_check_recipe_out(key, out))
        if keys is None and kind_of(self.artifact_dir, follow=True) == "a folder":
            checks += self._stray_checks(seen)
        return checks

    def _stray_checks(self, seen: set[Path]) -> list[CacheCheck]:
        checks: list[CacheCheck] = []
        try:
            folders = sorted(self.artifact_dir.iterdir())
        except OSError:
            return checks
        for folder in folders:
            if not SHA256_HEX.match(folder.name):
                continue
            kind = kind_of(folder, follow=False)
            if kind != "a folder":
                checks.append(CacheCheck(None, folder, "bad", f"{kind}, not a folder of the cache",
                                         f"remove {folder} (a symlink: only the link)"))
                continue
            try:
                paths = sorted(folder.iterdir())
            except OSError:
                continue
            for path in paths:
                if not path.name.startswith(".") and path not in seen:
                    checks.append(_check_cached(None, path, folder.name,
                                                f"remove {path} (a cache entry no manifest key uses)"))
        return checks


_LOCAL_FIX = ("it does not match the manifest's sha256: fix the manifest's sha256, or point "
              "local_path at the right file (the store only reads a local_path)")


# --- helpers --------------------------------------------------------------------------------
def _stream(client: httpx.Client, url: str, out: BinaryIO, key: str, progress: Progress) -> str:
    digest = hashlib.sha256()
    with client.stream("GET", url) as response:
        response.raise_for_status()
        length = response.headers.get("content-length")
        progress.begin(key, f"fetch {key}", int(length) if length and length.isdigit() else None)
        try:
            for chunk in response.iter_bytes(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                progress.advance(key, len(chunk))
        finally:
            progress.end(key)
    return digest.hexdigest()


def _check_cached(key: str | None, path: Path, sha256: str, fix: str) -> CacheCheck:
    """A file inside the cache: never followed, whether it or its folder is a symlink."""
    folder = kind_of(path.parent, follow=False)
    if folder not in (None, "a folder"):
        return CacheCheck(key, path, "bad", f"its folder is {folder}, not a folder of the cache", fix)
    try:
        with open_regular(path, follow=False) as fd:
            actual = sha256_fd(fd)
    except (FileNotFoundError, NotADirectoryError):
        return CacheCheck(key, path, "missing")
    except NotRegular as exc:
        return CacheCheck(key, path, "bad", f"{exc.what}, not a regular file", fix)
    except OSError as exc:
        return CacheCheck(key, path, "bad", f"unreadable ({os_reason(exc)})", fix)
    if actual != sha256:
        return CacheCheck(key, path, "bad", f"sha256 {actual}, expected {sha256}", fix)
    return CacheCheck(key, path, "ok")


def _check_local_file(key: str, path: Path, sha256: str | None) -> CacheCheck:
    """A local_path: read only. Its fix is always the manifest, never deleting the file."""
    fix = "fix the manifest's sha256, or point local_path at the right file (the store only reads it)"
    try:
        with open_regular(path, follow=True) as fd:
            actual = None if sha256 is None else sha256_fd(fd)
    except (FileNotFoundError, NotADirectoryError):
        return CacheCheck(key, path, "missing")
    except NotRegular as exc:
        return CacheCheck(key, path, "bad", f"{exc.what}, not a regular file",
                          "point local_path at a regular file")
    except OSError as exc:
        return CacheCheck(key, path, "bad", f"unreadable ({os_reason(exc)})", "make it readable, or " + fix)
    if actual is None:
        return CacheCheck(key, path, "unchecked", "no sha256 in the manifest")
    if actual != sha256:
        return CacheCheck(key, path, "bad", f"does not match the manifest's sha256 (it has sha256 "
                          f"{actual}, the manifest expects {sha256})", fix)
    return CacheCheck(key, path, "ok")


def _check_recipe_out(key: str, out: Path) -> list[CacheCheck]:
    fix = f"run `phd artifacts build {key} --force`, which rebuilds it"
    kind = kind_of(out, follow=False)
    if kind not in (None, "a folder"):
        return [CacheCheck(key, out, "bad", f"{kind}, not a recipe's output folder", fix)]
    meta = None if kind is None else _read_guest_json(out)
    if meta is None:
        return [CacheCheck(key, out, "missing", "not built")]
    digests = meta.get("sha256")
    if not isinstance(digests, dict) or not digests:
        return [CacheCheck(key, out, "unchecked", "guest.json lists no sha256")]
    checks: list[CacheCheck] = []
    for name, sha in sorted(digests.items()):
        problem = name_problem(str(name))
        if problem is not None:
            checks.append(CacheCheck(key, out / "guest.json", "bad", f"it lists {short_repr(name)}, which "
                                     f"is not a plain file name ({problem})", fix))
        else:
            checks.append(_check_cached(key, out / str(name), str(sha), fix))
    return checks


def _read_guest_json(out: Path) -> dict[str, Any] | None:
    """``out/guest.json`` (not followed if a symlink, at most 1 MiB), or None."""
    try:
        with open_regular(out / "guest.json", follow=False) as fd:
            raw = read_at_most(fd, GUEST_JSON_MAX_BYTES + 1)
        meta = json.loads(raw) if len(raw) <= GUEST_JSON_MAX_BYTES else None
    except (OSError, NotRegular, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def _guest_from(name: str, guest_os: str, out: Path) -> GuestArtifact:
    meta = _read_guest_json(out)
    if meta is None:
        raise HarnessError(f"{out}/guest.json is missing or not JSON")
    files = meta.get("files")
    files = files if isinstance(files, dict) else {}
    rebuild = f"rebuild it with `phd artifacts build {name} --force`"

    def member(role: str, default: str) -> Path:
        file_name = str(files.get(role, default))
        problem = name_problem(file_name)
        if problem is not None:
            raise HarnessError(f"guest {name!r}: {out}/guest.json names its {role} {short_repr(file_name)}, "
                               f"not a plain file name ({problem}); {rebuild}")
        kind = kind_of(out / file_name, follow=False)
        if kind != "a regular file":
            raise HarnessError(f"guest {name!r}: its {role} {out / file_name} is {kind or 'missing'}, "
                               f"not a regular file; {rebuild}")
        return out / file_name

    cmdline_path = member("cmdline", "cmdline")
    try:
        with open_regular(cmdline_path, follow=False) as fd:
            cmdline = read_at_most(fd, CMDLINE_MAX_BYTES).decode(errors="replace").strip()
    except (OSError, NotRegular) as exc:
        raise HarnessError(f"guest {name!r}: {out} has no readable cmdline file ({exc}); {rebuild}") from None
    disk = files.get("disk")
    firmware_disk = files.get("firmware_disk")
    return GuestArtifact(
        name=name,
        kernel=member("kernel", "vmlinuz"),
        initrd=member("initrd", "initrd.img"),
        cmdline=cmdline,
        login_prompt=str(meta.get("login_prompt", "login: ")),
        shell_prompt=str(meta.get("shell_prompt", "# ")),
        disk=None if disk is None else member("disk", str(disk)),
        firmware_disk=None if firmware_disk is None else member("firmware_disk", str(firmware_disk)),
        guest_os=guest_os,
    )


def _last_line(lines: list[str]) -> str:
    last = next((line for line in reversed(lines) if line.strip()), "(no output)")
    return escape_unsafe(one_line(last), 500)


def _recipe_env(env: Mapping[str, str]) -> dict[str, str]:
    """The recipe's environment: this interpreter's folder first on PATH. A recipe's `build`
    runs `python3` (unless a checkout's .venv is beside it), and that must be the Python phd
    runs on, whose site-packages has the recipe's imports (guests, filelock), also when phd
    is installed in a virtualenv that was never activated."""
    bindir = os.path.dirname(sys.executable)
    path = env.get("PATH", os.defpath)
    return {**env, "PATH": f"{bindir}{os.pathsep}{path}" if bindir else path}


def _run_recipe(argv: list[str], on_line: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run a recipe, handing each output line to ``on_line``; (exit code, all lines).

    stdout and stderr are merged: recipes report progress on stderr and print their output
    folder on stdout, and one pipe read to its end cannot deadlock. A reader thread lets
    the wait carry a deadline, so a recipe stuck on a lock or a mirror cannot hang a run.
    """
    lines: list[str] = []
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,  # noqa: S603
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=_recipe_env(os.environ))
    except OSError as exc:
        raise HarnessError(f"cannot run {shlex.join(argv)}: {exc}") from exc

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            text = raw.rstrip("\n")
            lines.append(text)
            with contextlib.suppress(Exception):  # a broken progress display must not kill a build
                on_line(text)

    reader = threading.Thread(target=pump, name="phd-recipe-output", daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=RECIPE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        reader.join(timeout=10)
        raise HarnessError(f"{shlex.join(argv)} ran longer than {RECIPE_TIMEOUT_S:.0f} s; last "
                           f"output: {_last_line(lines)}") from None
    finally:
        if proc.poll() is None:  # KeyboardInterrupt while waiting: leave nothing behind
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()
    return code, lines
