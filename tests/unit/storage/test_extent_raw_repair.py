"""extent_raw's repair steps: close / flush one / reopen, the scratch directories, and opening a
region left at any point of a repair (as after a crash)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from sut.storage.extent_raw import (
    ExtentFailure,
    RawRegion,
    extent_path,
    finish_replacement,
    repair_dir,
)
from sut.storage.wire.blockhash import unencrypted_contexts
from sut.storage.wire.crucible_error import ErrorKind

BS, BLOCKS, COUNT = 512, 8, 3


def _region(root: Path) -> RawRegion:
    return RawRegion.create(root, uuid.UUID(int=1), block_size=BS, extent_size=BLOCKS, extent_count=COUNT)


def _write(region: RawRegion, start: int, fill: int, blocks: int = 1) -> bytes:
    data = bytes([fill]) * (BS * blocks)
    region.write(start, data, unencrypted_contexts(data, BS))
    return data


def _kind(exc: pytest.ExceptionInfo[ExtentFailure]) -> ErrorKind:
    return exc.value.error.kind


def test_close_reopen_and_io_while_closed(tmp_path: Path) -> None:
    with _region(tmp_path / "r") as region:
        data = _write(region, BLOCKS + 1, 7)
        assert region.close_extent(1) == (0, 0, True)
        with pytest.raises(ExtentFailure) as exc:
            region.read(BLOCKS, 2)
        assert _kind(exc) == ErrorKind.IoError
        with pytest.raises(ExtentFailure) as exc:
            _write(region, BLOCKS - 1, 1, 2)  # spans extents 0 and 1: nothing is written
        assert _kind(exc) == ErrorKind.IoError
        assert region.read(BLOCKS - 1, 1)[0] == bytes(BS)
        region.flush(3, 1)  # skips the closed, dirty extent 1
        assert region.versions()[2][1] is True
        region.reopen_extent(1)
        assert region.read(BLOCKS + 1, 1)[0] == data
        region.flush(4, 1)
        assert region.versions() == ((0, 1, 0), (0, 4, 0), (False, False, False))


@pytest.mark.parametrize(
    ("call", "kind"),
    [
        (lambda r: r.close_extent(COUNT), ErrorKind.InvalidExtent),
        (lambda r: r.flush_one(-1, 1, 1), ErrorKind.InvalidExtent),
        (lambda r: r.reopen_extent(0), ErrorKind.GenericError),
        (lambda r: r.begin_repair(0), ErrorKind.GenericError),
        (lambda r: r.commit_repair(0), ErrorKind.GenericError),
    ],
)
def test_wrong_extent_or_state(tmp_path: Path, call: object, kind: ErrorKind) -> None:
    with _region(tmp_path / "r") as region, pytest.raises(ExtentFailure) as exc:
        call(region)  # type: ignore[operator]
    assert _kind(exc) == kind


def test_flush_one_and_close_twice(tmp_path: Path) -> None:
    with _region(tmp_path / "r") as region:
        _write(region, 0, 1)
        region.flush_one(0, 9, 2)
        assert region.close_extent(0) == (2, 9, False)
        with pytest.raises(ExtentFailure) as exc:
            region.close_extent(0)
        assert _kind(exc) == ErrorKind.GenericError
        with pytest.raises(ExtentFailure) as exc:
            region.flush_one(0, 10, 2)
        assert _kind(exc) == ErrorKind.GenericError


def test_begin_and_commit_repair(tmp_path: Path) -> None:
    with _region(tmp_path / "src") as source:
        data = _write(source, 2 * BLOCKS + 3, 9)
        source.flush(5, 2)
    with _region(tmp_path / "r") as region:
        region.close_extent(2)
        copy = region.begin_repair(2)
        assert copy == repair_dir(region.dir, 2, "copy") and copy.is_dir()
        with pytest.raises(ExtentFailure) as exc:
            region.begin_repair(2)  # the copy directory exists
        assert _kind(exc) == ErrorKind.IoError
        shutil.copyfile(extent_path(source.dir, 2), copy / "002")
        region.commit_repair(2)
        for stage in ("copy", "replace", "completed"):
            assert not repair_dir(region.dir, 2, stage).exists()
        region.reopen_extent(2)
        assert region.read(2 * BLOCKS + 3, 1)[0] == data
        assert region.versions()[0][2] == 2 and region.versions()[1][2] == 5


def test_begin_repair_refuses_a_leftover_replace_and_read_only(tmp_path: Path) -> None:
    with _region(tmp_path / "r") as region:
        region.close_extent(1)
        repair_dir(region.dir, 1, "replace").mkdir()
        with pytest.raises(ExtentFailure) as exc:
            region.begin_repair(1)
        assert _kind(exc) == ErrorKind.IoError
    with RawRegion.open(tmp_path / "r", read_only=True) as ro:
        ro.close_extent(0)
        with pytest.raises(ExtentFailure) as exc:
            ro.begin_repair(0)
        assert _kind(exc) == ErrorKind.ModifyingReadOnlyRegion


def _staged(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    """A region (closed) and the bytes of a replacement for extent 1, plus extent 1's own."""
    with _region(tmp_path / "src") as source:
        _write(source, BLOCKS, 0x5A, 2)
        source.flush(3, 1)
    root = tmp_path / "r"
    _region(root).close()
    return root, extent_path(tmp_path / "src", 1).read_bytes(), extent_path(root, 1).read_bytes()


@pytest.mark.parametrize(
    "crash_after", ["copy-complete", "renamed-replace", "file-copied", "renamed-completed"]
)
def test_open_recovers_from_a_crash_at_every_step(tmp_path: Path, crash_after: str) -> None:
    root, new, old = _staged(tmp_path)
    copy, replace, completed = (repair_dir(root, 1, s) for s in ("copy", "replace", "completed"))
    copy.mkdir()
    (copy / "001").write_bytes(new)
    expected = old
    if crash_after != "copy-complete":
        os.rename(copy, replace)
        expected = new  # from here on the replacement is finished on open
    if crash_after in ("file-copied", "renamed-completed"):
        shutil.copyfile(replace / "001", extent_path(root, 1))
    if crash_after == "renamed-completed":
        os.rename(replace, completed)
    with RawRegion.open(root) as region:
        for stage_dir in (copy, replace, completed):
            assert not stage_dir.exists()
        assert extent_path(root, 1).read_bytes() == expected
        data, _ = region.read(BLOCKS, 2)
        assert data == (bytes([0x5A]) * 2 * BS if expected == new else bytes(2 * BS))


def test_read_only_open_leaves_a_replacement_alone(tmp_path: Path) -> None:
    root, new, old = _staged(tmp_path)
    replace = repair_dir(root, 1, "replace")
    replace.mkdir()
    (replace / "001").write_bytes(new)
    junk = repair_dir(root, 2, "copy")
    junk.write_bytes(b"a file, not a directory")
    with RawRegion.open(root, read_only=True):
        assert replace.is_dir() and extent_path(root, 1).read_bytes() == old
        assert not junk.exists()  # leftovers are dropped even read-only, as Crucible
    with RawRegion.open(root):
        assert not replace.exists() and extent_path(root, 1).read_bytes() == new


def test_finish_replacement_is_idempotent_up_to_its_rename(tmp_path: Path) -> None:
    root, new, _ = _staged(tmp_path)
    replace = repair_dir(root, 1, "replace")
    replace.mkdir()
    (replace / "001").write_bytes(new)
    shutil.copyfile(replace / "001", extent_path(root, 1))  # as if interrupted after the copy
    finish_replacement(root, 1)
    assert extent_path(root, 1).read_bytes() == new and not replace.exists()
    with pytest.raises(ValueError):
        repair_dir(root, 1, "../x")
