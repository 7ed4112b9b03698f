"""The plugin turns an unavailable guest into a SKIP whose reason says how to provide it,
and a file with the wrong sha256 into a failure (never a quiet skip). Runs an inner pytest
session with `pytester`; the guest's input is a loopback URL that refuses connections, so
the outcome does not depend on whether this machine is online."""

from __future__ import annotations

import hashlib
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[3]
SHA = "d4e6fd67dcf75e40c451560ac7265166c2b72a0f38ddc9aae756a7de3d1efa0c"
FILENAME = "alpine-minirootfs-3.20.3-x86_64.tar.gz"

TEST_MODULE = """
    def test_boots_alpine(vm_factory):
        vm_factory.new_vm("a", guest="alpine")
        raise AssertionError("not reached: new_vm must raise for a guest that cannot be had")
    """


@pytest.fixture
def refusing_url() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/{FILENAME}"


def inner_session(pytester: pytest.Pytester, minirootfs_source: str) -> pytest.RunResult:
    # The plugin resolves recipes against the session's rootdir; give it this repo's guests/.
    (pytester.path / "guests").symlink_to(REPO / "guests")
    manifest = pytester.path / "artifacts.toml"
    manifest.write_text(textwrap.dedent(f"""
        [artifacts.alpine-minirootfs]
        kind = "file"
        source = {minirootfs_source}

        [artifacts.alpine]
        kind = {{ guest_os = "alpine" }}
        source = {{ recipe = "guests/alpine", inputs = {{ minirootfs = "alpine-minirootfs" }} }}
        """))
    pytester.makepyfile(test_guest=textwrap.dedent(TEST_MODULE))
    return pytester.runpytest(
        "-rs", "-p", "no:cacheprovider", f"--phd-manifest={manifest}",
        f"--phd-artifact-dir={pytester.path / 'cache'}", f"--phd-tmp-dir={pytester.path / 'results'}")


def test_an_unavailable_guest_is_skipped_with_how_to_provide_it(
    pytester: pytest.Pytester, refusing_url: str
) -> None:
    result = inner_session(pytester, f'{{ remote = {{ urls = ["{refusing_url}"], sha256 = "{SHA}" }} }}')
    result.assert_outcomes(skipped=1)
    cache_path = pytester.path / "cache" / SHA / FILENAME
    result.stdout.fnmatch_lines([
        "*short test summary info*",
        "SKIPPED [[]1[]] *artifact 'alpine' (its input minirootfs = 'alpine-minirootfs') is unavailable: "
        f"it cannot be downloaded here ({refusing_url}: ConnectError*"
        f"download {refusing_url} (sha256 {SHA}) on a machine with internet access, "
        f"then either copy it to {cache_path}*"
        "or set [[]artifacts.alpine-minirootfs[]].source = { local_path = { path = *",
    ])


def test_a_wrong_sha256_fails_the_test_instead_of_skipping(pytester: pytest.Pytester) -> None:
    tarball = pytester.path / FILENAME
    tarball.write_bytes(b"not the tarball the manifest pins")
    actual = hashlib.sha256(tarball.read_bytes()).hexdigest()
    result = inner_session(pytester, f'{{ local_path = {{ path = "{FILENAME}", sha256 = "{SHA}" }} }}')
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        f"*ArtifactHashMismatch: artifact 'alpine-minirootfs': {tarball} has sha256 {actual}, "
        f"the manifest expects {SHA}*",
    ])
