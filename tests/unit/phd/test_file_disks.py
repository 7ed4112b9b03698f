"""File disks: the copy-on-write overlay a disk-image guest boots from, and the SPEC a VM
sends for file disks and its SSH forward (no server, no VM)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from phd.artifacts.store import GuestArtifact
from phd.core.errors import HarnessError
from phd.vm.factory import create_file_disk, overlay_argv
from phd.vm.server import KernelBoot, ServerProcess
from phd.vm.testvm import FileDisk, TestVm, VmConfig

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                    reason="qemu-img is not installed: run ci/bootstrap")


def test_overlay_argv_names_an_absolute_raw_backing_file(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = overlay_argv(Path("images/disk.raw"), tmp_path / "vm.boot0.qcow2")
    assert argv == ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                    "-b", str(tmp_path / "images" / "disk.raw"), str(tmp_path / "vm.boot0.qcow2")]


def test_blank_disk_is_a_sparse_raw_file(tmp_path: Path) -> None:
    disk = create_file_disk(tmp_path / "data.raw", size_gib=2)
    assert (disk.format, disk.size_bytes, disk.base) == ("raw", 2 << 30, None)
    assert disk.path.stat().st_size == 2 << 30
    assert disk.path.stat().st_blocks == 0, "a blank disk must not allocate its size"


def test_a_disk_name_used_twice_is_an_error(tmp_path: Path) -> None:
    create_file_disk(tmp_path / "data.raw")
    with pytest.raises(HarnessError, match="already exists"):
        create_file_disk(tmp_path / "data.raw")


@needs_qemu_img
def test_overlay_reads_through_to_the_base_and_never_writes_it(tmp_path: Path) -> None:
    base = tmp_path / "disk.raw"
    base.write_bytes(b"base-data".ljust(1 << 20, b"\0"))
    base.chmod(0o444)
    disk = create_file_disk(tmp_path / "vm.boot0.qcow2", base=base)
    assert (disk.format, disk.size_bytes, disk.base) == ("qcow2", base.stat().st_size, base)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk.path)],
                                     capture_output=True, text=True, check=True).stdout)
    assert (info["format"], info["backing-filename"], info["virtual-size"]) == (
        "qcow2", str(base), base.stat().st_size)
    # A write through the overlay stays in the overlay.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4k", str(disk.path)],
                   capture_output=True, check=True)
    assert base.read_bytes()[:9] == b"base-data"
    read = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 4k", str(disk.path)],
                          capture_output=True, text=True, check=True)
    assert "Pattern verification failed" not in read.stdout


def test_missing_base_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="does not exist"):
        create_file_disk(tmp_path / "vm.boot0.qcow2", base=tmp_path / "nope.raw")


def _vm(tmp_path: Path, ssh_port: int | None) -> TestVm:
    guest = GuestArtifact("debian", tmp_path / "vmlinuz", tmp_path / "initrd.img", "console=ttyS0",
                          "debian login: ", "root@debian:~# ", disk=tmp_path / "disk.raw",
                          guest_os="debian")
    bootrom = tmp_path / "bios.bin"
    bootrom.write_bytes(b"")
    server = ServerProcess(["true"], 1, tmp_path / "run", None, bootrom=bootrom)
    return TestVm(VmConfig("vm", ssh_port=ssh_port), server, guest, tmp_path)


def test_spec_puts_the_boot_disk_first_in_pci_order(tmp_path: Path) -> None:
    vm = _vm(tmp_path, ssh_port=34567)
    boot = FileDisk("vm.boot0", tmp_path / "vm.boot0.qcow2", "qcow2", 1 << 30, base=tmp_path / "disk.raw")
    data = FileDisk("data", tmp_path / "data.raw", "raw", 1 << 30)
    vm.attach(boot, device="boot0")
    vm.attach(data, device="data0", interface="nvme")
    components = vm.spec()["components"]
    # The boot disk is the first PCI slot (vda); each disk is a device plus its backend.
    assert components["boot0"] == {"type": "virtio_disk", "component": {
        "backend_id": "boot0-backend", "pci_path": {"bus": 0, "device": 0x10, "function": 0}}}
    # v5 has no format field: the server reads qcow2 from the image.
    assert components["boot0-backend"] == {"type": "file_storage_backend", "component": {
        "path": str(boot.path), "readonly": False, "block_size": 512}}
    assert components["data0"]["type"] == "nvme_disk"
    assert components["data0"]["component"]["pci_path"]["device"] == 0x11
    assert bytes(components["data0"]["component"]["serial_number"]) == b"data0".ljust(20, b"\0")
    assert components["boot-settings"]["component"] == {"order": [{"id": "boot0"}]}
    assert components["net0"]["type"] == "virtio_nic"
    assert components["net0-backend"]["type"] == "virtio_network_backend"
    # The SSH port is the server's --forward option, never a spec field.
    assert "34567" not in json.dumps(components)
    assert vm.boot_disk is boot
    assert vm.supports_ssh


def test_no_ssh_port_means_no_nic_and_no_ssh(tmp_path: Path) -> None:
    vm = _vm(tmp_path, ssh_port=None)
    assert not [c for c in vm.spec()["components"].values() if c["type"].endswith("nic")]
    assert not vm.supports_ssh
    with pytest.raises(HarnessError, match="ssh=True"):
        vm.ssh()


def test_a_device_name_is_used_once(tmp_path: Path) -> None:
    vm = _vm(tmp_path, ssh_port=None)
    disk = FileDisk("data", tmp_path / "data.raw", "raw", 1 << 30)
    vm.attach(disk, device="data0")
    with pytest.raises(HarnessError, match="already has a disk device 'data0'"):
        vm.attach(disk, device="data0")


def test_device_paths_follow_attachment_order_per_interface(tmp_path: Path) -> None:
    vm = _vm(tmp_path, ssh_port=None)
    disks = [FileDisk(f"d{i}", tmp_path / f"d{i}.raw", "raw", 1 << 30) for i in range(4)]
    vm.attach(disks[0], device="boot0")
    vm.attach(disks[1], device="data0", interface="nvme")
    vm.attach(disks[2], device="data1")
    vm.attach(disks[3], device="data2", interface="nvme")
    assert [vm.device_path(d) for d in disks] == ["/dev/vda", "/dev/nvme0n1", "/dev/vdb", "/dev/nvme1n1"]
    with pytest.raises(HarnessError, match="not attached"):
        vm.device_path(FileDisk("x", tmp_path / "x.raw", "raw", 1 << 30))


def test_reading_the_client_before_launch_names_the_call_and_starts_nothing(tmp_path: Path) -> None:
    vm = _vm(tmp_path, ssh_port=None)
    with pytest.raises(HarnessError, match=r"call vm.launch\(\) \(or vm.ensure\(\)\) before using vm.client"):
        _ = vm.client
    assert vm.server.pid is None  # no server was started as a side effect


def test_the_vm_constructor_takes_only_its_public_fields(tmp_path: Path) -> None:
    params = [f.name for f in dataclasses.fields(TestVm) if f.init]
    assert params == ["config", "server", "guest", "test_dir"]
    vm = _vm(tmp_path, ssh_port=None)
    assert vm != _vm(tmp_path, ssh_port=None)  # a VM is itself, whatever its fields


def test_the_server_command_line_is_propolis_servers_then_ours(tmp_path: Path) -> None:
    """run <BOOTROM> <IP:PORT> as propolis-server takes it; what v5 has no field for follows
    as options of ours (the kernel boot and the SSH forward are per server: one per VM)."""
    bootrom = tmp_path / "bios.bin"
    bootrom.write_bytes(b"")
    boot = KernelBoot(tmp_path / "vmlinuz", tmp_path / "initrd.img", "console=ttyS0 quiet")
    server = ServerProcess(["srv", "--flag"], 9000, tmp_path / "run", None, regressions=("no-replay",),
                           allow_paths=[tmp_path], boot=boot, forwards=["127.0.0.1:2222:22"], bootrom=bootrom)
    assert server.argv == [
        "srv", "--flag", "run", str(bootrom), "127.0.0.1:9000", "--data-dir", str(tmp_path / "run"),
        "--kernel", str(tmp_path / "vmlinuz"), "--cmdline", "console=ttyS0 quiet",
        "--initrd", str(tmp_path / "initrd.img"), "--forward", "127.0.0.1:2222:22",
        "--allow-path", str(tmp_path), "--regression", "no-replay"]
