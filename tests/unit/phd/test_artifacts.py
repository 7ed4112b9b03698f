"""The artifact store: manifest schema, remote/local_path/recipe sources, the cache.

Downloads go through httpx.MockTransport (the store's seam) except where the real network
path matters: an unreachable mirror (a loopback port that refuses) and one real download
from a loopback HTTP server.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from phd.artifacts.manifest import ManifestError, load_manifest
from phd.artifacts.store import ArtifactHashMismatch, ArtifactStore, NullProgress
from phd.core.errors import ArtifactUnavailable, HarnessError
from tests.unit.phd.http_files import serve_files

REPO = Path(__file__).resolve().parents[3]
PAYLOAD = b"alpine minirootfs stand-in\n" * 1000
SHA = hashlib.sha256(PAYLOAD).hexdigest()
URL = "https://mirror.invalid/alpine/alpine-minirootfs-3.20.3-x86_64.tar.gz"
FILENAME = "alpine-minirootfs-3.20.3-x86_64.tar.gz"


def write_manifest(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "artifacts.toml"
    path.write_text(textwrap.dedent(body))
    return path


def remote_manifest(tmp_path: Path, *urls: str, sha: str = SHA) -> Path:
    listed = ", ".join(f'"{u}"' for u in urls or (URL,))
    return write_manifest(tmp_path, f"""
        [artifacts.rootfs]
        kind = "file"
        source = {{ remote = {{ urls = [{listed}], sha256 = "{sha}" }} }}
        """)


class Mirror:
    """A MockTransport handler: serves `routes` (url -> bytes or status), counts requests."""

    def __init__(self, routes: dict[str, bytes | int] | None = None,
                 gate: threading.Event | None = None) -> None:
        self.routes = routes if routes is not None else {URL: PAYLOAD}
        self.requests: list[str] = []
        self.entered = threading.Event()
        self.gate = gate

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        answer = self.routes.get(str(request.url), 404)
        if isinstance(answer, int):
            return httpx.Response(answer)
        return httpx.Response(200, content=answer, headers={"content-length": str(len(answer))})

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def store_for(manifest: Path, cache: Path, mirror: Mirror | None = None, **kw: float) -> ArtifactStore:
    transport = (mirror or Mirror()).transport()
    return ArtifactStore(manifest, cache, REPO, transport=transport, **kw)


# --- manifest validation ----------------------------------------------------------------------
def problems_of(tmp_path: Path, body: str) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load_manifest(write_manifest(tmp_path, body))
    assert str(tmp_path / "artifacts.toml") in str(caught.value)
    return caught.value.problems


def test_the_repository_manifest_is_valid_and_pins_the_alpine_tarball() -> None:
    manifest = load_manifest(REPO / "artifacts" / "artifacts.toml")
    rootfs = manifest.artifacts["alpine-minirootfs"]
    assert rootfs.source.remote is not None
    assert rootfs.source.remote.urls == [
        "https://dl-cdn.alpinelinux.org/alpine/v3.20/releases/x86_64/alpine-minirootfs-3.20.3-x86_64.tar.gz"]
    assert rootfs.sha256 == "d4e6fd67dcf75e40c451560ac7265166c2b72a0f38ddc9aae756a7de3d1efa0c"
    assert rootfs.file_name() == FILENAME
    alpine = manifest.artifacts["alpine"]
    assert alpine.kind.guest_os == "alpine"
    assert alpine.source.recipe == "guests/alpine"
    assert alpine.source.inputs == {"minirootfs": "alpine-minirootfs"}
    assert manifest.artifacts["tiny"].source.recipe == "guests/tiny"


@pytest.mark.parametrize(("body", "expected"), [
    pytest.param('[artifacts.a]\nkind = "file"\n'
                 'source = { remote = { urls = ["https://x/a"], sha256 = "abc" } }',
                 "artifacts.a.source.remote.sha256: must be 64 hex digits, got 'abc'", id="short-sha"),
    pytest.param('[artifacts.a]\nkind = "file"\ncolour = "red"\nsource = { local_path = { path = "x" } }',
                 "artifacts.a.colour: Extra inputs are not permitted", id="unknown-field"),
    pytest.param('[artifacts.a]\nkind = "file"\nsource = { local_path = { path = "x", md5 = "y" } }',
                 "artifacts.a.source.local_path.md5: Extra inputs are not permitted", id="unknown-nested"),
    pytest.param(f'[artifacts.a]\nkind = "file"\nsource = {{ recipe = "guests/a", '
                 f'remote = {{ urls = ["https://x/a"], sha256 = "{SHA}" }} }}',
                 "artifacts.a.source: needs exactly one of remote, local_path, recipe; got remote, recipe",
                 id="two-sources"),
    pytest.param('[artifacts.a]\nkind = "file"\nsource = {}',
                 "artifacts.a.source: needs exactly one of remote, local_path, recipe; got none",
                 id="no-source"),
    pytest.param('[artifacts.a]\nkind = "disk"\nsource = { recipe = "guests/a" }',
                 "artifacts.a.kind: must be \"file\" or { guest_os = \"<adapter name>\" }, got 'disk'",
                 id="bad-kind"),
    pytest.param('[artifacts.a]\nsource = { recipe = "guests/a" }',
                 "artifacts.a.kind: Field required", id="missing-kind"),
    pytest.param('[artifacts.a]\nkind = "file"\nsource = { remote = { urls = ["ftp://x/a"], '
                 f'sha256 = "{SHA}" }} }}',
                 "artifacts.a.source.remote.urls: 'ftp://x/a' is not an http(s) URL", id="ftp-url"),
    pytest.param('[artifacts.a]\nkind = "file"\nsource = { remote = { urls = [], '
                 f'sha256 = "{SHA}" }} }}',
                 "artifacts.a.source.remote.urls: List should have at least 1 item", id="no-urls"),
    pytest.param('[artifacts.a]\nkind = { guest_os = "a" }\nsource = { recipe = "guests/a", '
                 'inputs = { rootfs = "nope" } }',
                 "artifacts.a.source.inputs.rootfs: no artifact 'nope' in the manifest", id="dangling-input"),
    pytest.param('[artifacts.a]\nkind = { guest_os = "a" }\nsource = { local_path = { path = "a.img" } }',
                 "artifacts.a.source: a guest_os artifact is built by a recipe", id="guest-not-recipe"),
    pytest.param('[artifacts.a]\nkind = "file"\n'
                 'source = { local_path = { path = "x" }, inputs = { b = "a" } }',
                 "artifacts.a.source: inputs are only for a recipe source", id="inputs-without-recipe"),
    pytest.param('[artifacts.a]\nkind = "file"\nsource = { recipe = "../elsewhere" }',
                 "artifacts.a.source.recipe: must be guests/<name>, a folder of guests/ with a build "
                 "script", id="recipe-escapes"),
    pytest.param('[artifacts.a]\nkind = "file"\nsource = { recipe = "guests/a", inputs = { x = "b" } }\n'
                 '[artifacts.b]\nkind = "file"\nsource = { recipe = "guests/b", inputs = { y = "a" } }',
                 "artifacts.a.source.inputs: inputs form a cycle: a -> b -> a", id="cycle"),
    pytest.param('[artifacts.a\nkind = "file"', "not readable TOML", id="toml-syntax"),
    pytest.param('remote_server_uris = ["https://x"]\n[artifacts.a]\nkind = "file"\n'
                 'source = { local_path = { path = "x" } }',
                 "remote_server_uris: Extra inputs are not permitted", id="unknown-top-level"),
])
def test_a_schema_error_names_the_key_and_field(tmp_path: Path, body: str, expected: str) -> None:
    problems = problems_of(tmp_path, body)
    assert any(p.startswith(expected) or expected in p for p in problems), problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, """
        [artifacts.a]
        kind = "file"
        source = { remote = { urls = ["https://x/a"], sha256 = "not-hex" } }
        [artifacts.b]
        kind = "plain"
        source = { local_path = { path = "b" } }
        """)
    assert len(problems) == 2, problems
    assert problems[0].startswith("artifacts.a.source.remote.sha256: ")
    assert problems[1].startswith("artifacts.b.kind: ")


def test_missing_manifest_says_how_to_pass_one(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="file not found; pass --phd-manifest"):
        load_manifest(tmp_path / "nope.toml")


def test_sha256_is_case_insensitive_and_filename_defaults_to_the_url(tmp_path: Path) -> None:
    manifest = load_manifest(remote_manifest(tmp_path, sha=SHA.upper()))
    assert manifest.artifacts["rootfs"].sha256 == SHA
    assert manifest.artifacts["rootfs"].file_name() == FILENAME


# --- remote -----------------------------------------------------------------------------------
def test_remote_lands_read_only_under_its_sha256(tmp_path: Path) -> None:
    mirror = Mirror()
    store = store_for(remote_manifest(tmp_path), tmp_path / "cache", mirror)
    path = store.ensure("rootfs")
    assert path == tmp_path / "cache" / SHA / FILENAME
    assert path.read_bytes() == PAYLOAD
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert mirror.requests == [URL]
    # Nothing but the file and its lock file: no temporary download left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == [f".{FILENAME}.lock", FILENAME]


def test_cached_copy_is_verified_once_per_process_and_reused_across_runs(tmp_path: Path) -> None:
    mirror = Mirror()
    manifest, cache = remote_manifest(tmp_path), tmp_path / "cache"
    path = store_for(manifest, cache, mirror).ensure("rootfs")
    again = store_for(manifest, cache, mirror)  # a second run (or another xdist worker)
    assert again.ensure("rootfs") == path
    assert mirror.requests == [URL], "a verified cached copy is not downloaded again"

    # Within one process the verification is memoised: a copy that goes bad mid-run is only
    # noticed by the next run (PHD's contract: verified once per run).
    os.chmod(path, 0o644)
    path.write_bytes(b"bit rot")
    assert again.ensure("rootfs") == path
    assert mirror.requests == [URL]


def test_a_corrupt_cached_copy_is_deleted_and_fetched_again(tmp_path: Path) -> None:
    mirror = Mirror()
    cached = tmp_path / "cache" / SHA / FILENAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated download")
    cached.chmod(0o444)
    lines: list[str] = []

    class Recorder(NullProgress):
        def line(self, key: str, text: str) -> None:
            lines.append(text)

    store = store_for(remote_manifest(tmp_path), tmp_path / "cache", mirror)
    path = store.ensure("rootfs", progress=Recorder())
    assert path == cached
    assert path.read_bytes() == PAYLOAD
    assert mirror.requests == [URL]
    assert any("is corrupt" in line and "fetching again" in line for line in lines), lines


def test_a_download_with_the_wrong_sha256_is_rejected_and_not_cached(tmp_path: Path) -> None:
    mirror = Mirror({URL: b"something else entirely"})
    store = store_for(remote_manifest(tmp_path), tmp_path / "cache", mirror)
    with pytest.raises(ArtifactHashMismatch) as caught:
        store.ensure("rootfs")
    assert caught.value.expected == SHA
    assert caught.value.actual == hashlib.sha256(b"something else entirely").hexdigest()
    assert URL in str(caught.value)
    folder = tmp_path / "cache" / SHA
    assert [p.name for p in folder.iterdir()] == [f".{FILENAME}.lock"], "no bad copy, no .part file"
    # Not a skip: a wrong hash is a broken manifest or a tampered mirror.
    assert not isinstance(caught.value, ArtifactUnavailable)


def test_the_next_url_is_tried_when_one_fails(tmp_path: Path) -> None:
    second = "https://second.invalid/" + FILENAME
    mirror = Mirror({URL: 503, second: PAYLOAD})
    path = store_for(remote_manifest(tmp_path, URL, second), tmp_path / "cache", mirror).ensure("rootfs")
    assert path.read_bytes() == PAYLOAD
    assert mirror.requests == [URL, second]


def test_a_stale_partial_download_is_cleaned_up(tmp_path: Path) -> None:
    folder = tmp_path / "cache" / SHA
    folder.mkdir(parents=True)
    stale = folder / f".{FILENAME}.abc123.part"
    stale.write_bytes(b"half")
    store_for(remote_manifest(tmp_path), tmp_path / "cache").ensure("rootfs")
    assert not stale.exists()


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A loopback URL whose port is bound but not listening: every connect is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/{FILENAME}"


def test_unreachable_mirror_is_unavailable_quickly_with_a_how_to(tmp_path: Path, refusing_url: str) -> None:
    manifest = remote_manifest(tmp_path, refusing_url)
    store = ArtifactStore(manifest, tmp_path / "cache", REPO, connect_timeout_s=2.0)
    started = time.monotonic()
    with pytest.raises(ArtifactUnavailable) as caught:
        store.ensure("rootfs")
    assert time.monotonic() - started < 10
    message = str(caught.value)
    cache_path = tmp_path / "cache" / SHA / FILENAME
    assert "artifact 'rootfs' is unavailable" in message
    assert f"{refusing_url}: ConnectError" in message
    assert f"download {refusing_url} (sha256 {SHA}) on a machine with internet access" in message
    assert f"copy it to {cache_path}" in message
    assert (f'[artifacts.rootfs].source = {{ local_path = {{ path = "/path/to/{FILENAME}", '
            f'sha256 = "{SHA}" }} }} in {manifest}') in message

    # Following the advice works offline: the file put at the cache path is verified and used.
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(PAYLOAD)
    offline = ArtifactStore(manifest, tmp_path / "cache", REPO, connect_timeout_s=2.0)
    assert offline.ensure("rootfs") == cache_path
    assert stat.S_IMODE(cache_path.stat().st_mode) == 0o444


def test_a_real_download_from_a_loopback_server(tmp_path: Path) -> None:
    with serve_files(tmp_path / "served", {FILENAME: PAYLOAD}) as base:
        url = f"{base}/{FILENAME}"
        seen: list[tuple[str, int | None]] = []
        advanced: list[int] = []

        class Recorder(NullProgress):
            def begin(self, key: str, what: str, total: int | None) -> None:
                seen.append((what, total))

            def advance(self, key: str, nbytes: int) -> None:
                advanced.append(nbytes)

        path = ArtifactStore(remote_manifest(tmp_path, url), tmp_path / "cache", REPO).ensure(
            "rootfs", progress=Recorder())
    assert path.read_bytes() == PAYLOAD
    assert seen == [("fetch rootfs", len(PAYLOAD))]
    assert sum(advanced) == len(PAYLOAD)


def test_one_fetch_across_processes_holding_the_lock(tmp_path: Path) -> None:
    """Two stores (two xdist workers): the second waits on the file lock, then reuses."""
    gate = threading.Event()
    mirror = Mirror(gate=gate)
    manifest, cache = remote_manifest(tmp_path), tmp_path / "cache"
    first, second = store_for(manifest, cache, mirror), store_for(manifest, cache, mirror)
    waiting = threading.Event()

    class WaitWatcher(NullProgress):
        def line(self, key: str, text: str) -> None:
            if "another process is fetching rootfs" in text:
                waiting.set()

    results: dict[str, Path | BaseException] = {}

    def run(name: str, store: ArtifactStore, progress: NullProgress) -> None:
        try:
            results[name] = store.ensure("rootfs", progress=progress)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            results[name] = exc

    a = threading.Thread(target=run, args=("a", first, NullProgress()))
    a.start()
    try:
        assert mirror.entered.wait(10), "the first fetch never reached the mirror"
        b = threading.Thread(target=run, args=("b", second, WaitWatcher()))
        b.start()
        # The second worker has checked nothing yet and is parked on the lock: without the
        # lock it would see no cached file and download a second copy.
        assert waiting.wait(10), "the second fetch did not wait for the lock"
    finally:
        gate.set()
        a.join(timeout=10)
    b.join(timeout=10)
    assert results["a"] == results["b"] == cache / SHA / FILENAME, results
    assert mirror.requests == [URL]


def test_a_lock_held_too_long_is_a_clear_error(tmp_path: Path) -> None:
    from filelock import FileLock

    manifest, cache = remote_manifest(tmp_path), tmp_path / "cache"
    (cache / SHA).mkdir(parents=True)
    with FileLock(str(cache / SHA / f".{FILENAME}.lock")), pytest.raises(
            HarnessError, match=r"another process has held .* while fetching 'rootfs'"):
        store_for(manifest, cache, lock_timeout_s=0.2).ensure("rootfs")


# --- local_path ---------------------------------------------------------------------------------
def local_manifest(tmp_path: Path, path: str, sha: str | None) -> Path:
    sha_part = f', sha256 = "{sha}"' if sha else ""
    return write_manifest(tmp_path, f"""
        [artifacts.rootfs]
        kind = "file"
        source = {{ local_path = {{ path = "{path}"{sha_part} }} }}
        """)


def test_local_path_is_relative_to_the_manifest_and_used_in_place(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / FILENAME).write_bytes(PAYLOAD)
    store = store_for(local_manifest(tmp_path, f"files/{FILENAME}", SHA), tmp_path / "cache")
    assert store.ensure("rootfs") == tmp_path / "files" / FILENAME
    assert not (tmp_path / "cache").exists(), "a local file is not copied into the cache"


def test_local_path_with_a_wrong_sha256_is_rejected(tmp_path: Path) -> None:
    (tmp_path / FILENAME).write_bytes(b"a different tarball")
    store = store_for(local_manifest(tmp_path, FILENAME, SHA), tmp_path / "cache")
    with pytest.raises(ArtifactHashMismatch, match=f"the manifest expects {SHA}"):
        store.ensure("rootfs")


def test_local_path_without_sha256_is_not_checked(tmp_path: Path) -> None:
    (tmp_path / FILENAME).write_bytes(b"anything")
    store = store_for(local_manifest(tmp_path, FILENAME, None), tmp_path / "cache")
    assert store.ensure("rootfs").read_bytes() == b"anything"


def test_missing_local_path_is_unavailable_and_says_where(tmp_path: Path) -> None:
    store = store_for(local_manifest(tmp_path, "nowhere/x.tar.gz", None), tmp_path / "cache")
    with pytest.raises(ArtifactUnavailable, match=r"its local_path .*nowhere/x.tar.gz does not exist"):
        store.ensure("rootfs")


# --- recipes ----------------------------------------------------------------------------------
FAKE_RECIPE = """\
#!/usr/bin/env python3
# A fake recipe: records its argv, fails on demand, writes the recipe interface.
import json, os, sys
args = sys.argv[1:]
out = args[args.index("--out") + 1]
with open(os.environ["FAKE_RECIPE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
print("fake: working", file=sys.stderr)
if os.environ.get("FAKE_RECIPE_FAIL"):
    print("fake: error: no kernel for you", file=sys.stderr)
    sys.exit(1)
os.makedirs(out, exist_ok=True)
for name in ("vmlinuz", "initrd.img"):
    open(os.path.join(out, name), "w").write(name)
open(os.path.join(out, "cmdline"), "w").write("console=ttyS0 rdinit=/sbin/init\\n")
json.dump({"login_prompt": "localhost login: ", "shell_prompt": "localhost:~# ",
           "files": {"kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "cmdline"},
           "sha256": {"vmlinuz": "VMLINUZ_SHA", "initrd.img": "INITRD_SHA"}},
          open(os.path.join(out, "guest.json"), "w"))
print(out)
""".replace("VMLINUZ_SHA", hashlib.sha256(b"vmlinuz").hexdigest()).replace(
    "INITRD_SHA", hashlib.sha256(b"initrd.img").hexdigest())


@pytest.fixture
def recipe_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    repo = tmp_path / "repo"
    build = repo / "guests" / "fake" / "build"
    build.parent.mkdir(parents=True)
    build.write_text(FAKE_RECIPE)
    build.chmod(0o755)
    monkeypatch.setenv("FAKE_RECIPE_LOG", str(tmp_path / "recipe.log"))
    return repo


def recipe_manifest(tmp_path: Path, rootfs_source: str) -> Path:
    return write_manifest(tmp_path, f"""
        [artifacts.rootfs]
        kind = "file"
        source = {rootfs_source}

        [artifacts.fake]
        kind = {{ guest_os = "alpine" }}
        source = {{ recipe = "guests/fake", inputs = {{ minirootfs = "rootfs" }} }}
        """)


def recipe_calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "recipe.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_a_recipe_gets_its_inputs_and_yields_a_guest(tmp_path: Path, recipe_repo: Path) -> None:
    manifest = recipe_manifest(tmp_path, f'{{ remote = {{ urls = ["{URL}"], sha256 = "{SHA}" }} }}')
    store = ArtifactStore(manifest, tmp_path / "cache", recipe_repo, transport=Mirror().transport())
    guest = store.guest("fake")
    out = tmp_path / "cache" / "guests" / "fake"
    assert recipe_calls(tmp_path) == [
        ["--out", str(out), "--input", f"minirootfs={tmp_path / 'cache' / SHA / FILENAME}"]]
    assert guest.name == "fake"
    assert guest.guest_os == "alpine"
    assert (guest.kernel, guest.initrd, guest.disk) == (out / "vmlinuz", out / "initrd.img", None)
    assert guest.cmdline == "console=ttyS0 rdinit=/sbin/init"
    assert (guest.login_prompt, guest.shell_prompt) == ("localhost login: ", "localhost:~# ")
    assert store.guest("fake") is guest
    assert len(recipe_calls(tmp_path)) == 1, "asked once per process"
    assert [c.status for c in store.verify(["fake"])] == ["ok", "ok"]


def test_force_passes_force_to_the_recipe(tmp_path: Path, recipe_repo: Path) -> None:
    manifest = recipe_manifest(tmp_path, f'{{ remote = {{ urls = ["{URL}"], sha256 = "{SHA}" }} }}')
    store = ArtifactStore(manifest, tmp_path / "cache", recipe_repo, transport=Mirror().transport())
    store.ensure("fake")
    store.ensure("fake", force=True)
    assert [call[-1] for call in recipe_calls(tmp_path)] == [
        f"minirootfs={tmp_path / 'cache' / SHA / FILENAME}", "--force"]


def test_an_unavailable_input_makes_the_guest_unavailable_with_the_inputs_how_to(
    tmp_path: Path, recipe_repo: Path, refusing_url: str
) -> None:
    manifest = recipe_manifest(tmp_path, f'{{ remote = {{ urls = ["{refusing_url}"], sha256 = "{SHA}" }} }}')
    store = ArtifactStore(manifest, tmp_path / "cache", recipe_repo, connect_timeout_s=2.0)
    with pytest.raises(ArtifactUnavailable) as caught:
        store.guest("fake")
    message = str(caught.value)
    assert message.startswith("artifact 'fake' (its input minirootfs = 'rootfs') is unavailable: ")
    assert "on a machine with internet access" in message
    assert "[artifacts.rootfs].source = { local_path" in message
    assert recipe_calls(tmp_path) == [], "the recipe never runs without its inputs"


def test_a_failing_recipe_is_unavailable_with_its_output(
    tmp_path: Path, recipe_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / FILENAME).write_bytes(PAYLOAD)
    manifest = recipe_manifest(tmp_path, f'{{ local_path = {{ path = "{FILENAME}" }} }}')
    monkeypatch.setenv("FAKE_RECIPE_FAIL", "1")
    lines: list[str] = []

    class Recorder(NullProgress):
        def line(self, key: str, text: str) -> None:
            lines.append(f"{key}: {text}")

    store = ArtifactStore(manifest, tmp_path / "cache", recipe_repo)
    with pytest.raises(ArtifactUnavailable, match=r"(?s)its recipe failed .*exited 1.*no kernel for you"):
        store.ensure("fake", progress=Recorder())
    assert lines == ["fake: fake: working", "fake: fake: error: no kernel for you"]


def test_a_missing_recipe_names_the_field(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, """
        [artifacts.ghost]
        kind = { guest_os = "ghost" }
        source = { recipe = "guests/ghost" }
        """)
    with pytest.raises(HarnessError, match=r"artifacts.ghost.source.recipe: .*guests/ghost/build is missing"):
        ArtifactStore(manifest, tmp_path / "cache", tmp_path).guest("ghost")


def test_asking_for_an_unknown_or_non_guest_key(tmp_path: Path) -> None:
    store = store_for(remote_manifest(tmp_path), tmp_path / "cache")
    with pytest.raises(HarnessError, match=r"guest 'nope' is not in .*known: \['rootfs'\]"):
        store.guest("nope")
    with pytest.raises(HarnessError, match=r'artifacts\.rootfs\.kind is "file", not a guest_os'):
        store.guest("rootfs")


# --- verify -----------------------------------------------------------------------------------
def test_verify_rehashes_and_reports_bad_and_stray_files(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = store_for(remote_manifest(tmp_path), cache)
    path = store.ensure("rootfs")
    stray_sha = hashlib.sha256(b"old").hexdigest()
    (cache / stray_sha).mkdir()
    (cache / stray_sha / "old.bin").write_bytes(b"old, now corrupted")
    assert [(c.key, c.status) for c in store.verify()] == [("rootfs", "ok"), (None, "bad")]

    os.chmod(path, 0o644)
    path.write_bytes(b"bit rot")
    checks = store_for(remote_manifest(tmp_path), cache).verify(["rootfs"])
    assert [(c.key, c.status, c.path) for c in checks] == [("rootfs", "bad", path)]
    assert f"expected {SHA}" in checks[0].detail


def test_status_lines(tmp_path: Path) -> None:
    store = store_for(remote_manifest(tmp_path), tmp_path / "cache")
    assert store.status("rootfs") == "not fetched"
    path = store.ensure("rootfs")
    assert store.status("rootfs") == f"cached {path}"
