"""Caching, locking and atomic replacement of ``guests/tiny/build`` (fake assembler)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from guests.common.debian import DebianError, Package
from guests.tiny import build as tiny_build
from guests.tiny.assemble import Assembled
from guests.tiny.build import BuildError, Inputs, build, main, recipe_digest

INPUTS = Inputs(Package("linux-image-6.1.0-56-amd64", "6.1.192-2"), Package("busybox-static", "1"),
                Package("systemd-boot-efi", "252.39-1~deb12u2"))


class FakeAssembler:
    """Writes the recipe's output files; counts calls; can be made to fail."""

    def __init__(self, error: Exception | None = None, gate: threading.Event | None = None) -> None:
        self.calls = 0
        self.error = error
        self.gate = gate
        self._lock = threading.Lock()

    def __call__(
        self, kernel: Package, busybox: Package, work: Path, staging: Path, *, cmdline: str, stub: Package
    ) -> Assembled:
        with self._lock:
            self.calls += 1
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.error is not None:
            (staging / "vmlinuz").write_bytes(b"half")
            raise self.error
        for name in ("vmlinuz", "vmlinux", "initrd.img", "boot.raw"):
            (staging / name).write_bytes(f"{name} {kernel} {stub}".encode())
        (staging / "cmdline").write_text(cmdline + "\n")
        return Assembled(kernel_version="6.1.0-56-amd64", kernel_file="vmlinux", modules=("virtio",),
                         busybox_applets=3)


def run(out: Path, fake: FakeAssembler, inputs: Inputs = INPUTS, **kw: Any) -> tiny_build.BuildResult:
    return build(out, resolve=lambda: inputs, assembler=fake, **kw)


def test_first_build_writes_the_recipe_interface(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    result = run(out, FakeAssembler())
    assert result.built
    assert sorted(p.name for p in out.iterdir()) == [
        "boot.raw", "cmdline", "guest.json", "initrd.img", "vmlinux", "vmlinuz"]
    meta = json.loads((out / "guest.json").read_text())
    assert meta["files"]["kernel"] == "vmlinux", "direct kernel boot must load the PVH ELF"
    assert set(meta["sha256"]) == {"vmlinuz", "vmlinux", "initrd.img", "boot.raw"}
    assert meta["login_prompt"] == "tiny login: "
    assert meta["shell_prompt"] == "root@tiny:~# "
    assert meta["kernel_version"] == "6.1.0-56-amd64"
    assert meta["busybox_version"] == "1"
    assert meta["cmdline"] == (out / "cmdline").read_text().strip()
    assert len(meta["input_hash"]) == 64
    # No staging or lock leftovers other than the lock file next to DIR.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "tiny.lock"]


def test_second_build_is_a_cache_hit(tmp_path: Path) -> None:
    fake = FakeAssembler()
    run(tmp_path / "tiny", fake)
    again = run(tmp_path / "tiny", fake)
    assert not again.built
    assert fake.calls == 1


def test_new_package_version_or_force_rebuilds(tmp_path: Path) -> None:
    fake = FakeAssembler()
    out = tmp_path / "tiny"
    first = run(out, fake).metadata["input_hash"]
    newer = Inputs(Package("linux-image-6.1.0-57-amd64", "6.1.200-1"), INPUTS.busybox, INPUTS.stub)
    second = run(out, fake, newer).metadata["input_hash"]
    assert second != first
    assert fake.calls == 2
    assert b"6.1.0-57" in (out / "vmlinuz").read_bytes()
    assert run(out, fake, newer, force=True).built
    assert fake.calls == 3


def test_recipe_digest_tracks_file_contents(tmp_path: Path) -> None:
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "rootfs" / "init").write_text("one")
    before = recipe_digest(tmp_path)
    (tmp_path / "rootfs" / "init").write_text("two")
    assert recipe_digest(tmp_path) != before
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.pyc").write_bytes(b"junk")
    assert recipe_digest(tmp_path) == recipe_digest(tmp_path)


def test_concurrent_builds_build_once(tmp_path: Path) -> None:
    gate = threading.Event()
    fake = FakeAssembler(gate=gate)
    results: list[tiny_build.BuildResult] = []
    errors: list[Exception] = []

    def worker() -> None:
        try:
            results.append(run(tmp_path / "tiny", fake))
        except Exception as exc:  # noqa: BLE001 - a thread would swallow it; asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    gate.set()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert fake.calls == 1
    assert sorted(r.built for r in results) == [False, False, True]


def test_failed_build_keeps_the_old_build_and_cleans_staging(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    run(out, FakeAssembler())
    old = (out / "vmlinuz").read_bytes()
    broken = FakeAssembler(error=DebianError("apt-get download failed: mirror down"))
    with pytest.raises(BuildError, match="mirror down"):
        run(out, broken, force=True)
    assert (out / "vmlinuz").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "tiny.lock"]


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(BuildError, match="refusing to replace"):
        run(out, FakeAssembler())
    assert (out / "thesis.tex").exists()


def test_out_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(BuildError, match="not a directory"):
        run(tmp_path / "file", FakeAssembler())


def test_unresolvable_versions_become_build_errors(tmp_path: Path) -> None:
    def resolve() -> Inputs:
        raise DebianError("apt has no installable version: run 'apt-get update'")

    with pytest.raises(BuildError, match="apt-get update"):
        build(tmp_path / "tiny", resolve=resolve, assembler=FakeAssembler())


def test_cli_reports_errors_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    assert main(["--out", str(tmp_path / "file")]) == 1
    err = capsys.readouterr().err
    assert "tiny: error:" in err
    assert "Traceback" not in err


def test_cli_requires_out(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err
