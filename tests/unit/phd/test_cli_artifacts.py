"""`phd artifacts list | fetch | build | verify`: output, exit codes, options and env vars.

The output is not a terminal here, so the CLI prints tab-separated rows (what scripts and
CI logs get) instead of a rich table.
"""

from __future__ import annotations

import hashlib
import os
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from phd.cli import main
from tests.unit.phd.http_files import serve_files

PAYLOAD = b"a file the manifest pins\n"
SHA = hashlib.sha256(PAYLOAD).hexdigest()
FILENAME = "alpine-minirootfs-3.20.3-x86_64.tar.gz"


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A loopback port that is bound but not listening: connects are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/{FILENAME}"


@pytest.fixture
def manifest(tmp_path: Path, refusing_url: str) -> Path:
    (tmp_path / "local.bin").write_bytes(PAYLOAD)
    path = tmp_path / "artifacts.toml"
    path.write_text(textwrap.dedent(f"""
        [artifacts.local]
        kind = "file"
        source = {{ local_path = {{ path = "local.bin", sha256 = "{SHA}" }} }}

        [artifacts.alpine-minirootfs]
        kind = "file"
        source = {{ remote = {{ urls = ["{refusing_url}"], sha256 = "{SHA}" }} }}

        [artifacts.alpine]
        kind = {{ guest_os = "alpine" }}
        source = {{ recipe = "guests/alpine", inputs = {{ minirootfs = "alpine-minirootfs" }} }}
        """))
    return path


def phd(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["artifacts", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def rows(out: str) -> list[list[str]]:
    return [line.split("\t") for line in out.splitlines() if "\t" in line]


def test_list_shows_key_kind_source_and_cache_state(
    tmp_path: Path, manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    code, out, _ = phd(capsys, "list", "--manifest", str(manifest), "--artifact-dir", str(cache))
    assert code == 0
    table = rows(out)
    assert table[0] == ["key", "kind", "source", "state"]
    by_key = {row[0]: row for row in table[1:]}
    assert by_key["local"][1:] == ["file", "local_path local.bin", f"present {tmp_path / 'local.bin'}"]
    assert by_key["alpine-minirootfs"][1] == "file"
    assert by_key["alpine-minirootfs"][2].startswith("remote http://127.0.0.1:")
    assert by_key["alpine-minirootfs"][3] == "not fetched"
    assert by_key["alpine"][1:] == ["guest_os=alpine", "recipe guests/alpine minirootfs=alpine-minirootfs",
                                    "not built"]
    assert f"artifact dir: {cache}" in out

    # Once the file sits at its cache path, list says so (without hashing: that is verify).
    cached = cache / SHA / FILENAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(PAYLOAD)
    _, out, _ = phd(capsys, "list", "--manifest", str(manifest), "--artifact-dir", str(cache))
    assert {row[0]: row[3] for row in rows(out)}["alpine-minirootfs"] == f"cached {cached}"


def test_options_come_from_the_environment_like_the_plugins(
    tmp_path: Path, manifest: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PHD_MANIFEST", str(manifest))
    monkeypatch.setenv("PHD_ARTIFACT_DIR", str(tmp_path / "env-cache"))
    code, out, _ = phd(capsys, "list")
    assert code == 0
    assert f"manifest: {manifest}" in out
    assert f"artifact dir: {tmp_path / 'env-cache'}" in out
    # Given before the action, an option still wins over the environment.
    _, out, _ = phd(capsys, "--artifact-dir", str(tmp_path / "flag-cache"), "list")
    assert f"artifact dir: {tmp_path / 'flag-cache'}" in out


def test_fetch_offline_fails_with_the_how_to_and_exit_1(
    tmp_path: Path, manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    code, _, err = phd(capsys, "fetch", "--manifest", str(manifest), "--artifact-dir", str(cache))
    assert code == 1
    assert f"local: {tmp_path / 'local.bin'}" in err
    assert "alpine-minirootfs: artifact 'alpine-minirootfs' is unavailable: it cannot be downloaded" in err
    assert "[artifacts.alpine-minirootfs].source = { local_path = { path = " in err
    assert f"copy it to {cache / SHA / FILENAME}" in err
    assert "1 of 2 artifact(s) not available: alpine-minirootfs" in err


def test_fetch_of_a_recipe_key_fetches_its_inputs(
    tmp_path: Path, manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cached = tmp_path / "cache" / SHA / FILENAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(PAYLOAD)  # what a user who followed the how-to has done
    code, _, err = phd(capsys, "fetch", "alpine", "--manifest", str(manifest),
                       "--artifact-dir", str(tmp_path / "cache"))
    assert code == 0, err
    assert f"alpine-minirootfs: {cached}" in err
    assert os.stat(cached).st_mode & 0o777 == 0o444


def test_fetch_downloads_with_progress_into_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve_files(tmp_path / "served", {FILENAME: PAYLOAD}) as base:
        manifest = tmp_path / "artifacts.toml"
        manifest.write_text(f"""[artifacts.rootfs]\nkind = "file"\nsource = {{ remote = {{ urls = [
            "{base}/{FILENAME}"], sha256 = "{SHA}" }} }}\n""")
        code, _, err = phd(capsys, "fetch", "--manifest", str(manifest),
                           "--artifact-dir", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / SHA / FILENAME
    assert code == 0, err
    assert f"rootfs: {cached}" in err
    assert "fetch rootfs" in err, "the progress bar's final state is printed"
    assert cached.read_bytes() == PAYLOAD


def test_build_offline_names_the_missing_input(
    tmp_path: Path, manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = phd(capsys, "build", "alpine", "--manifest", str(manifest),
                       "--artifact-dir", str(tmp_path / "cache"))
    assert code == 1
    assert "artifact 'alpine' (its input minirootfs = 'alpine-minirootfs') is unavailable" in err
    assert "on a machine with internet access" in err


def test_verify_reports_bad_files_and_exits_1(
    tmp_path: Path, manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    args = ("--manifest", str(manifest), "--artifact-dir", str(cache))
    code, out, _ = phd(capsys, "verify", *args)
    assert code == 0
    statuses = {row[0]: row[1] for row in rows(out)[1:]}
    assert statuses == {"local": "ok", "alpine-minirootfs": "missing", "alpine": "missing"}

    cached = cache / SHA / FILENAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"corrupted copy")
    code, out, _ = phd(capsys, "verify", "alpine-minirootfs", *args)
    assert code == 1
    assert rows(out)[1][:3] == ["alpine-minirootfs", "bad", str(cached)]
    assert "1 bad file(s)" in out


def test_unknown_key_and_invalid_manifest_exit_2(
    tmp_path: Path, manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = phd(capsys, "fetch", "nope", "--manifest", str(manifest))
    assert code == 2
    assert "not in" in err and "nope" in err and "known: alpine, alpine-minirootfs, local" in err

    broken = tmp_path / "broken.toml"
    broken.write_text('[artifacts.x]\nkind = "disk"\nsource = { local_path = { path = "x" } }\n')
    code, _, err = phd(capsys, "list", "--manifest", str(broken))
    assert code == 2
    assert "artifacts.x.kind: must be \"file\" or" in err


def test_the_repository_manifest_lists_tiny_and_alpine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PHD_MANIFEST", raising=False)
    code, out, _ = phd(capsys, "list", "--artifact-dir", str(tmp_path / "empty"))
    assert code == 0
    keys = [row[0] for row in rows(out)[1:]]
    assert {"tiny", "alpine", "alpine-minirootfs"} <= set(keys)
