"""The artifact manifest: its schema, the path policy for the names it holds, its loader.

The manifest (``artifacts/artifacts.toml``) names every artifact a test may ask for::

    [artifacts.alpine-minirootfs]
    kind = "file"
    source = { remote = { urls = ["https://..."], sha256 = "d4e6..." } }

    [artifacts.alpine]
    kind = { guest_os = "alpine" }
    source = { recipe = "guests/alpine", inputs = { minirootfs = "alpine-minirootfs" } }

Each artifact has exactly one source, ``remote``, ``local_path`` or ``recipe`` (what the store
does with each: ``phd.artifacts.store``). The manifest is untrusted input: every file name
taken from it must pass the path policy below (``name_problem``), and a manifest that breaks
the schema raises `ManifestError`, naming each problem by its TOML path.
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import unquote, urlsplit

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from phd.artifacts.files import NotRegular, one_line, open_regular, read_at_most
from phd.core.errors import HarnessError

__all__ = [
    "ArtifactEntry",
    "Kind",
    "LocalPathSource",
    "Manifest",
    "ManifestError",
    "RemoteSource",
    "Source",
    "escape_unsafe",
    "load_manifest",
    "name_problem",
    "short_repr",
    "url_file_name",
]

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Bounds on untrusted input: a manifest larger or deeper than this is not one.
MANIFEST_MAX_BYTES = 1 << 20
NAME_MAX_BYTES = 200  # NAME_MAX is 255; the store adds `.<name>.lock` and `.<name>.<random>.part`
PATH_MAX_CHARS = 4096
URL_MAX_CHARS = 2048
MAX_URLS = 16
MAX_INPUTS = 32
KEY_MAX_CHARS = 64
PROBLEMS_SHOWN = 20
_RECIPE = re.compile(r"^guests/([A-Za-z0-9][A-Za-z0-9_.-]*)$")
# Control characters, format characters (bidi overrides, zero-width), surrogates and line or
# paragraph separators: none belongs in a file name, and each can forge terminal output.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


# --- path policy ----------------------------------------------------------------------------
def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: safe to print (repr escapes control
    characters) and short, whatever the manifest holds."""
    try:
        text = repr(value)
    except RecursionError:
        return "<a deeply nested value>"
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def escape_unsafe(text: str, limit: int) -> str:
    """``text`` with control and format characters escaped, cut to ``limit`` characters."""
    out = "".join(repr(ch)[1:-1] if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch
                  for ch in text)
    return out if len(out) <= limit else out[:limit - 1] + "\u2026"


def _unsafe_char(text: str) -> str | None:
    for char in text:
        if unicodedata.category(char) in _UNSAFE_CATEGORIES:
            return char
    return None


def name_problem(name: str, *, hidden_ok: bool = False) -> str | None:
    """Why ``name`` is not a plain file name the store may create or look up, else None.

    The one rule for every file name that comes from the manifest (a URL's last segment,
    ``filename``, the last part of a ``local_path``) and from a recipe's guest.json.
    ``hidden_ok``: a name outside the cache (a local_path's) may start with '.'."""
    if name in ("", ".", ".."):
        return "it is empty" if name == "" else f"{name!r} names a folder"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    char = _unsafe_char(name)
    if char is not None:
        return f"it contains the control character {char!r}"
    if name.startswith(".") and not hidden_ok:
        return "it starts with '.' (hidden names are the store's own lock and partial files)"
    if len(name.encode()) > NAME_MAX_BYTES:
        return f"it is longer than {NAME_MAX_BYTES} bytes"
    return None


def url_file_name(url: str) -> str:
    """The file name a URL's last path segment stands for (percent-decoded)."""
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1], errors="replace")


# --- errors -------------------------------------------------------------------------------
class ManifestError(HarnessError):
    """The manifest cannot be read or breaks the schema; each problem names its TOML path.

    One problem makes one line; several make one line each (the first ``PROBLEMS_SHOWN``,
    then how many more), so a hostile manifest cannot flood a terminal."""

    def __init__(self, manifest: Path, problems: list[str]) -> None:
        if len(problems) == 1:
            text = f"artifact manifest {manifest} is invalid: {problems[0]}"
        else:
            shown = problems[:PROBLEMS_SHOWN]
            more = len(problems) - len(shown)
            text = (f"artifact manifest {manifest} is invalid ({len(problems)} problems):\n  "
                    + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else ""))
        super().__init__(text)
        self.manifest = manifest
        self.problems = problems


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
    if not isinstance(value, str) or not SHA256_HEX.match(value.lower()):
        raise PydanticCustomError("sha256", "must be 64 hex digits, got {value}",
                                  {"value": short_repr(value)})
    return value.lower()


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


_Url = Annotated[str, StringConstraints(max_length=URL_MAX_CHARS)]


class RemoteSource(_Model):
    urls: list[_Url] = Field(min_length=1, max_length=MAX_URLS)
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _check_sha(cls, value: str) -> str:
        return _sha256_field(value)

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            # Parsed here as the downloader will parse it, so a URL that cannot be fetched
            # is a manifest error naming the field, not a crash in the middle of a fetch.
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 - raises ValueError when out of range
                httpx.URL(url)
            except (ValueError, httpx.InvalidURL) as exc:
                raise PydanticCustomError(
                    "url", "{url} is not a valid URL ({why})",
                    {"url": short_repr(url), "why": escape_unsafe(str(exc), 80)}) from None
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise PydanticCustomError("url", "{url} is not an http(s) URL", {"url": short_repr(url)})
        return urls


class LocalPathSource(_Model):
    path: str = Field(min_length=1, max_length=PATH_MAX_CHARS)
    sha256: str | None = None

    @field_validator("sha256")
    @classmethod
    def _check_sha(cls, value: str | None) -> str | None:
        return None if value is None else _sha256_field(value)

    @field_validator("path")
    @classmethod
    def _names_a_file(cls, value: str) -> str:
        char = _unsafe_char(value)
        if char is not None:
            raise PydanticCustomError("path", "{path} contains the control character {char}",
                                      {"path": short_repr(value), "char": repr(char)})
        parts = value.split("/")
        if any(len(part.encode()) > 255 for part in parts):
            raise PydanticCustomError("path", "{path} has a part longer than 255 bytes",
                                      {"path": short_repr(value)})
        problem = name_problem(parts[-1], hidden_ok=True)
        if problem is not None:
            raise PydanticCustomError(
                "path", "{path} does not end in a plain file name ({problem}); point it at the "
                "file itself", {"path": short_repr(value), "problem": problem})
        return value


class Source(_Model):
    remote: RemoteSource | None = None
    local_path: LocalPathSource | None = None
    recipe: str | None = None
    # recipe only: input name -> the key of another artifact, passed as --input NAME=PATH
    inputs: dict[str, str] = Field(default_factory=dict, max_length=MAX_INPUTS)

    @field_validator("recipe")
    @classmethod
    def _in_guests(cls, value: str | None) -> str | None:
        match = None if value is None else _RECIPE.match(value)
        if value is not None and (match is None or len(match.group(1)) > KEY_MAX_CHARS):
            raise PydanticCustomError(
                "recipe", "must be guests/<name>, a folder of guests/ with a build script "
                "(like 'guests/tiny'); got {recipe}", {"recipe": short_repr(value)})
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [name for name in ("remote", "local_path", "recipe") if getattr(self, name) is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "source", "needs exactly one of remote, local_path, recipe; got {given}",
                {"given": ", ".join(given) or "none"})
        if self.inputs and self.recipe is None:
            raise PydanticCustomError("source", "inputs are only for a recipe source", {})
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
            {"value": short_repr(value)})

    @field_validator("filename")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        problem = None if value is None else name_problem(value)
        if problem is not None:
            raise PydanticCustomError("filename", "{value} is not a plain file name: {problem}",
                                      {"value": short_repr(value), "problem": problem})
        return value

    def file_name(self) -> str:
        """The cached (or local) file's name; `load_manifest` has checked it is plain."""
        if self.filename is not None:
            return self.filename
        if self.source.remote is not None:
            return url_file_name(self.source.remote.urls[0])
        if self.source.local_path is not None:
            return self.source.local_path.path.rsplit("/", 1)[-1]
        return str(self.source.recipe).rsplit("/", 1)[-1]

    @property
    def sha256(self) -> str | None:
        if self.source.remote is not None:
            return self.source.remote.sha256
        if self.source.local_path is not None:
            return self.source.local_path.sha256
        return None


class Manifest(_Model):
    artifacts: dict[str, ArtifactEntry]


def _loc_part(part: int | str) -> str:
    text = str(part)
    return text if isinstance(part, int) or (_NAME.match(text) and len(text) <= KEY_MAX_CHARS) \
        else short_repr(text, 40)


def _problem(loc: Iterable[int | str], message: str) -> str:
    """``field.path: message`` on one line; a hostile key is shown quoted and cut short."""
    path = ".".join(_loc_part(part) for part in loc)
    text = f"{path}: {message}" if path else message
    return " ".join(text.split("\n"))


def _key_problems(data: object) -> list[str]:
    """Keys become folder names (``<artifact dir>/guests/<key>``): checked before the schema,
    so a bad key is reported alongside the schema's problems."""
    artifacts = data.get("artifacts") if isinstance(data, dict) else None
    if not isinstance(artifacts, dict):
        return []
    return [_problem(("artifacts", key), f"artifact keys are letters, digits, '-', '_' and '.', "
                     f"at most {KEY_MAX_CHARS} characters, starting with a letter or digit")
            for key in artifacts if not (_NAME.match(key) and len(key) <= KEY_MAX_CHARS)]


def _default_name_problems(key: str, entry: ArtifactEntry) -> list[str]:
    """A remote file without ``filename`` is cached under its URL's last segment: that
    segment must pass the path policy too."""
    if entry.filename is not None or entry.source.remote is None:
        return []
    url = entry.source.remote.urls[0]
    problem = name_problem(url_file_name(url))
    if problem is None:
        return []
    return [_problem(("artifacts", key, "source", "remote", "urls", 0),
                     f"the last segment of {short_repr(url)} is not a plain file name ({problem}); "
                     f'name the cached file with filename = "<name>" in [artifacts.{_loc_part(key)}]')]


def _valid_entries_name_problems(data: object) -> list[str]:
    """When the manifest as a whole breaks the schema, the entries that are valid on their
    own still have their default file names checked, so every problem shows at once."""
    artifacts = data.get("artifacts") if isinstance(data, dict) else None
    problems: list[str] = []
    for key, raw in (artifacts.items() if isinstance(artifacts, dict) else ()):
        try:
            entry = ArtifactEntry.model_validate(raw)
        except (ValidationError, RecursionError):
            continue
        problems += _default_name_problems(str(key), entry)
    return problems


def _cross_checks(manifest: Manifest) -> list[str]:
    """What one field cannot check alone: default file names, input references, guest
    sources, cycles."""
    problems: list[str] = []
    entries = manifest.artifacts
    for key, entry in entries.items():
        where = ("artifacts", key)
        problems += _default_name_problems(key, entry)
        if entry.kind.guest_os is not None and entry.source.recipe is None:
            problems.append(_problem((*where, "source"), "a guest_os artifact is built by a recipe "
                                     "(it needs kernel, initrd, cmdline and guest.json)"))
        for name, ref in entry.source.inputs.items():
            if not _NAME.match(name):
                problems.append(_problem((*where, "source", "inputs", name),
                                         "input names are letters, digits, '-', '_' and '.'"))
            if ref not in entries:
                problems.append(_problem((*where, "source", "inputs", name),
                                         f"no artifact {short_repr(ref)} in the manifest"))
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


def _read_manifest_text(path: Path, option: str) -> str:
    how = f"pass {option} (or PHD_MANIFEST)"
    try:
        with open_regular(path, follow=True) as fd:
            raw = read_at_most(fd, MANIFEST_MAX_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError(path, [f"file not found; {how}"]) from None
    except NotRegular as exc:
        raise ManifestError(path, [f"it is {exc.what}, not a file; {how}"]) from None
    except OSError as exc:
        raise ManifestError(path, [f"cannot be read ({exc.strerror}); {how}"]) from None
    if len(raw) > MANIFEST_MAX_BYTES:
        raise ManifestError(path, [f"it is larger than {MANIFEST_MAX_BYTES >> 20} MiB: not an "
                                   f"artifact manifest; {how}"])
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise ManifestError(path, [f"not UTF-8 text (byte {exc.start})"]) from None


def load_manifest(path: Path, *, option: str = "--phd-manifest") -> Manifest:
    """Parse and validate; every problem is reported at once, each with its TOML path.

    ``option`` is how the tool the user ran takes a manifest (the pytest plugin's
    ``--phd-manifest``, the CLI's ``--manifest``): a missing file's message names it."""
    text = _read_manifest_text(path, option)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(path, [f"not readable TOML: {one_line(str(exc))}"]) from None
    except RecursionError:
        raise ManifestError(path, ["not readable TOML: nested too deeply to be an artifact "
                                   "manifest"]) from None
    problems = _key_problems(data)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        problems += [_problem(err["loc"], str(err["msg"]).removeprefix("Value error, "))
                     for err in exc.errors()]
        raise ManifestError(path, problems + _valid_entries_name_problems(data)) from None
    except RecursionError:
        raise ManifestError(path, [*problems, "nested too deeply to be an artifact manifest"]) from None
    problems += _cross_checks(manifest)
    if problems:
        raise ManifestError(path, problems)
    return manifest
