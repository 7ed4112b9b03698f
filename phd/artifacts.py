"""Artifact store: resolve a manifest key to verified files on disk.

The manifest (``artifacts/artifacts.toml``) names every artifact a test may ask for::

    [artifacts.alpine-minirootfs]
    kind = "file"
    source = { remote = { urls = ["https://..."], sha256 = "d4e6..." } }

    [artifacts.alpine]
    kind = { guest_os = "alpine" }
    source = { recipe = "guests/alpine", inputs = { minirootfs = "alpine-minirootfs" } }

Each artifact has exactly one source:

- ``remote``: downloaded into ``<artifact_dir>/<sha256>/<filename>``, made read-only,
  verified once per process; a corrupt cached copy is deleted and fetched again.
- ``local_path``: a file the user already has (relative paths are read against the
  manifest's folder), checked against ``sha256`` when one is given, used in place.
- ``recipe``: built by ``<repo>/<recipe>/build --out <artifact_dir>/guests/<key>``; the
  recipe keeps its own cache keyed by a hash of its inputs. ``inputs`` names other
  artifacts, handed over as ``--input NAME=PATH`` once they are available.

Anything that cannot be had here (no network, a recipe that fails) raises
`ArtifactUnavailable`, whose message says how to provide it; the pytest plugin turns it
into a SKIP. A file whose content does not match its sha256 raises `ArtifactHashMismatch`
instead: that is a broken manifest or a tampered file, never something to skip quietly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import subprocess
import tempfile
import threading
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlsplit

import httpx
from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from phd.errors import ArtifactUnavailable, HarnessError

__all__ = [
    "ArtifactEntry",
    "ArtifactHashMismatch",
    "ArtifactStore",
    "CacheCheck",
    "GuestArtifact",
    "Kind",
    "Manifest",
    "ManifestError",
    "NullProgress",
    "Progress",
    "load_manifest",
]

CONNECT_TIMEOUT_S = 10.0  # an unreachable mirror must not hang a test session
READ_TIMEOUT_S = 60.0  # between two chunks of a download
LOCK_TIMEOUT_S = 1800.0  # another worker's download or build of the same artifact
RECIPE_TIMEOUT_S = 1800.0
_CHUNK = 1 << 16
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --- errors -------------------------------------------------------------------------------
class ManifestError(HarnessError):
    """The manifest cannot be read or breaks the schema; each problem names its TOML path."""

    def __init__(self, manifest: Path, problems: list[str]) -> None:
        super().__init__(f"artifact manifest {manifest} is invalid:\n  " + "\n  ".join(problems))
        self.manifest = manifest
        self.problems = problems


class ArtifactHashMismatch(HarnessError):
    """A file's sha256 is not the manifest's: a wrong manifest entry or a tampered file."""

    def __init__(self, key: str, path_or_url: str, expected: str, actual: str) -> None:
        super().__init__(f"artifact {key!r}: {path_or_url} has sha256 {actual}, the manifest "
                         f"expects {expected}; refusing it (fix the file or the manifest's sha256)")
        self.key = key
        self.expected = expected
        self.actual = actual


# --- manifest schema ------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """``kind = "file"`` (guest_os None) or ``kind = { guest_os = "<adapter name>" }``."""

    guest_os: str | None = None

    def __str__(self) -> str:
        return "file" if self.guest_os is None else f"guest_os={self.guest_os}"


# PydanticCustomError templates substitute `{name}` from their context and nothing else (no
# `!r`, no `{{`), so values are passed already repr()'d.
def _sha256_field(value: str) -> str:
    if not isinstance(value, str) or not _SHA256.match(value.lower()):
        raise PydanticCustomError("sha256", "must be 64 hex digits, got {value}", {"value": repr(value)})
    return value.lower()


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class RemoteSource(_Model):
    urls: list[str] = Field(min_length=1)
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _check_sha(cls, value: str) -> str:
        return _sha256_field(value)

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise PydanticCustomError("url", "{url} is not an http(s) URL", {"url": repr(url)})
        return urls


class LocalPathSource(_Model):
    path: str = Field(min_length=1)
    sha256: str | None = None

    @field_validator("sha256")
    @classmethod
    def _check_sha(cls, value: str | None) -> str | None:
        return None if value is None else _sha256_field(value)


class Source(_Model):
    remote: RemoteSource | None = None
    local_path: LocalPathSource | None = None
    recipe: str | None = None
    # recipe only: input name -> the key of another artifact, passed as --input NAME=PATH
    inputs: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [name for name in ("remote", "local_path", "recipe") if getattr(self, name) is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "source", "needs exactly one of remote, local_path, recipe; got {given}",
                {"given": ", ".join(given) or "none"})
        if self.inputs and self.recipe is None:
            raise PydanticCustomError("source", "inputs are only for a recipe source", {})
        if self.recipe is not None and (Path(self.recipe).is_absolute() or ".." in Path(self.recipe).parts):
            raise PydanticCustomError(
                "source", "recipe must be a folder inside the repository, like 'guests/tiny'; "
                "got {recipe}", {"recipe": repr(self.recipe)})
        return self

    def describe(self) -> str:
        if self.remote is not None:
            return f"remote {self.remote.urls[0]}"
        if self.local_path is not None:
            return f"local_path {self.local_path.path}"
        inputs = "".join(f" {name}={key}" for name, key in sorted(self.inputs.items()))
        return f"recipe {self.recipe}{inputs}"


class ArtifactEntry(_Model):
    kind: Kind
    source: Source
    # The cached file's name; default: the last segment of the first URL, or of local_path.
    filename: str | None = None

    @field_validator("kind", mode="before")
    @classmethod
    def _parse_kind(cls, value: object) -> Kind:
        if value == "file":
            return Kind()
        if isinstance(value, dict) and set(value) == {"guest_os"} and isinstance(value["guest_os"], str) \
                and _NAME.match(value["guest_os"]):
            return Kind(guest_os=value["guest_os"])
        raise PydanticCustomError(
            "kind", 'must be "file" or { guest_os = "<adapter name>" }, got {value}',
            {"value": repr(value)})

    @field_validator("filename")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (not _NAME.match(value) or "/" in value):
            raise PydanticCustomError("filename", "must be a plain file name, got {value}",
                                      {"value": repr(value)})
        return value

    def file_name(self) -> str:
        if self.filename is not None:
            return self.filename
        if self.source.remote is not None:
            return urlsplit(self.source.remote.urls[0]).path.rsplit("/", 1)[-1] or "download"
        if self.source.local_path is not None:
            return Path(self.source.local_path.path).name
        return Path(str(self.source.recipe)).name

    @property
    def sha256(self) -> str | None:
        if self.source.remote is not None:
            return self.source.remote.sha256
        if self.source.local_path is not None:
            return self.source.local_path.sha256
        return None


class Manifest(_Model):
    artifacts: dict[str, ArtifactEntry]


def _problem(loc: Iterable[int | str], message: str) -> str:
    path = ".".join(str(part) for part in loc)
    return f"{path}: {message}" if path else message


def _cross_checks(manifest: Manifest) -> list[str]:
    """What one entry cannot check alone: keys, input references, guest sources, cycles."""
    problems: list[str] = []
    entries = manifest.artifacts
    for key, entry in entries.items():
        where = ("artifacts", key)
        if not _NAME.match(key):
            problems.append(_problem(where, "artifact keys are letters, digits, '-', '_' and '.'"))
        if entry.kind.guest_os is not None and entry.source.recipe is None:
            problems.append(_problem((*where, "source"), "a guest_os artifact is built by a recipe "
                                     "(it needs kernel, initrd, cmdline and guest.json)"))
        for name, ref in entry.source.inputs.items():
            if not _NAME.match(name):
                problems.append(_problem((*where, "source", "inputs", name),
                                         "input names are letters, digits, '-', '_' and '.'"))
            if ref not in entries:
                problems.append(_problem((*where, "source", "inputs", name),
                                         f"no artifact {ref!r} in the manifest"))
    for key in entries:
        cycle = _input_cycle(entries, key, ())
        if cycle and cycle[0] == key:
            problems.append(_problem(("artifacts", key, "source", "inputs"),
                                     "inputs form a cycle: " + " -> ".join((*cycle, key))))
    return problems


def _input_cycle(entries: Mapping[str, ArtifactEntry], key: str, chain: tuple[str, ...]) -> tuple[str, ...]:
    if key in chain:
        return chain[chain.index(key):]
    entry = entries.get(key)
    if entry is None:
        return ()
    for ref in entry.source.inputs.values():
        found = _input_cycle(entries, ref, (*chain, key))
        if found:
            return found
    return ()


def load_manifest(path: Path) -> Manifest:
    """Parse and validate; every problem is reported at once, each with its TOML path."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(path, ["file not found; pass --phd-manifest (or PHD_MANIFEST)"]) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ManifestError(path, [f"not readable TOML: {exc}"]) from None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(err["loc"], str(err["msg"]).removeprefix("Value error, "))
                    for err in exc.errors()]
        raise ManifestError(path, problems) from None
    problems = _cross_checks(manifest)
    if problems:
        raise ManifestError(path, problems)
    return manifest


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


def _sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --- the store ------------------------------------------------------------------------------
class ArtifactStore:
    """Resolves manifest keys to files; one instance per process (each xdist worker).

    Thread-safe within a process (one re-entrant lock: a recipe resolves its inputs
    through the same store); across processes, fetches hold a file lock next to the cached
    file and recipes hold their own, so nothing is downloaded or built twice.
    """

    def __init__(self, manifest: Path, artifact_dir: Path, repo_root: Path, *,
                 transport: httpx.BaseTransport | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.manifest_path = manifest
        self.artifact_dir = artifact_dir
        self.repo_root = repo_root
        self.manifest = load_manifest(manifest)
        self._transport = transport  # a seam for unit tests (httpx.MockTransport)
        self._timeout = httpx.Timeout(READ_TIMEOUT_S, connect=connect_timeout_s)
        self._lock_timeout_s = lock_timeout_s
        self._lock = threading.RLock()
        # key -> ready path: each artifact is verified (or its recipe asked) once per process.
        self._ready: dict[str, Path] = {}
        self._guests: dict[str, GuestArtifact] = {}

    # --- lookup ---------------------------------------------------------------------------
    @property
    def entries(self) -> Mapping[str, ArtifactEntry]:
        return self.manifest.artifacts

    def entry(self, key: str) -> ArtifactEntry:
        try:
            return self.entries[key]
        except KeyError:
            raise HarnessError(f"artifact {key!r} is not in {self.manifest_path}; "
                               f"known: {sorted(self.entries)}") from None

    def cache_path(self, key: str) -> Path | None:
        """Where a remote artifact lives once fetched: ``<artifact_dir>/<sha256>/<filename>``."""
        entry = self.entry(key)
        if entry.source.remote is None:
            return None
        return self.artifact_dir / entry.source.remote.sha256 / entry.file_name()

    def local_path(self, key: str) -> Path | None:
        entry = self.entry(key)
        if entry.source.local_path is None:
            return None
        path = Path(entry.source.local_path.path).expanduser()
        return path if path.is_absolute() else self.manifest_path.parent / path

    def recipe_out(self, key: str) -> Path | None:
        """A recipe's output directory (where it has always been: ``<artifact_dir>/guests/<key>``)."""
        return None if self.entry(key).source.recipe is None else self.artifact_dir / "guests" / key

    def status(self, key: str) -> str:
        """One cheap line for `phd artifacts list` (no hashing: that is `verify`)."""
        cached, local, out = self.cache_path(key), self.local_path(key), self.recipe_out(key)
        if cached is not None:
            return f"cached {cached}" if cached.is_file() else "not fetched"
        if local is not None:
            return f"present {local}" if local.is_file() else f"missing {local}"
        assert out is not None
        meta = _read_guest_json(out)
        if meta is None:
            return "not built"
        return f"built {out} (inputs {str(meta.get('input_hash', '?'))[:12]})"

    # --- resolving ------------------------------------------------------------------------
    def guest(self, name: str) -> GuestArtifact:
        """The guest built by the recipe of manifest entry ``name`` (built or reused once)."""
        with self._lock:
            if name not in self._guests:
                if name not in self.entries:
                    raise HarnessError(f"guest {name!r} is not in {self.manifest_path}; "
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
        sink = progress or NullProgress()
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
        path = self.local_path(key)
        assert path is not None
        if not path.is_file():
            raise ArtifactUnavailable(
                f"artifact {key!r}",
                f"its local_path {path} does not exist; put the file there, or change "
                f"[artifacts.{key}].source in {self.manifest_path}")
        if source.sha256 is not None:
            actual = _sha256_file(path)
            if actual != source.sha256:
                raise ArtifactHashMismatch(key, str(path), source.sha256, actual)
        return path

    def _fetch_remote(self, key: str, entry: ArtifactEntry, source: RemoteSource,
                      progress: Progress) -> Path:
        final = self.cache_path(key)
        assert final is not None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HarnessError(f"cannot create the artifact cache {final.parent} ({exc}); "
                               "pass a writable --phd-artifact-dir (or PHD_ARTIFACT_DIR)") from exc
        lock = FileLock(str(final.parent / f".{final.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            progress.line(key, f"waiting for {lock.lock_file}: another process is fetching {key}")
            try:
                lock.acquire(timeout=self._lock_timeout_s)
            except Timeout as exc:
                raise HarnessError(
                    f"another process has held {lock.lock_file} for {self._lock_timeout_s:.0f} s "
                    f"while fetching {key!r}: wait for it, or remove the lock file if none is "
                    "running") from exc
        try:
            # Checked under the lock: a copy another worker is still writing is never seen
            # (it writes a temporary file and renames it), and only one worker deletes.
            if final.exists():
                actual = _sha256_file(final)
                if actual == source.sha256:
                    _make_read_only(final)
                    return final
                progress.line(key, f"cached {final} is corrupt (sha256 {actual[:12]}...): "
                                   "deleting it and fetching again")
                final.unlink()
            for stale in final.parent.glob(f".{final.name}.*.part"):
                stale.unlink(missing_ok=True)  # left by a killed fetch; we hold the lock
            self._download(key, entry, source, final, progress)
            return final
        finally:
            lock.release()

    def _download(self, key: str, entry: ArtifactEntry, source: RemoteSource, final: Path,
                  progress: Progress) -> None:
        failures: list[str] = []
        mismatch: ArtifactHashMismatch | None = None
        with httpx.Client(transport=self._transport, timeout=self._timeout,
                          follow_redirects=True) as client:
            for url in source.urls:
                fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.",
                                                suffix=".part")
                tmp = Path(tmp_name)
                try:
                    with os.fdopen(fd, "wb") as out:
                        digest = _stream(client, url, out, key, progress)
                    if digest != source.sha256:
                        mismatch = ArtifactHashMismatch(key, url, source.sha256, digest)
                        failures.append(f"{url}: wrong sha256 {digest}")
                        continue
                    _make_read_only(tmp)
                    os.replace(tmp, final)
                    return
                except httpx.HTTPError as exc:
                    failures.append(f"{url}: {type(exc).__name__}: {exc}")
                finally:
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

    def _build_recipe(self, key: str, entry: ArtifactEntry, progress: Progress, *, force: bool) -> Path:
        out = self.recipe_out(key)
        assert out is not None and entry.source.recipe is not None
        build = self.repo_root / entry.source.recipe / "build"
        if not os.access(build, os.X_OK):
            raise HarnessError(f"artifacts.{key}.source.recipe: {build} is missing or not executable")
        argv = [str(build), "--out", str(out)]
        for name, ref in sorted(entry.source.inputs.items()):
            try:
                argv += ["--input", f"{name}={self.ensure(ref, progress=progress)}"]
            except ArtifactUnavailable as exc:
                raise ArtifactUnavailable(f"artifact {key!r} (its input {name} = {ref!r})",
                                          exc.how_to) from exc
        if force:
            argv.append("--force")
        out.parent.mkdir(parents=True, exist_ok=True)
        progress.begin(key, f"build {key}", None)
        try:
            code, lines = _run_recipe(argv, lambda text: progress.line(key, text))
        finally:
            progress.end(key)
        if code != 0:
            tail = "\n".join(lines[-25:])[-1500:]
            raise ArtifactUnavailable(
                f"artifact {key!r}",
                f"its recipe failed ({shlex.join(argv)} exited {code}); run it by hand "
                f"to see why; last output:\n{tail}")
        if _read_guest_json(out) is None:
            raise HarnessError(f"recipe {entry.source.recipe} exited 0 but {out}/guest.json is "
                               "missing or not JSON: the recipe breaks guests/README.md's interface")
        return out

    # --- verification -----------------------------------------------------------------------
    def verify(self, keys: Iterable[str] | None = None) -> list[CacheCheck]:
        """Re-hash cached files (ignoring the memo): manifest files, recipe outputs against
        their guest.json digests, and - when no keys are given - every other entry under
        ``<artifact_dir>/<sha256>/``, whose folder name is its expected digest."""
        selected = list(self.entries) if keys is None else list(keys)
        checks: list[CacheCheck] = []
        seen: set[Path] = set()
        for key in selected:
            entry = self.entry(key)
            cached, local, out = self.cache_path(key), self.local_path(key), self.recipe_out(key)
            if cached is not None:
                seen.add(cached)
                checks.append(_check_file(key, cached, entry.sha256))
            elif local is not None:
                checks.append(_check_file(key, local, entry.sha256))
            elif out is not None:
                checks.extend(_check_recipe_out(key, out))
        if keys is None and self.artifact_dir.is_dir():
            for folder in sorted(self.artifact_dir.iterdir()):
                if not (folder.is_dir() and _SHA256.match(folder.name)):
                    continue
                for path in sorted(folder.iterdir()):
                    if path.is_file() and not path.name.startswith(".") and path not in seen:
                        checks.append(_check_file(None, path, folder.name))
        return checks


# --- helpers --------------------------------------------------------------------------------
def _stream(client: httpx.Client, url: str, out: BinaryIO, key: str, progress: Progress) -> str:
    digest = hashlib.sha256()
    with client.stream("GET", url) as response:
        response.raise_for_status()
        length = response.headers.get("content-length")
        progress.begin(key, f"fetch {key}", int(length) if length and length.isdigit() else None)
        try:
            for chunk in response.iter_bytes(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                progress.advance(key, len(chunk))
        finally:
            progress.end(key)
    return digest.hexdigest()


def _make_read_only(path: Path) -> None:
    # Tests and recipes read cached files and must never change them in place.
    os.chmod(path, 0o444)


def _check_file(key: str | None, path: Path, sha256: str | None) -> CacheCheck:
    if not path.is_file():
        return CacheCheck(key, path, "missing")
    if sha256 is None:
        return CacheCheck(key, path, "unchecked", "no sha256 in the manifest")
    actual = _sha256_file(path)
    if actual != sha256:
        return CacheCheck(key, path, "bad", f"sha256 {actual}, expected {sha256}")
    return CacheCheck(key, path, "ok")


def _check_recipe_out(key: str, out: Path) -> list[CacheCheck]:
    meta = _read_guest_json(out)
    if meta is None:
        return [CacheCheck(key, out, "missing", "not built")]
    digests = meta.get("sha256")
    if not isinstance(digests, dict) or not digests:
        return [CacheCheck(key, out, "unchecked", "guest.json lists no sha256")]
    return [_check_file(key, out / str(name), str(sha)) for name, sha in sorted(digests.items())]


def _read_guest_json(out: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((out / "guest.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _guest_from(name: str, guest_os: str, out: Path) -> GuestArtifact:
    meta = _read_guest_json(out)
    if meta is None:
        raise HarnessError(f"{out}/guest.json is missing or not JSON")
    files = meta.get("files") or {}
    disk_name = files.get("disk")
    try:
        cmdline = (out / str(files.get("cmdline", "cmdline"))).read_text().strip()
    except OSError as exc:
        raise HarnessError(f"guest {name!r}: {out} has no cmdline file ({exc})") from exc
    return GuestArtifact(
        name=name,
        kernel=out / str(files.get("kernel", "vmlinuz")),
        initrd=out / str(files.get("initrd", "initrd.img")),
        cmdline=cmdline,
        login_prompt=str(meta.get("login_prompt", "login: ")),
        shell_prompt=str(meta.get("shell_prompt", "# ")),
        disk=None if disk_name is None else out / str(disk_name),
        guest_os=guest_os,
    )


def _run_recipe(argv: list[str], on_line: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run a recipe, handing each output line to ``on_line``; (exit code, all lines).

    stdout and stderr are merged: recipes report progress on stderr and print their output
    folder on stdout, and one pipe read to its end cannot deadlock. A reader thread lets
    the wait carry a deadline, so a recipe stuck on a lock or a mirror cannot hang a run.
    """
    lines: list[str] = []
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,  # noqa: S603
                                stderr=subprocess.STDOUT, text=True, errors="replace")
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
                           f"output:\n" + "\n".join(lines[-25:])) from None
    finally:
        if proc.poll() is None:  # KeyboardInterrupt while waiting: leave nothing behind
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()
    return code, lines
