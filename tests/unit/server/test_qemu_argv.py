"""The QEMU command line built from a SPEC (pure function)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sut.path_policy import PathPolicy
from sut.server.images import open_spec_files
from sut.server.qemu import SANDBOX, QemuError, RunDir, build_argv, fixed_chs
from sut.server.spec import InstanceSpec


def spec(tmp_path: Path, **extra: object) -> InstanceSpec:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    data = {"board": {"cpus": 2, "memory_mib": 512}, "boot": {"kernel": str(kernel)}, **extra}
    return InstanceSpec.model_validate(data)


def pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def argv_of(spec: InstanceSpec, run: RunDir, **options: Any) -> list[str]:
    """build_argv with the spec's files opened under a policy allowing the spec's tmp dir."""
    roots = [Path(str(spec.boot.kernel)).parent] if hasattr(spec.boot, "kernel") else []
    roots += [Path(str(d.backend.path)).parent for d in spec.disks.values() if d.backend.type == "file"]
    with open_spec_files(spec, PathPolicy(roots)) as files:
        return build_argv(spec, run, files=files, **options)


def test_vm_starts_paused_on_tcg_with_qmp_and_serial_sockets(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "vm")
    argv = argv_of(spec(tmp_path), run)
    assert "-S" in argv and "-nodefaults" in argv and "-no-user-config" in argv
    assert pairs(argv, "-sandbox") == [SANDBOX]
    assert pairs(argv, "-accel") == ["tcg"]
    assert pairs(argv, "-smp") == ["2"] and pairs(argv, "-m") == ["512"]
    chardevs = pairs(argv, "-chardev")
    assert f"socket,id=qmp,path={run.qmp_socket}" in chardevs
    assert f"socket,id=serial0,path={run.serial_socket},server=on,wait=off" in chardevs
    assert pairs(argv, "-serial") == ["chardev:serial0"]
    # The kernel is the server's open descriptor of the checked file, not a name.
    assert pairs(argv, "-kernel")[0].startswith("/proc/self/fd/")


def test_accel_can_be_selected(tmp_path: Path) -> None:
    assert pairs(argv_of(spec(tmp_path), RunDir(tmp_path), accel="kvm"), "-accel") == ["kvm"]
    assert "-sandbox" not in argv_of(spec(tmp_path), RunDir(tmp_path), sandbox=False)


def test_disks_map_to_blockdevs_and_devices(tmp_path: Path) -> None:
    image = tmp_path / "a.raw"
    image.write_bytes(b"\0" * 512)
    disks = {
        "boot": {"interface": "virtio", "backend": {"type": "file", "path": str(image), "readonly": True}},
        "data": {"interface": "nvme", "backend": {"type": "crucible", "request_json": "{}"}},
        "more": {"interface": "virtio", "backend": {"type": "crucible", "request_json": "{}"}},
    }
    run = RunDir(tmp_path / "vm")
    argv = argv_of(spec(tmp_path, disks=disks), run, disk_sizes={"data": 1 << 30, "more": 1 << 30})
    blockdevs = [json.loads(b) for b in pairs(argv, "-blockdev")]
    assert blockdevs[0] == {"node-name": "boot-backend", "driver": "raw", "read-only": True,
                            "file": {"driver": "file", "filename": "/dev/fdset/1"}}
    assert pairs(argv, "-add-fd")[0].endswith(f",set=1,opaque={image}")
    assert blockdevs[1] == {"node-name": "data-backend", "driver": "nbd", "read-only": False,
                            "server": {"type": "unix", "path": str(run.disk_socket("data"))}}
    devices = pairs(argv, "-device")
    assert devices[0] == "virtio-blk-pci,drive=boot-backend,id=boot"
    assert devices[1] == "nvme,drive=data-backend,serial=data,id=data"
    # Crucible virtio disks get a fixed geometry so QEMU reads nothing before cont.
    assert devices[2] == "virtio-blk-pci,drive=more-backend,id=more," + fixed_chs(1 << 30)


def test_fixed_chs_is_clamped() -> None:
    assert fixed_chs(512) == "cyls=1,heads=16,secs=63"
    assert fixed_chs(1 << 50).startswith("cyls=65535,")


def test_user_nic_forwards_on_loopback_only_and_restricted(tmp_path: Path) -> None:
    nics = {"net0": {"type": "user", "forwards": [{"host": "127.0.0.1:2222", "guest_port": 22}]}}
    argv = argv_of(spec(tmp_path, nics=nics), RunDir(tmp_path))
    assert pairs(argv, "-netdev") == ["user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22"]


def test_firmware_boot_sets_boot_order(tmp_path: Path) -> None:
    image = tmp_path / "a.raw"
    image.write_bytes(b"\0" * 512)
    data = {
        "boot": {"firmware": "bios", "order": ["d1", "d0"]},
        "disks": {
            name: {"interface": "virtio", "backend": {"type": "file", "path": str(image)}}
            for name in ("d0", "d1")
        },
    }
    argv = argv_of(InstanceSpec.model_validate(data), RunDir(tmp_path))
    assert "-kernel" not in argv
    assert pairs(argv, "-device") == [
        "virtio-blk-pci,drive=d0-backend,id=d0,bootindex=1",
        "virtio-blk-pci,drive=d1-backend,id=d1,bootindex=0",
    ]


def test_too_long_socket_path_is_a_clear_error(tmp_path: Path) -> None:
    run = RunDir(tmp_path / ("x" * 120))
    with pytest.raises(QemuError, match="shorter --data-dir"):
        run.check_socket_paths(["d0"])


def test_qcow2_file_disks_and_poweroff_keeps_qemu_up(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.qcow2"
    overlay.write_bytes(b"QFI\xfb" + bytes(100))  # version 0, no backing file
    disks = {"boot0": {"interface": "virtio",
                       "backend": {"type": "file", "path": str(overlay), "format": "qcow2"}}}
    argv = argv_of(spec(tmp_path, disks=disks), RunDir(tmp_path))
    # "backing": null - QEMU opens no backing file by a name from the image header.
    assert [json.loads(b) for b in pairs(argv, "-blockdev")] == [
        {"node-name": "boot0-backend", "driver": "qcow2", "read-only": False,
         "file": {"driver": "file", "filename": "/dev/fdset/1"}, "backing": None}]
    # A guest poweroff must leave QEMU up (paused) so the server tears down in order.
    assert "-no-shutdown" in argv
