from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import pytest

from phd.core.errors import HarnessError
from phd.core.ports import PortAllocator
from phd.storage.crucible import REDACTED, CrucibleDisk, redacted_vcr
from phd.storage.downstairs import DsState, _region_args
from phd.storage.dsc import DownstairsSet, RegionGeometry
from sut.storage.vcr import RegionVcr, parse_volume
from tests.unit.phd.fake_downstairs import DISK_GEOMETRY, Fakes, fake_disk


def _disk(*, encrypted: bool = False) -> tuple[CrucibleDisk, Fakes]:
    alloc = PortAllocator(base=31300, index=0, size=10)
    holes = [alloc.black_hole("refused"), alloc.black_hole("silent")]
    geometry = RegionGeometry.of_size(1 << 30, extent_bytes=64 << 20, encrypted=encrypted)
    return fake_disk(holes=holes, geometry=geometry)


def _key(vcr: dict[str, object]) -> object:
    return vcr["sub_volumes"][0]["opts"]["key"]  # type: ignore[index]


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
    disk, made = _disk()
    disk.destroy()
    assert [ds.state for ds in made.made] == [DsState.DESTROYED] * 3
    disk.destroy()  # idempotent


def test_a_read_only_parent_is_a_file_vcr_the_storage_parses(tmp_path: Path) -> None:
    parent = tmp_path / "image.raw"
    parent.write_bytes(bytes(4096))
    disk, _ = fake_disk("boot", read_only_parent=parent)
    vcr = disk.vcr()
    assert vcr["read_only_parent"]["type"] == "file"
    assert vcr["read_only_parent"]["path"] == str(parent)
    assert vcr["read_only_parent"]["block_size"] == 512
    parsed = parse_volume(json.dumps(vcr))  # the reference storage accepts it as written
    assert parsed.read_only_parent is not None
    disk.set_generation(2)  # the parent stays identical across VCRs: changing it breaks a rule
    assert disk.vcr()["read_only_parent"] == vcr["read_only_parent"]


def test_replace_downstairs_swaps_one_target_and_keeps_the_old_one_for_teardown() -> None:
    disk, made = _disk()
    spare = disk.add_spare(4004)
    assert spare.state is DsState.RUNNING and spare.address == "127.0.0.1:4004"
    old = disk.replace_downstairs(1, spare)
    assert old is made.made[1]
    assert disk.targets() == ["127.0.0.1:4001", "127.0.0.1:4004", "127.0.0.1:4003"]
    with pytest.raises(HarnessError, match="already serves"):
        disk.replace_downstairs(0, spare)
    with pytest.raises(HarnessError, match="not 3"):
        disk.replace_downstairs(3, disk.add_spare(4005))
    disk.destroy()
    assert [ds.state for ds in made.made] == [DsState.DESTROYED] * 5, "old ones and spares go too"


def test_a_spare_has_the_disks_geometry_and_a_region_of_its_own() -> None:
    disk, made = _disk(encrypted=True)
    disk.add_spare(4004)
    regions = [ds.region for ds in made.made]
    assert all(r is not None and r[1:] == (512, (64 << 20) // 512, 16, True) for r in regions)
    assert len({r[0] for r in regions if r is not None}) == 4, "each region has its own uuid"
    assert (disk.size_bytes, disk.block_size, disk.blocks_per_extent, disk.extent_count) == \
        (1 << 30, 512, 131072, 16)
    disk.destroy()


# --- encryption ------------------------------------------------------------------------------
def test_a_plain_disk_has_no_key() -> None:
    disk, _ = _disk()
    assert not disk.encrypted and _key(disk.vcr()) is None
    disk.destroy()


def test_an_encrypted_disk_carries_base64_of_32_random_bytes_that_the_storage_parses() -> None:
    disk, _ = _disk(encrypted=True)
    vcr = disk.vcr()
    key = _key(vcr)
    assert isinstance(key, str)
    try:
        raw = base64.b64decode(key, validate=True)
    except binascii.Error as exc:
        pytest.fail(f"the VCR key {len(key)} chars is not base64: {exc}")
    assert len(raw) == 32, f"the key is {len(raw)} bytes, not 32 (AES-256)"
    assert base64.b64encode(raw).decode() == key  # canonical, padded
    parsed = parse_volume(json.dumps(vcr)).sub_volumes[0]  # the storage accepts it as written
    assert isinstance(parsed, RegionVcr) and parsed.opts.key == key
    other, _ = _disk(encrypted=True)
    assert _key(other.vcr()) != key, "two disks share a key: it is not random"
    disk.destroy()
    other.destroy()


def test_the_key_stays_the_same_for_the_disks_life() -> None:
    disk, _ = _disk(encrypted=True)
    key = _key(disk.vcr())
    disk.set_generation(2)
    disk.enable_vcr_black_hole()
    at_2 = disk.vcr()
    disk.disable_vcr_black_hole()
    disk.replace_downstairs(0, disk.add_spare(4004))
    disk.set_generation(3)
    at_3 = disk.vcr()
    assert at_2["sub_volumes"][0]["gen"] == 2 and at_3["sub_volumes"][0]["gen"] == 3
    assert _key(at_2) == _key(at_3) == key, "the key changed with the generation or a replacement"
    # Only the generation and one target differ: a replacement the storage takes.
    old_opts = {k: v for k, v in at_2["sub_volumes"][0]["opts"].items() if k != "target"}
    new_opts = {k: v for k, v in at_3["sub_volumes"][0]["opts"].items() if k != "target"}
    assert old_opts == new_opts
    disk.destroy()


def test_only_a_member_of_the_disks_own_set_can_replace_one_of_its_downstairs() -> None:
    disk, _ = _disk(encrypted=True)
    other, _ = fake_disk("other", (5001, 5002, 5003))  # plain regions: another geometry
    with pytest.raises(HarnessError, match="add_downstairs"):
        disk.replace_downstairs(1, other.downstairs[0])
    disk.destroy()
    other.destroy()


def test_a_disk_needs_three_downstairs() -> None:
    dss = DownstairsSet(Fakes(), [1, 2], count=2, geometry=DISK_GEOMETRY).open()
    with pytest.raises(HarnessError, match="exactly 3"):
        CrucibleDisk("d", dss, [])
    dss.close()


def test_redacted_vcr_hides_the_key_and_leaves_the_vcr_alone() -> None:
    disk, _ = _disk(encrypted=True)
    vcr = disk.vcr()
    key = _key(vcr)
    assert isinstance(key, str)
    shown = redacted_vcr(vcr)
    assert _key(shown) == REDACTED and key not in json.dumps(shown)
    assert _key(vcr) == key, "redacting changed the VCR that is sent"
    assert {**shown, "sub_volumes": None} == {**vcr, "sub_volumes": None}
    assert key not in repr(disk)
    disk.destroy()
    plain, _ = _disk()
    assert _key(redacted_vcr(plain.vcr())) is None, "a plain VCR has nothing to redact"
    plain.destroy()


def test_region_create_args_carry_encrypted_only_when_asked() -> None:
    plain = _region_args("u", 512, 8, 2, "/data")
    assert "--encrypted" not in plain
    assert _region_args("u", 512, 8, 2, "/data", encrypted=True) == [*plain, "--encrypted"]


def test_the_vcr_record_in_the_results_directory_is_redacted(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from phd.vm.testvm import TestVm, _Attached

    disk, _ = _disk(encrypted=True)
    vcr = disk.vcr()
    key = _key(vcr)
    assert isinstance(key, str)
    vm = SimpleNamespace(test_dir=tmp_path, config=SimpleNamespace(name="v"))
    TestVm._record_vcr(vm, _Attached("data0", "virtio", disk), vcr)  # type: ignore[arg-type]
    record = (tmp_path / "v.data0.vcr.jsonl").read_text()
    assert key not in record and _key(json.loads(record)) == REDACTED
    assert _key(vcr) == key
    disk.destroy()
