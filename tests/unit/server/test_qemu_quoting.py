"""Every QEMU option value built from input goes through one quoting path (style principle 16)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sut.path_policy import PathPolicy, PathPolicyError
from sut.server.images import open_spec_files
from sut.server.qemu import KernelBoot, QemuOptionError, RunDir, build_argv, qemu_opt
from sut.server.spec import InstanceSpec
from tests import v5


@pytest.mark.parametrize(
    ("value", "quoted"),
    [("plain", "plain"), ("a,b", "a,,b"), (",,", ",,,,"), ("/x/r,read-only=off", "/x/r,,read-only=off"),
     ("", "")],
)
def test_qemu_opt_doubles_commas(value: str, quoted: str) -> None:
    assert qemu_opt(value) == quoted


@pytest.mark.parametrize("value", ["a\0b", "a\nb", "a\rb"])
def test_qemu_opt_refuses_what_cannot_be_quoted(value: str) -> None:
    with pytest.raises(QemuOptionError, match=r"NUL|newline"):
        qemu_opt(value)


def pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_comma_laden_paths_cannot_inject_options(tmp_path: Path) -> None:
    root = tmp_path / "r,oot"
    root.mkdir()
    disk = root / "disk.raw"
    disk.write_bytes(b"\0" * 512)
    evil = root / f"x,read-only=off,file.filename={disk}"
    evil.parent.mkdir(parents=True)
    evil.write_bytes(b"\0" * 512)
    kernel = root / "k,ernel"
    kernel.write_bytes(b"k")
    spec = InstanceSpec.model_validate(v5.spec(v5.disk("d0", v5.file_backend(evil, readonly=True))))
    run = RunDir(tmp_path / "data,dir=x" / "vm")
    with open_spec_files(spec, PathPolicy([root]), kernel=kernel, initrd=kernel) as files:
        argv = build_argv(spec, run, files=files, kernel_boot=KernelBoot())
        blockdev = json.loads(pairs(argv, "-blockdev")[0])
        assert blockdev["read-only"] is True
        inner = blockdev["file"]
        assert inner["driver"] == "file" and inner["filename"].startswith("/dev/fdset/")
        fdset = int(inner["filename"].removeprefix("/dev/fdset/"))
        add_fd = [a for a in pairs(argv, "-add-fd") if f",set={fdset}," in a]
        assert len(add_fd) == 1 and f"opaque={str(evil).replace(',', ',,')}" in add_fd[0]
        # The fd QEMU gets is the file the policy checked, opened read-only.
        fd = int(add_fd[0].split(",")[0].removeprefix("fd="))
        assert fd in files.fds
        assert Path(f"/proc/self/fd/{fd}").resolve() == evil.resolve()
        assert pairs(argv, "-kernel")[0] == f"/proc/self/fd/{files.kernel.fd}"  # type: ignore[union-attr]
    chardevs = pairs(argv, "-chardev")
    assert f"socket,id=qmp,path={str(run.qmp_socket).replace(',', ',,')}" in chardevs
    assert any(c.startswith("socket,id=serial0,path=") and "data,,dir=x" in c for c in chardevs)


def test_qcow2_backing_chain_is_opened_and_passed_explicitly(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 65536)
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw", str(mid)],
                   check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(mid), str(top)],
                   check=True)
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    spec = InstanceSpec.model_validate(v5.spec(v5.disk("d0", v5.file_backend(top))))
    with open_spec_files(spec, PathPolicy([tmp_path])) as files:
        chain = files.disks["d0-backend"]
        assert [layer.file.path for layer in chain.layers] == [top, mid, base]
        assert [layer.format for layer in chain.layers] == ["qcow2", "qcow2", "raw"]
        blockdev = json.loads(pairs(build_argv(spec, RunDir(tmp_path / "vm"), files=files), "-blockdev")[0])
    assert blockdev["driver"] == "qcow2" and blockdev["backing"]["driver"] == "qcow2"
    assert blockdev["backing"]["backing"]["driver"] == "raw"
    assert "backing" not in blockdev["backing"]["backing"]
    # A backing file outside the allowed roots: refused, naming the backing file and the flag.
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    overlay = allowed / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(overlay)],
                   check=True)
    (allowed / "k").write_bytes(b"k")
    spec = InstanceSpec.model_validate(v5.spec(v5.disk("d0", v5.file_backend(overlay))))
    with pytest.raises(PathPolicyError, match=r"backing file .*outside the allowed roots.*--allow-path"):
        open_spec_files(spec, PathPolicy([allowed])).close()


def test_a_data_dir_with_a_newline_is_refused_before_qemu(tmp_path: Path) -> None:
    with pytest.raises(QemuOptionError, match="newline"):
        RunDir(tmp_path / "a\nb" / "vm").check_socket_paths(["d0"])
