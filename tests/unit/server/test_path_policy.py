"""The path policy: what a spec may name, and that the opened file is the checked file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sut.path_policy import PathPolicy, PathPolicyError, default_roots, installed, open_for_storage


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    (path / "ok.raw").write_bytes(b"ok")
    return path


@pytest.fixture
def policy(root: Path) -> PathPolicy:
    return PathPolicy([root])


def error(policy: PathPolicy, path: str) -> PathPolicyError:
    with pytest.raises(PathPolicyError) as info:
        policy.check(path, "spec.boot.kernel")
    assert str(info.value).startswith("spec.boot.kernel: ")
    return info.value


def test_regular_file_under_a_root_is_allowed(policy: PathPolicy, root: Path) -> None:
    assert policy.check(str(root / "ok.raw"), "k") == (root / "ok.raw").resolve()
    with policy.open(str(root / "ok.raw"), "k") as opened:
        assert os.read(opened.fd, 2) == b"ok"
        assert opened.path == (root / "ok.raw").resolve() and opened.size == 2
    assert opened.fd == -1


def test_outside_names_the_roots_and_the_flag(policy: PathPolicy, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_bytes(b"s")
    exc = error(policy, str(outside))
    assert exc.rule == "outside-allowed-roots"
    assert f"is outside the allowed roots [{root.resolve()}]" in str(exc)
    assert "start the server with --allow-path DIR to allow it" in str(exc)
    for path in ("/etc/shadow", "/proc/self/mem", "/dev/zero", "/sys/kernel/uevent_seqnum"):
        assert error(policy, path).rule == "outside-allowed-roots"


def test_symlinks_and_dotdot_are_resolved_before_the_check(policy: PathPolicy, root: Path,
                                                           tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_bytes(b"s")
    (root / "link.raw").symlink_to(outside)
    exc = error(policy, str(root / "link.raw"))
    assert str(outside) in str(exc) and exc.rule == "outside-allowed-roots"
    assert error(policy, f"{root}/../secret").rule == "outside-allowed-roots"
    # A root that is a prefix of another directory's name does not allow that directory.
    sibling = tmp_path / "root2"
    sibling.mkdir()
    (sibling / "f").write_bytes(b"x")
    assert error(policy, str(sibling / "f")).rule == "outside-allowed-roots"


def test_kinds_of_non_regular_files_are_named(policy: PathPolicy, root: Path) -> None:
    (root / "dir").mkdir()
    os.mkfifo(root / "fifo")
    assert "is a directory, not a regular file" in str(error(policy, str(root / "dir")))
    assert "is a FIFO, not a regular file" in str(error(policy, str(root / "fifo")))
    try:
        os.mknod(root / "zero", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    except PermissionError:
        return
    assert "is a character device, not a regular file" in str(error(policy, str(root / "zero")))


@pytest.mark.parametrize(
    ("path", "needle", "rule"),
    [
        ("relative/x", "must be absolute", "not-absolute"),
        ("/a\nb", "newline", "unsafe-characters"),
        ("/a\0b", "NUL", "unsafe-characters"),
        ("/" + "x" * 5000, "too long", "too-long"),
    ],
)
def test_malformed_paths(policy: PathPolicy, path: str, needle: str, rule: str) -> None:
    exc = error(policy, path)
    assert needle in str(exc) and exc.rule == rule


def test_missing_file_is_said_so(policy: PathPolicy, root: Path) -> None:
    exc = error(policy, str(root / "nope"))
    assert "does not exist" in str(exc) and exc.rule == "not-found"


def test_open_checks_the_opened_fd_not_the_name(root: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A swap between the check and the open is caught on the opened descriptor."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "ok.raw").write_bytes(b"s")
    sub = root / "sub"
    sub.mkdir()
    (sub / "ok.raw").write_bytes(b"ok")
    (root / "other.raw").write_bytes(b"other")
    policy = PathPolicy([root])
    real_open = os.open
    swap: dict[str, object] = {}

    def swapping_open(path: str, flags: int, *args: int) -> int:
        action = swap.pop("action", None)
        if callable(action):
            action()
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", swapping_open)
    # 1. the file is replaced by another one (a different inode) under the same name
    swap["action"] = lambda: os.replace(root / "other.raw", sub / "ok.raw")
    with pytest.raises(PathPolicyError) as info:
        policy.open(str(sub / "ok.raw"), "k")
    assert info.value.rule == "changed-while-opening"

    # 2. a directory on the way is swapped for a symlink to a directory outside the roots
    def dir_swap() -> None:
        sub.rename(root / "sub-old")
        sub.symlink_to(outside)

    swap["action"] = dir_swap
    with pytest.raises(PathPolicyError) as info:
        policy.open(str(sub / "ok.raw"), "k")
    assert info.value.rule == "outside-allowed-roots" and str(outside) in str(info.value)


def test_writable_open_and_unrestricted_policy(root: Path, tmp_path: Path) -> None:
    with PathPolicy([root]).open(str(root / "ok.raw"), "k", writable=True) as opened:
        os.pwrite(opened.fd, b"OK", 0)
    assert (root / "ok.raw").read_bytes() == b"OK"
    anywhere = PathPolicy(None)
    (tmp_path / "f").write_bytes(b"f")
    assert anywhere.check(str(tmp_path / "f"), "k") == (tmp_path / "f").resolve()
    with pytest.raises(PathPolicyError, match="directory"):
        anywhere.check(str(tmp_path), "k")


def test_storage_opens_with_the_installed_policy(policy: PathPolicy, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_bytes(b"s")
    with installed(policy):
        with pytest.raises(PathPolicyError, match="outside the allowed roots"):
            open_for_storage(str(outside), "read_only_parent.path")
        opened = open_for_storage(str(root / "ok.raw"), "read_only_parent.path")
        opened.close()
    # Without a server policy the storage library still refuses what is never a disk image.
    with pytest.raises(PathPolicyError, match="directory"):
        open_for_storage(str(tmp_path), "read_only_parent.path")
    open_for_storage(str(outside), "read_only_parent.path").close()


def test_default_roots_are_the_data_dir_and_the_artifact_cache(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHD_ARTIFACT_DIR", str(tmp_path / "cache"))
    assert default_roots(tmp_path / "data") == [tmp_path / "data", tmp_path / "cache"]
    monkeypatch.delenv("PHD_ARTIFACT_DIR")
    assert default_roots(tmp_path / "data")[1] == Path.home() / ".cache" / "phd" / "artifacts"
