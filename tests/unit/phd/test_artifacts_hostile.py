"""The artifact store against hostile input: a manifest and a cache that try to make it
write, chmod, delete or read outside its cache, crash, or give dangerous advice.

Every test asserts three things: the store says clearly what is wrong (one line naming the
entry, the problem and the fix; through the CLI, a non-zero exit instead of a traceback);
nothing outside the cache changed (content hash and mode of each file the input aimed at,
compared with `snapshot`); and the store still serves a well-behaved entry afterwards.

Downloads go through httpx.MockTransport (no network at all) except one real loopback
download; every URL names 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import textwrap
from pathlib import Path

import httpx
import pytest

from phd.artifacts.manifest import ManifestError, load_manifest
from phd.artifacts.store import ArtifactHashMismatch, ArtifactStore, NullProgress
from phd.cli import main
from phd.core.errors import HarnessError
from tests.unit.phd.http_files import serve_files

PAYLOAD = b"the artifact the manifest pins\n" * 100
SHA = hashlib.sha256(PAYLOAD).hexdigest()
GOOD = b"a well-behaved artifact\n"
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()
BASE = "http://127.0.0.1:9"  # only ever answered by the MockTransport below
NAME = "rootfs.tar.gz"
URL = f"{BASE}/files/{NAME}"
GOOD_URL = f"{BASE}/files/good.bin"
VICTIM = b"a file outside the cache that must not change\n"
GOOD_ENTRY = f"""
[artifacts.good]
kind = "file"
source = {{ remote = {{ urls = ["{GOOD_URL}"], sha256 = "{GOOD_SHA}" }} }}
"""


# --- helpers ---------------------------------------------------------------------------------
def snapshot(root: Path, *, skip: Path | None = None) -> dict[str, tuple[object, ...]]:
    """Every entry under `root` (symlinks not followed): type, mode and content hash or
    link target. Compared before and after to prove nothing there changed."""
    seen: dict[str, tuple[object, ...]] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        if skip is not None and Path(folder) == skip:
            dirs[:] = []
            continue
        for name in (*dirs, *files):
            path = Path(folder) / name
            if skip is not None and path == skip:
                continue
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                seen[str(path)] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                seen[str(path)] = ("file", stat.S_IMODE(st.st_mode), digest)
            else:
                seen[str(path)] = ("other", stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))
    return seen


def served(routes: dict[str, bytes] | None = None) -> tuple[httpx.MockTransport, list[str]]:
    answers = {URL: PAYLOAD, GOOD_URL: GOOD, **(routes or {})}
    requests: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(str(request.url))
        body = answers.get(str(request.url))
        return httpx.Response(404) if body is None else httpx.Response(200, content=body)

    return httpx.MockTransport(handler), requests


def write_manifest(tmp_path: Path, body: str, *, name: str = "artifacts.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def remote_entry(key: str = "rootfs", url: str = URL, extra: str = "") -> str:
    return f"""
[artifacts.{key}]
kind = "file"
source = {{ remote = {{ urls = ["{url}"], sha256 = "{SHA}" }} }}
{extra}
"""


def store(manifest: Path, cache: Path, repo: Path | None = None) -> ArtifactStore:
    return ArtifactStore(manifest, cache, repo or manifest.parent, transport=served()[0])


def assert_still_serves(tmp_path: Path, cache: Path) -> None:
    """A fresh store over the same cache fetches and verifies a well-behaved entry."""
    manifest = write_manifest(tmp_path, GOOD_ENTRY, name="good.toml")
    path = store(manifest, cache).ensure("good")
    assert path == cache / GOOD_SHA / "good.bin"
    assert path.read_bytes() == GOOD
    assert not path.is_symlink()
    assert stat.S_IMODE(path.lstat().st_mode) == 0o444
    assert [c.status for c in store(manifest, cache).verify(["good"])] == ["ok"]


def one_line(message: str) -> str:
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    assert "Traceback" not in message
    return message


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the cache holding a file the hostile input aims at (mode 0640)."""
    folder = tmp_path / "outside"
    folder.mkdir()
    victim = folder / "victim"
    victim.write_bytes(VICTIM)
    victim.chmod(0o640)
    return folder


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["artifacts", *argv])  # a traceback would propagate out of here
    out, err = capsys.readouterr()
    return code, out, err


def problems(manifest: Path) -> list[str]:
    """The manifest (in a test's tmp_path) is refused at load: each problem is one line,
    nothing in tmp_path changed, and a store over the same cache still serves."""
    root = manifest.parent
    before = snapshot(root)
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    for problem in caught.value.problems:
        one_line(problem)
    assert snapshot(root) == before
    assert_still_serves(root, root / "cache")
    return caught.value.problems


# --- file names from the manifest: URL last segment, filename, local_path -----------------------
@pytest.mark.parametrize("segment", [
    pytest.param("..", id="dotdot"),
    pytest.param(".", id="dot"),
    pytest.param("", id="empty-trailing-slash"),
    pytest.param("%2e%2e", id="encoded-dotdot"),
    pytest.param("a%2Fb", id="encoded-slash"),
    pytest.param("..%2F..%2Foutside%2Fvictim", id="encoded-traversal"),
    pytest.param("a%00b", id="encoded-nul"),
    pytest.param("a%0Ab", id="encoded-newline"),
    pytest.param("a%1B%5B31mb", id="encoded-escape"),
    pytest.param(".hidden", id="hidden"),
    pytest.param("x" * 300, id="too-long"),
])
def test_a_url_whose_last_segment_is_not_a_plain_file_name_is_refused(
    tmp_path: Path, outside: Path, segment: str
) -> None:
    manifest = write_manifest(tmp_path, remote_entry("bad", f"{BASE}/dir/{segment}"))
    found = problems(manifest)
    assert len(found) == 1, found
    assert found[0].startswith("artifacts.bad.source.remote.urls"), found
    assert "not a plain file name" in found[0] and "filename" in found[0], found
    assert "\x1b" not in found[0] and "\x00" not in found[0]
    assert_still_serves(tmp_path, tmp_path / "cache")


@pytest.mark.parametrize("url", [
    pytest.param(f"{BASE}/x\\u0001y/f.bin", id="control-character"),
    pytest.param("http://127.0.0.1:99999/f.bin", id="port-out-of-range"),
    pytest.param("http://[::1/f.bin", id="broken-ipv6"),
    pytest.param("file:///etc/passwd", id="not-http"),
])
def test_a_url_the_downloader_cannot_use_is_refused(tmp_path: Path, url: str) -> None:
    found = problems(write_manifest(tmp_path, remote_entry("bad", url, 'filename = "f.bin"')))
    assert [p.split(":")[0] for p in found] == ["artifacts.bad.source.remote.urls"], found
    assert "\x01" not in found[0]


def test_a_filename_field_makes_any_url_usable(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, remote_entry("ok", f"{BASE}/get/a%2Fb", 'filename = "named.bin"'))
    transport, requests = served({f"{BASE}/get/a%2Fb": PAYLOAD})
    path = ArtifactStore(manifest, tmp_path / "cache", tmp_path, transport=transport).ensure("ok")
    assert path == tmp_path / "cache" / SHA / "named.bin"
    assert path.read_bytes() == PAYLOAD
    assert requests == [f"{BASE}/get/a%2Fb"]


def test_a_dotdot_url_through_the_cli_is_one_line_and_exit_2(
    tmp_path: Path, outside: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tester's report: a URL ending in `..` crashed `phd artifacts fetch`."""
    with serve_files(tmp_path / "served", {"x": PAYLOAD}) as base:
        manifest = write_manifest(tmp_path, remote_entry("bad", f"{base}/.."))
        before = snapshot(tmp_path)
        code, _, err = cli(capsys, "fetch", "--manifest", str(manifest),
                             "--artifact-dir", str(tmp_path / "cache"))
    assert code == 2
    assert one_line(err).startswith(f"phd: error: artifact manifest {manifest} is invalid: "
                                     "artifacts.bad.source.remote.urls"), err
    assert snapshot(tmp_path) == before
    assert_still_serves(tmp_path, tmp_path / "cache")


@pytest.mark.parametrize("filename", [
    "..", ".", "", "../outside/victim", "a/b", "/etc/passwd", "a\\u0000b", "a\\nb", "a\\u001b[2Jb",
    "a\\u202eb", ".hidden", pytest.param("x" * 300, id="too-long"),
])
def test_a_filename_with_traversal_or_control_characters_is_refused(
    tmp_path: Path, outside: Path, filename: str
) -> None:
    manifest = write_manifest(tmp_path, remote_entry("bad", extra=f'filename = "{filename}"'))
    found = problems(manifest)
    assert [p.split(":")[0] for p in found] == ["artifacts.bad.filename"], found
    assert "plain file name" in found[0]
    assert_still_serves(tmp_path, tmp_path / "cache")


@pytest.mark.parametrize("path", [
    "files/..", "/", "files/", ".", "a\\u0000b", "dir/a\\nb",
    pytest.param("/" + "x" * 5000, id="path-too-long"),
    pytest.param("x" * 300, id="name-too-long"),
])
def test_a_local_path_that_is_not_a_file_name_is_refused(tmp_path: Path, outside: Path, path: str) -> None:
    manifest = write_manifest(tmp_path, f"""
        [artifacts.bad]
        kind = "file"
        source = {{ local_path = {{ path = "{path}" }} }}
        """)
    found = problems(manifest)
    assert [p.split(":")[0] for p in found] == ["artifacts.bad.source.local_path.path"], found
    assert_still_serves(tmp_path, tmp_path / "cache")


def test_a_long_local_path_does_not_crash_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, f"""
        [artifacts.bad]
        kind = "file"
        source = {{ local_path = {{ path = "{'x' * 5000}" }} }}
        """)
    code, _, err = cli(capsys, "list", "--manifest", str(manifest), "--artifact-dir", str(tmp_path / "c"))
    assert code == 2
    assert "artifacts.bad.source.local_path.path" in one_line(err)
    assert_still_serves(tmp_path, tmp_path / "c")


# --- symlinks and other non-files placed in the cache ------------------------------------------
def cached_slot(cache: Path) -> Path:
    slot = cache / SHA / NAME
    slot.parent.mkdir(parents=True, exist_ok=True)
    return slot


def test_a_cached_symlink_to_an_outside_file_is_replaced_not_chmodded(tmp_path: Path, outside: Path) -> None:
    """The tester's report: making the cached file read-only followed a symlink and changed
    the mode of a file outside the cache. Here the outside file even has the right content."""
    victim = outside / "victim"
    victim.write_bytes(PAYLOAD)
    victim.chmod(0o640)
    cache = tmp_path / "cache"
    cached_slot(cache).symlink_to(victim)
    manifest = write_manifest(tmp_path, remote_entry() + GOOD_ENTRY)
    before = snapshot(outside)
    transport, requests = served()
    path = ArtifactStore(manifest, cache, tmp_path, transport=transport).ensure("rootfs")
    assert snapshot(outside) == before, "the outside file's mode or content changed"
    assert path == cache / SHA / NAME
    assert not path.is_symlink() and path.read_bytes() == PAYLOAD
    assert stat.S_IMODE(path.lstat().st_mode) == 0o444
    assert requests == [URL], "the symlink was treated as corrupt and fetched again"
    assert_still_serves(tmp_path, cache)


def test_a_cached_symlink_with_wrong_content_is_replaced(tmp_path: Path, outside: Path) -> None:
    cache = tmp_path / "cache"
    cached_slot(cache).symlink_to(outside / "victim")
    manifest = write_manifest(tmp_path, remote_entry())
    before = snapshot(outside)
    path = store(manifest, cache).ensure("rootfs")
    assert snapshot(outside) == before
    assert not path.is_symlink() and path.read_bytes() == PAYLOAD
    assert_still_serves(tmp_path, cache)


def test_a_symlinked_lock_file_neither_crashes_nor_truncates_its_target(
    tmp_path: Path, outside: Path
) -> None:
    cache = tmp_path / "cache"
    (cached_slot(cache).parent / f".{NAME}.lock").symlink_to(outside / "victim")
    manifest = write_manifest(tmp_path, remote_entry())
    before = snapshot(outside)
    path = store(manifest, cache).ensure("rootfs")
    assert snapshot(outside) == before
    assert path.read_bytes() == PAYLOAD
    assert_still_serves(tmp_path, cache)


def test_a_cache_folder_that_is_a_symlink_out_of_the_cache_is_not_written_through(
    tmp_path: Path, outside: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / SHA).symlink_to(outside, target_is_directory=True)
    manifest = write_manifest(tmp_path, remote_entry())
    before = snapshot(outside)
    path = store(manifest, cache).ensure("rootfs")
    assert snapshot(outside) == before, "files were written into the folder the symlink points at"
    assert path.resolve().parent == (cache / SHA).resolve()
    assert (cache / SHA).resolve().is_relative_to(cache.resolve())
    assert path.read_bytes() == PAYLOAD
    assert_still_serves(tmp_path, cache)


def test_a_stale_part_symlink_is_removed_without_touching_its_target(tmp_path: Path, outside: Path) -> None:
    cache = tmp_path / "cache"
    (cached_slot(cache).parent / f".{NAME}.abc.part").symlink_to(outside / "victim")
    before = snapshot(outside)
    store(write_manifest(tmp_path, remote_entry()), cache).ensure("rootfs")
    assert snapshot(outside) == before
    assert not (cache / SHA / f".{NAME}.abc.part").is_symlink()
    assert_still_serves(tmp_path, cache)


@pytest.mark.timeout(20)
def test_a_cached_fifo_is_replaced_without_opening_it(tmp_path: Path, outside: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes: the store must not open it."""
    cache = tmp_path / "cache"
    fifo = outside / "fifo"
    os.mkfifo(fifo)
    cached_slot(cache).symlink_to(fifo)
    os.mkfifo(cache / SHA / "direct.bin")
    manifest = write_manifest(tmp_path, remote_entry() + remote_entry("direct", f"{BASE}/files/direct.bin"))
    before = snapshot(outside)
    transport, _ = served({f"{BASE}/files/direct.bin": PAYLOAD})
    s = ArtifactStore(manifest, cache, tmp_path, transport=transport)
    assert s.ensure("rootfs").read_bytes() == PAYLOAD
    assert s.ensure("direct").read_bytes() == PAYLOAD
    assert snapshot(outside) == before
    assert_still_serves(tmp_path, cache)


def test_a_cached_file_replaced_by_a_directory_is_moved_aside_and_fetched(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    slot = cached_slot(cache)
    slot.mkdir()
    (slot / "keep.txt").write_bytes(b"someone's notes")
    lines: list[str] = []

    class Recorder(NullProgress):
        def line(self, key: str, text: str) -> None:
            lines.append(text)

    path = store(write_manifest(tmp_path, remote_entry()), cache).ensure("rootfs", progress=Recorder())
    assert path.is_file() and path.read_bytes() == PAYLOAD
    kept = [p for p in (cache / SHA).rglob("keep.txt")]
    assert [p.read_bytes() for p in kept] == [b"someone's notes"], "what the store did not create is kept"
    assert any("not a regular file" in line for line in lines), lines
    assert_still_serves(tmp_path, cache)


def test_verify_and_list_report_symlinks_and_folders_without_following_them(
    tmp_path: Path, outside: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    cached_slot(cache).symlink_to(outside / "victim")
    stray_sha = hashlib.sha256(VICTIM).hexdigest()
    (cache / stray_sha).mkdir()
    (cache / stray_sha / "stray").symlink_to(outside / "victim")  # right content, via a link
    other_sha = hashlib.sha256(b"other").hexdigest()
    (cache / other_sha).symlink_to(outside, target_is_directory=True)
    manifest = write_manifest(tmp_path, remote_entry())
    before = snapshot(outside)
    checks = {str(c.path): c for c in store(manifest, cache).verify()}
    assert checks[str(cache / SHA / NAME)].status == "bad"
    assert "symlink" in checks[str(cache / SHA / NAME)].detail
    assert checks[str(cache / stray_sha / "stray")].status == "bad"
    assert "symlink" in checks[str(cache / stray_sha / "stray")].detail
    assert not any(path.startswith(str(outside)) for path in checks), checks
    assert all(not path.startswith(str(cache / other_sha) + "/") for path in checks), \
        "a symlinked cache folder is not walked into"
    assert store(manifest, cache).status("rootfs").startswith("corrupt")

    args = ("--manifest", str(manifest), "--artifact-dir", str(cache))
    code, out, _ = cli(capsys, "verify", *args)
    assert code == 1
    assert (f"rootfs: {cache / SHA / NAME}: a symlink, not a regular file; run `phd artifacts fetch "
            "rootfs`, which replaces it") in out.splitlines()
    code, out, _ = cli(capsys, "list", *args)
    assert code == 0
    assert f"corrupt: {cache / SHA / NAME} is a symlink" in out
    assert snapshot(outside) == before
    assert_still_serves(tmp_path, cache)


# --- local_path: files the store does not own ---------------------------------------------------
SYSTEM_FILE = Path("/etc/passwd")


@pytest.mark.skipif(not SYSTEM_FILE.is_file(), reason="needs /etc/passwd as a system file to point at")
def test_a_system_file_with_the_wrong_hash_is_never_advised_for_deletion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path, f"""
        [artifacts.sys]
        kind = "file"
        source = {{ local_path = {{ path = "{SYSTEM_FILE}", sha256 = "{SHA}" }} }}
        """)
    watched = {SYSTEM_FILE: (SYSTEM_FILE.stat().st_mode, hashlib.sha256(SYSTEM_FILE.read_bytes()).digest())}
    args = ("--manifest", str(manifest), "--artifact-dir", str(tmp_path / "cache"))

    code, out, err = cli(capsys, "verify", *args)
    assert code == 1
    said = (out + err).lower()
    assert "delete" not in said and "remove" not in said and "rm " not in said, out + err
    assert "does not match the manifest's sha256" in said
    assert "fix the manifest" in said and "local_path" in said

    with pytest.raises(ArtifactHashMismatch) as caught:
        store(manifest, tmp_path / "cache").ensure("sys")
    message = one_line(str(caught.value)).lower()
    assert "fix the file" not in message and "delete" not in message
    assert "point local_path" in message

    code, _, err = cli(capsys, "fetch", "sys", *args)
    assert code == 1 and "delete" not in err.lower()
    assert {p: (p.stat().st_mode, hashlib.sha256(p.read_bytes()).digest()) for p in watched} == watched
    assert_still_serves(tmp_path, tmp_path / "cache")


@pytest.mark.timeout(20)
def test_a_local_path_that_is_a_fifo_or_a_folder_is_refused_without_opening_it(
    tmp_path: Path, outside: Path
) -> None:
    os.mkfifo(outside / "fifo")
    manifest = write_manifest(tmp_path, f"""
        [artifacts.fifo]
        kind = "file"
        source = {{ local_path = {{ path = "{outside / 'fifo'}", sha256 = "{SHA}" }} }}
        [artifacts.folder]
        kind = "file"
        source = {{ local_path = {{ path = "{outside}", sha256 = "{SHA}" }} }}
        """)
    before = snapshot(outside)
    s = store(manifest, tmp_path / "cache")
    for key in ("fifo", "folder"):
        with pytest.raises(HarnessError, match="not a regular file") as caught:
            s.ensure(key)
        one_line(str(caught.value))
    assert [c.status for c in s.verify(["fifo", "folder"])] == ["bad", "bad"]
    assert snapshot(outside) == before
    assert_still_serves(tmp_path, tmp_path / "cache")


# --- recipes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", [
    "sut", "phd", "tests/unit", "guests", "guests/", "guests/../phd", "guests/tiny/../../phd",
    "guests/a/b", "/usr/bin", "./guests/tiny", "guests/.hidden", "guests/tiny/", "artifacts",
    "guests/a\\nb",
])
def test_a_recipe_outside_guests_is_refused(tmp_path: Path, recipe: str) -> None:
    manifest = write_manifest(tmp_path, f"""
        [artifacts.bad]
        kind = {{ guest_os = "bad" }}
        source = {{ recipe = "{recipe}" }}
        """)
    found = problems(manifest)
    assert [p.split(":")[0] for p in found] == ["artifacts.bad.source.recipe"], found
    assert "guests/<name>" in found[0]


BUILD_SCRIPT = """\
#!/bin/sh
# Hostile: the marker proves the store ran a script from outside guests/.
touch "{marker}"
exit 1
"""


@pytest.mark.parametrize("link", ["folder", "script"])
def test_a_recipe_linked_out_of_guests_is_not_run(tmp_path: Path, outside: Path, link: str) -> None:
    repo = tmp_path / "repo"
    (repo / "guests").mkdir(parents=True)
    (outside / "build").write_text(BUILD_SCRIPT.format(marker=outside / "ran"))
    (outside / "build").chmod(0o755)
    if link == "folder":
        (repo / "guests" / "evil").symlink_to(outside, target_is_directory=True)
    else:
        (repo / "guests" / "evil").mkdir()
        (repo / "guests" / "evil" / "build").symlink_to(outside / "build")
    manifest = write_manifest(tmp_path, """
        [artifacts.evil]
        kind = { guest_os = "evil" }
        source = { recipe = "guests/evil" }
        """)
    before = snapshot(outside)
    with pytest.raises(HarnessError, match=r"artifacts\.evil\.source\.recipe: .*outside") as caught:
        ArtifactStore(manifest, tmp_path / "cache", repo).ensure("evil")
    one_line(str(caught.value))
    assert not (outside / "ran").exists(), "the script outside guests/ was run"
    assert snapshot(outside) == before
    assert_still_serves(tmp_path, tmp_path / "cache")


FAKE_RECIPE = """\
#!/usr/bin/env python3
# Writes the recipe interface; guest.json comes from guest.json.in next to this script,
# and its output ends with `error_lines` when fail.in exists.
import os, shutil, sys
here = os.path.dirname(os.path.abspath(__file__))
out = sys.argv[sys.argv.index("--out") + 1]
if os.path.exists(os.path.join(here, "fail.in")):
    for n in range(40):
        print(f"g: step {n}", file=sys.stderr)
    print("g: error: no kernel\\x1b[2J for you", file=sys.stderr)
    sys.exit(1)
os.makedirs(out, exist_ok=True)
for name in ("vmlinuz", "initrd.img"):
    open(os.path.join(out, name), "w").write(name)
open(os.path.join(out, "cmdline"), "w").write("console=ttyS0\\n")
shutil.copy(os.path.join(here, "guest.json.in"), os.path.join(out, "guest.json"))
print(out)
"""


def recipe_repo(tmp_path: Path, guest_json: dict[str, object]) -> tuple[Path, Path]:
    """A repository with guests/g/build (FAKE_RECIPE) and a manifest building it."""
    folder = tmp_path / "repo" / "guests" / "g"
    folder.mkdir(parents=True)
    (folder / "build").write_text(FAKE_RECIPE)
    (folder / "build").chmod(0o755)
    (folder / "guest.json.in").write_text(json.dumps(guest_json))
    manifest = write_manifest(tmp_path, """
        [artifacts.g]
        kind = { guest_os = "g" }
        source = { recipe = "guests/g" }
        """)
    return tmp_path / "repo", manifest


@pytest.mark.parametrize(("files", "expected"), [
    ({"kernel": "../../../outside/victim"},
     "names its kernel '../../../outside/victim', not a plain file name"),
    ({"initrd": "/etc/passwd"}, "names its initrd '/etc/passwd', not a plain file name"),
    ({"disk": ".."}, "names its disk '..', not a plain file name"),
    ({"kernel": "link"}, "is a symlink, not a regular file"),
])
def test_a_guest_whose_files_point_out_of_its_folder_is_refused(
    tmp_path: Path, outside: Path, files: dict[str, str], expected: str
) -> None:
    repo, manifest = recipe_repo(tmp_path, {"files": {"cmdline": "cmdline", **files}})
    out = tmp_path / "cache" / "guests" / "g"
    s = ArtifactStore(manifest, tmp_path / "cache", repo)
    s.ensure("g")
    (out / "link").symlink_to(outside / "victim")
    before = snapshot(outside)
    with pytest.raises(HarnessError) as caught:
        s.guest("g")
    assert expected in one_line(str(caught.value)), caught.value
    assert "phd artifacts build g --force" in str(caught.value)
    assert snapshot(outside) == before
    assert_still_serves(tmp_path, tmp_path / "cache")


def test_a_recipe_output_folder_linked_out_of_the_cache_is_not_built_through(
    tmp_path: Path, outside: Path
) -> None:
    repo, manifest = recipe_repo(tmp_path, {"files": {}})
    out = tmp_path / "cache" / "guests" / "g"
    out.parent.mkdir(parents=True)
    out.symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    guest = ArtifactStore(manifest, tmp_path / "cache", repo).guest("g")
    assert snapshot(outside) == before, "the recipe wrote through the planted symlink"
    assert not out.is_symlink() and out.is_dir()
    assert guest.kernel == out / "vmlinuz"
    assert_still_serves(tmp_path, tmp_path / "cache")


def test_a_failing_recipe_is_one_line_ending_with_its_error(tmp_path: Path) -> None:
    repo, manifest = recipe_repo(tmp_path, {})
    (repo / "guests" / "g" / "fail.in").write_text("")
    with pytest.raises(HarnessError) as caught:
        ArtifactStore(manifest, tmp_path / "cache", repo).ensure("g")
    message = one_line(str(caught.value))
    assert "its recipe failed" in message and "exited 1" in message
    assert message.endswith("g: error: no kernel\\x1b[2J for you; run it by hand to see all of its output")
    assert "\x1b" not in message
    assert_still_serves(tmp_path, tmp_path / "cache")


def test_guest_json_naming_files_outside_its_folder_is_refused(tmp_path: Path, outside: Path) -> None:
    """A recipe's output folder is part of the cache: its guest.json is input too."""
    manifest = write_manifest(tmp_path, """
        [artifacts.g]
        kind = { guest_os = "g" }
        source = { recipe = "guests/g" }
        """)
    out = tmp_path / "cache" / "guests" / "g"
    out.mkdir(parents=True)
    victim_sha = hashlib.sha256(VICTIM).hexdigest()
    (out / "guest.json").write_text(json.dumps({
        "files": {"kernel": "../../../outside/victim"},
        "sha256": {"../../../outside/victim": victim_sha, "/etc/passwd": victim_sha}}))
    before = snapshot(outside)
    checks = store(manifest, tmp_path / "cache").verify(["g"])
    assert [c.status for c in checks] == ["bad", "bad"], checks
    assert all("not a plain file name" in c.detail for c in checks), checks
    assert all(c.path.parent == out for c in checks), "reported under the output folder"
    assert all("phd artifacts build g --force" in c.fix for c in checks)
    assert snapshot(outside) == before
    assert_still_serves(tmp_path, tmp_path / "cache")


def test_a_deeply_nested_guest_json_does_not_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path, """
        [artifacts.g]
        kind = { guest_os = "g" }
        source = { recipe = "guests/g" }
        """)
    out = tmp_path / "cache" / "guests" / "g"
    out.mkdir(parents=True)
    (out / "guest.json").write_text("[" * 200_000 + "]" * 200_000)
    s = store(manifest, tmp_path / "cache")
    assert s.status("g") == "not built"
    assert [c.status for c in s.verify(["g"])] == ["missing"]
    code, _, _ = cli(capsys, "list", "--manifest", str(manifest), "--artifact-dir", str(tmp_path / "cache"))
    assert code == 0
    assert_still_serves(tmp_path, tmp_path / "cache")


def test_a_local_path_under_an_unknown_home_is_missing_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path, """
        [artifacts.far]
        kind = "file"
        source = { local_path = { path = "~no-such-user-here/x.bin" } }
        """)
    args = ("--manifest", str(manifest), "--artifact-dir", str(tmp_path / "cache"))
    code, out, _ = cli(capsys, "list", *args)
    assert code == 0 and "missing" in out
    code, _, err = cli(capsys, "fetch", *args)
    assert code == 1
    assert "its local_path" in err and "does not exist" in err
    assert_still_serves(tmp_path, tmp_path / "cache")


# --- huge, deep and wrongly typed manifests ------------------------------------------------------
def test_a_deeply_nested_manifest_is_a_clear_error(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, "[artifacts.a]\nkind = " + "[" * 5000 + "]" * 5000 + "\n")
    found = problems(manifest)
    assert len(found) == 1 and "nested too deeply" in found[0], found


def test_a_huge_manifest_is_refused_before_parsing(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, f'[artifacts.a]\nkind = "file"\nsource = {{ local_path = {{ '
                              f'path = "{"x" * (2 << 20)}" }} }}\n')
    found = problems(manifest)
    assert len(found) == 1 and "larger than" in found[0], [p[:200] for p in found]


def test_huge_values_are_refused_with_short_messages(tmp_path: Path) -> None:
    long_url = f"{BASE}/" + "x" * 20_000
    manifest = write_manifest(tmp_path, f"""
        [artifacts.many-urls]
        kind = "file"
        source = {{ remote = {{ urls = [{", ".join(f'"{URL}"' for _ in range(1000))}], sha256 = "{SHA}" }} }}
        [artifacts.long-url]
        kind = "file"
        source = {{ remote = {{ urls = ["{long_url}"], sha256 = "{SHA}" }} }}
        [artifacts.{"k" * 5000}]
        kind = "file"
        source = {{ local_path = {{ path = "x" }} }}
        [artifacts.many-inputs]
        kind = {{ guest_os = "x" }}
        source = {{ recipe = "guests/x", inputs = {{ {", ".join(f'i{n} = "good"' for n in range(500))} }} }}
        """ + GOOD_ENTRY)
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    assert len(str(caught.value)) < 4000, str(caught.value)[:500]
    fields = sorted(p.split(":")[0] for p in caught.value.problems)
    assert "artifacts.many-urls.source.remote.urls" in fields, fields
    assert "artifacts.long-url.source.remote.urls.0" in fields, fields
    assert "artifacts.many-inputs.source.inputs" in fields, fields
    assert any(f.startswith("artifacts.'kkkk") for f in fields), fields


def test_many_bad_entries_are_summarised(tmp_path: Path) -> None:
    entry = '[artifacts.a{n}]\nkind = "disk"\nsource = {{ recipe = "guests/a" }}\n'
    body = "".join(entry.format(n=n) for n in range(300))
    with pytest.raises(ManifestError) as caught:
        load_manifest(write_manifest(tmp_path, body))
    assert len(caught.value.problems) == 300
    assert "and 280 more" in str(caught.value)
    assert len(str(caught.value)) < 8000


@pytest.mark.parametrize("key", ["a\\u001b[31mred", "a\\nb", "a\\u0000b", "..", "a/b"])
def test_a_hostile_key_is_shown_escaped(tmp_path: Path, key: str) -> None:
    found = problems(write_manifest(tmp_path, f"""
        [artifacts."{key}"]
        kind = "file"
        source = {{ local_path = {{ path = "x" }} }}
        """))
    assert len(found) == 1 and found[0].startswith("artifacts.'"), found
    assert not any(ch in found[0] for ch in "\x1b\x00\n")


@pytest.mark.parametrize(("body", "field"), [
    (f'kind = "file"\nsource = {{ remote = {{ urls = "{URL}", sha256 = "{SHA}" }} }}', "source.remote.urls"),
    (f'kind = "file"\nsource = {{ remote = {{ urls = [5], sha256 = "{SHA}" }} }}', "source.remote.urls.0"),
    (f'kind = "file"\nsource = {{ remote = {{ urls = ["{URL}"], sha256 = 5 }} }}', "source.remote.sha256"),
    ('kind = 5\nsource = { local_path = { path = "x" } }', "kind"),
    ('kind = { guest_os = 5 }\nsource = { recipe = "guests/x" }', "kind"),
    ('kind = "file"\nsource = "guests/x"', "source"),
    ('kind = "file"\nsource = { local_path = { path = 5 } }', "source.local_path.path"),
    ('kind = "file"\nsource = { local_path = { path = ["x"] } }', "source.local_path.path"),
    ('kind = "file"\nsource = { local_path = "x" }', "source.local_path"),
    ('kind = { guest_os = "x" }\nsource = { recipe = 5 }', "source.recipe"),
    ('kind = { guest_os = "x" }\nsource = { recipe = "guests/x", inputs = ["a"] }', "source.inputs"),
    ('kind = { guest_os = "x" }\nsource = { recipe = "guests/x", inputs = { a = 5 } }', "source.inputs.a"),
    ('kind = "file"\nfilename = 5\nsource = { local_path = { path = "x" } }', "filename"),
    ('kind = "file"\nsource = { local_path = { path = "x", sha256 = true } }', "source.local_path.sha256"),
])
def test_a_wrongly_typed_field_is_named(tmp_path: Path, body: str, field: str) -> None:
    found = problems(write_manifest(tmp_path, "[artifacts.a]\n" + body + "\n"))
    assert any(p.split(":")[0] == f"artifacts.a.{field}" for p in found), found


@pytest.mark.parametrize("body", ["artifacts = 5", "artifacts = []", "[artifacts]\na = 5", ""])
def test_a_wrongly_typed_top_level_is_named(tmp_path: Path, body: str) -> None:
    found = problems(write_manifest(tmp_path, body + "\n"))
    assert found and all(p.startswith("artifacts") for p in found), found


# --- the CLI: the option it names, one line per failure -----------------------------------------
def test_the_cli_names_its_own_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The tester's report: `phd artifacts` told the user to pass --phd-manifest."""
    code, _, err = cli(capsys, "list", "--manifest", str(tmp_path / "nope.toml"))
    assert code == 2
    assert "--manifest" in one_line(err) and "--phd-manifest" not in err

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    manifest = write_manifest(tmp_path, remote_entry())
    code, _, err = cli(capsys, "fetch", "--manifest", str(manifest), "--artifact-dir", str(blocker / "cache"))
    assert code == 1
    assert "--artifact-dir" in err and "--phd-artifact-dir" not in err
    assert "Traceback" not in err
    assert_still_serves(tmp_path, tmp_path / "cache")


def test_the_plugin_keeps_naming_its_options(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="--phd-manifest"):
        ArtifactStore(tmp_path / "nope.toml", tmp_path / "cache", tmp_path)
