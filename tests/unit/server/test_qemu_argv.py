"""The QEMU command line built from a v5 instance spec (pure function)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sut.path_policy import PathPolicy
from sut.server.forwards import HostForward
from sut.server.images import open_spec_files
from sut.server.qemu import SANDBOX, KernelBoot, QemuError, RunDir, build_argv, fixed_chs
from sut.server.spec import InstanceSpec
from tests import v5


def spec(tmp_path: Path, *components: dict[str, Any]) -> InstanceSpec:
    return InstanceSpec.model_validate(v5.spec(v5.serial(), *components, cpus=2, memory_mb=512))


def pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def argv_of(spec: InstanceSpec, run: RunDir, **options: Any) -> list[str]:
    """build_argv with the spec's files opened under a policy allowing the spec's tmp dir,
    booting a kernel from ``run``'s parent directory (the server's --kernel)."""
    kernel = run.path.parent / "vmlinuz"
    kernel.write_bytes(b"k")
    roots = [Path(str(c.component.path)).parent for c in spec.components.values()
             if c.type == "file_storage_backend"]
    options.setdefault("kernel_boot", KernelBoot())
    with open_spec_files(spec, PathPolicy(roots), kernel=kernel) as files:
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
    assert pairs(argv_of(spec(tmp_path), RunDir(tmp_path / "vm"), accel="kvm"), "-accel") == ["kvm"]
    assert "-sandbox" not in argv_of(spec(tmp_path), RunDir(tmp_path / "vm"), sandbox=False)


def test_disks_map_to_blockdevs_and_devices(tmp_path: Path) -> None:
    image = tmp_path / "a.raw"
    image.write_bytes(b"\0" * 512)
    run = RunDir(tmp_path / "vm")
    argv = argv_of(spec(tmp_path,
                        v5.disk("boot", v5.file_backend(image, readonly=True), slot=0x10),
                        v5.disk("data", v5.crucible_backend("{}"), interface="nvme", slot=0x11),
                        v5.disk("more", v5.crucible_backend("{}"), slot=0x12)),
                   run, disk_sizes={"data-backend": 1 << 30, "more-backend": 1 << 30})
    blockdevs = [json.loads(b) for b in pairs(argv, "-blockdev")]
    assert blockdevs[0] == {"node-name": "boot-backend", "driver": "raw", "read-only": True,
                            "file": {"driver": "file", "filename": "/dev/fdset/1"}}
    assert pairs(argv, "-add-fd")[0].endswith(f",set=1,opaque={image}")
    assert blockdevs[1] == {"node-name": "data-backend", "driver": "nbd", "read-only": False,
                            "server": {"type": "unix", "path": str(run.disk_socket("data-backend"))}}
    devices = pairs(argv, "-device")
    # Each device at the PCI slot the spec names (PCI order is the order the guest sees).
    assert devices[0] == "virtio-blk-pci,drive=boot-backend,id=boot,bus=pcie.0,addr=0x10.0"
    assert devices[1] == "nvme,drive=data-backend,serial=data,id=data,bus=pcie.0,addr=0x11.0"
    # Crucible virtio disks get a fixed geometry so QEMU reads nothing before cont.
    assert devices[2] == ("virtio-blk-pci,drive=more-backend,id=more,bus=pcie.0,addr=0x12.0,"
                          + fixed_chs(1 << 30))


def test_fixed_chs_is_clamped() -> None:
    assert fixed_chs(512) == "cyls=1,heads=16,secs=63"
    assert fixed_chs(1 << 50).startswith("cyls=65535,")


def test_user_nic_forwards_on_loopback_only_and_restricted(tmp_path: Path) -> None:
    forward = HostForward.parse("127.0.0.1:2222:22")
    argv = argv_of(spec(tmp_path, v5.nic()), RunDir(tmp_path / "vm"), forwards=(forward,))
    assert pairs(argv, "-netdev") == ["user,id=net0-backend,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22"]
    assert pairs(argv, "-device") == ["virtio-net-pci,netdev=net0-backend,id=net0,bus=pcie.0,addr=0x8.0"]
    for bad in ("0.0.0.0:2222:22", "127.0.0.1:0:22", "localhost:2222:22", "::1:2222:22", "127.0.0.1:2222"):
        with pytest.raises(ValueError, match="loopback"):
            HostForward.parse(bad)


def test_boot_settings_set_the_boot_order(tmp_path: Path) -> None:
    image = tmp_path / "a.raw"
    image.write_bytes(b"\0" * 512)
    disks = [v5.disk(name, v5.file_backend(image), slot=slot) for name, slot in (("d0", 0x10), ("d1", 0x11))]
    argv = argv_of(spec(tmp_path, *disks, v5.boot_order("d1", "d0")), RunDir(tmp_path / "vm"),
                   kernel_boot=None)
    assert "-kernel" not in argv
    assert pairs(argv, "-device") == [
        "virtio-blk-pci,drive=d0-backend,id=d0,bus=pcie.0,addr=0x10.0,bootindex=1",
        "virtio-blk-pci,drive=d1-backend,id=d1,bus=pcie.0,addr=0x11.0,bootindex=0",
    ]


def test_boot_settings_do_not_compete_with_a_directly_booted_kernel(tmp_path: Path) -> None:
    # QEMU gives -kernel bootindex 0 itself; a disk with bootindex=0 too would not start.
    image = tmp_path / "a.raw"
    image.write_bytes(b"\0" * 512)
    argv = argv_of(spec(tmp_path, v5.disk("boot0", v5.file_backend(image)), v5.boot_order("boot0")),
                   RunDir(tmp_path / "vm"))
    assert "-kernel" in argv and not [d for d in pairs(argv, "-device") if "bootindex" in d]


def test_no_serial_port_component_means_no_uart(tmp_path: Path) -> None:
    argv = argv_of(InstanceSpec.model_validate(v5.spec()), RunDir(tmp_path / "vm"))
    assert "-serial" not in argv


def test_too_long_socket_path_is_a_clear_error(tmp_path: Path) -> None:
    run = RunDir(tmp_path / ("x" * 120))
    with pytest.raises(QemuError, match="shorter --data-dir"):
        run.check_socket_paths(["d0"])


def test_qcow2_file_disks_and_poweroff_keeps_qemu_up(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.qcow2"
    overlay.write_bytes(b"QFI\xfb" + bytes(100))  # version 0, no backing file
    # The format is read from the image (v5 has no field for it).
    argv = argv_of(spec(tmp_path, v5.disk("boot0", v5.file_backend(overlay))), RunDir(tmp_path / "vm"))
    # "backing": null - QEMU opens no backing file by a name from the image header.
    assert [json.loads(b) for b in pairs(argv, "-blockdev")] == [
        {"node-name": "boot0-backend", "driver": "qcow2", "read-only": False,
         "file": {"driver": "file", "filename": "/dev/fdset/1"}, "backing": None}]
    # A guest poweroff must leave QEMU up (paused) so the server tears down in order.
    assert "-no-shutdown" in argv
