"""The firmware-bootable disk layout (guests/common/efi.py) without running a tool."""

from __future__ import annotations

from pathlib import Path

import pytest

from guests.common import efi

MIB = 1 << 20


def test_partitions_sit_on_mib_boundaries_with_room_for_both_gpt_copies() -> None:
    parts = [efi.Partition("esp", efi.ESP_TYPE, 16 * MIB), efi.Partition("root", efi.LINUX_TYPE, 100 * MIB)]
    offsets, size = efi.disk_layout(parts)
    assert offsets == [MIB, 17 * MIB]
    assert size == 118 * MIB  # 1 MiB before (MBR, primary GPT), 1 MiB after (backup GPT)


@pytest.mark.parametrize("size", [0, -MIB, MIB + 512])
def test_a_partition_must_be_whole_mib(size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 1 MiB"):
        efi.Partition("esp", efi.ESP_TYPE, size)


def test_the_sfdisk_script_is_reproducible_and_names_every_partition() -> None:
    parts = [efi.Partition("esp", efi.ESP_TYPE, 16 * MIB), efi.Partition("root", efi.LINUX_TYPE, 32 * MIB)]
    script = efi.sfdisk_script("debian", parts)
    assert script == efi.sfdisk_script("debian", parts), "same inputs, same layout"
    assert script != efi.sfdisk_script("tiny", parts), "another disk gets other GUIDs"
    lines = script.splitlines()
    assert lines[0] == "label: gpt" and lines[1] == f"label-id: {efi.guid('debian')}"
    assert lines[4] == (f'start=2048, size=32768, type={efi.ESP_TYPE}, uuid={efi.guid("debian", "esp")}, '
                        'name="esp"')
    assert lines[5].startswith(f"start={17 * 2048}, size={32 * 2048}, type={efi.LINUX_TYPE}")


def test_the_esp_has_room_for_its_payload_and_fat16() -> None:
    assert efi.esp_size_for(1) == 16 * MIB
    big = efi.esp_size_for(20 * MIB)
    assert big % MIB == 0 and big >= 20 * MIB * 9 // 8 + 2 * MIB


def test_the_initrd_section_lands_after_the_kernel_whatever_its_size(tmp_path: Path) -> None:
    files = {}
    for name, size in (("stub", 10), ("kernel", 17 * MIB + 5), ("initrd", 3), ("cmdline", 3), ("osrel", 3)):
        files[name] = tmp_path / name
        files[name].write_bytes(b"\0" * size)
    argv = efi.uki_argv(files["stub"], files["kernel"], files["initrd"], files["cmdline"], files["osrel"],
                        tmp_path / "out.efi")
    vmas = dict(arg.split("=") for arg in argv[4:-2:4])
    assert argv[0] == "objcopy" and argv[-2:] == [str(files["stub"]), str(tmp_path / "out.efi")]
    linux, initrd = int(vmas[".linux"], 16), int(vmas[".initrd"], 16)
    assert initrd >= linux + 17 * MIB + 5 and initrd % MIB == 0
    assert int(vmas[".osrel"], 16) < int(vmas[".cmdline"], 16) < linux
