from __future__ import annotations

from phd.crucible import CrucibleDisk
from phd.ports import PortAllocator


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
