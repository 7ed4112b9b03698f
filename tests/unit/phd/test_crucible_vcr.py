from __future__ import annotations

import json
from pathlib import Path

import pytest

from phd.crucible import CrucibleDisk
from phd.errors import HarnessError
from phd.ports import PortAllocator
from sut.storage.vcr import parse_volume


class FakeDownstairs:
    def __init__(self, port: int) -> None:
        self.name = f"ds{port}"
        self.host_port = port
        self.destroyed = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.host_port}"

    def destroy(self) -> None:
        self.destroyed = True


def _disk() -> tuple[CrucibleDisk, list[FakeDownstairs]]:
    ds = [FakeDownstairs(p) for p in (4001, 4002, 4003)]
    alloc = PortAllocator(base=31300, index=0, size=10)
    holes = [alloc.black_hole("refused"), alloc.black_hole("silent")]
    return CrucibleDisk("d", 1 << 30, 512, 64 << 20, ds, holes), ds  # type: ignore[arg-type]


def test_vcr_geometry_and_targets() -> None:
    disk, _ = _disk()
    vcr = disk.vcr()
    region = vcr["sub_volumes"][0]
    assert vcr["type"] == "volume" and vcr["id"] == region["opts"]["id"]
    assert region["blocks_per_extent"] * region["extent_count"] * 512 == 1 << 30
    assert region["opts"]["target"] == ["127.0.0.1:4001", "127.0.0.1:4002", "127.0.0.1:4003"]
    assert region["gen"] == 1
    disk.destroy()


def test_black_hole_replaces_only_the_first_target_and_is_loopback() -> None:
    disk, _ = _disk()
    disk.enable_vcr_black_hole()
    targets = disk.vcr()["sub_volumes"][0]["opts"]["target"]
    assert targets[0] == disk.black_hole_address and targets[0].startswith("127.")
    assert targets[1:] == ["127.0.0.1:4002", "127.0.0.1:4003"]
    refused = targets[0]
    disk.enable_vcr_black_hole("silent")
    silent = disk.vcr()["sub_volumes"][0]["opts"]["target"][0]
    assert silent == disk.black_hole_address and silent != refused and silent.startswith("127.")
    disk.disable_vcr_black_hole()
    disk.set_generation(2)
    region = disk.vcr()["sub_volumes"][0]
    assert region["opts"]["target"][0] == "127.0.0.1:4001" and region["gen"] == 2
    disk.destroy()


def test_destroy_tears_down_every_downstairs() -> None:
    disk, ds = _disk()
    disk.destroy()
    assert all(d.destroyed for d in ds)


def test_a_read_only_parent_is_a_file_vcr_the_storage_parses(tmp_path: Path) -> None:
    parent = tmp_path / "image.raw"
    parent.write_bytes(bytes(4096))
    ds = [FakeDownstairs(p) for p in (4001, 4002, 4003)]
    disk = CrucibleDisk("boot", 1 << 30, 512, 64 << 20, ds, [], read_only_parent=parent)  # type: ignore[arg-type]
    vcr = disk.vcr()
    assert vcr["read_only_parent"]["type"] == "file"
    assert vcr["read_only_parent"]["path"] == str(parent)
    assert vcr["read_only_parent"]["block_size"] == 512
    parsed = parse_volume(json.dumps(vcr))  # the reference storage accepts it as written
    assert parsed.read_only_parent is not None
    disk.set_generation(2)  # the parent stays identical across VCRs: changing it breaks a rule
    assert disk.vcr()["read_only_parent"] == vcr["read_only_parent"]


def test_replace_downstairs_swaps_one_target_and_keeps_the_old_one_for_teardown() -> None:
    disk, ds = _disk()
    spare = FakeDownstairs(4004)
    disk.own(spare)  # type: ignore[arg-type]
    old = disk.replace_downstairs(1, spare)  # type: ignore[arg-type]
    assert old is ds[1]
    assert disk.targets() == ["127.0.0.1:4001", "127.0.0.1:4004", "127.0.0.1:4003"]
    with pytest.raises(HarnessError, match="already serves"):
        disk.replace_downstairs(0, spare)  # type: ignore[arg-type]
    with pytest.raises(HarnessError, match="not 3"):
        disk.replace_downstairs(3, FakeDownstairs(4005))  # type: ignore[arg-type]
    disk.destroy()
    assert ds[1].destroyed and spare.destroyed and all(d.destroyed for d in ds)
