from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import pytest

from phd.crucible import REDACTED, CrucibleDisk, redacted_vcr
from phd.downstairs import _region_args
from phd.errors import HarnessError
from phd.ports import PortAllocator
from sut.storage.vcr import RegionVcr, parse_volume


class FakeDownstairs:
    def __init__(self, port: int, *, encrypted: bool = False) -> None:
        self.name = f"ds{port}"
        self.host_port = port
        self.encrypted = encrypted
        self.destroyed = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.host_port}"

    def destroy(self) -> None:
        self.destroyed = True


def _disk(*, encrypted: bool = False) -> tuple[CrucibleDisk, list[FakeDownstairs]]:
    ds = [FakeDownstairs(p, encrypted=encrypted) for p in (4001, 4002, 4003)]
    alloc = PortAllocator(base=31300, index=0, size=10)
    holes = [alloc.black_hole("refused"), alloc.black_hole("silent")]
    return (CrucibleDisk("d", 1 << 30, 512, 64 << 20, ds, holes,  # type: ignore[arg-type]
                         encrypted=encrypted), ds)


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
    spare = FakeDownstairs(4004, encrypted=True)
    disk.own(spare)  # type: ignore[arg-type]
    disk.replace_downstairs(0, spare)  # type: ignore[arg-type]
    disk.set_generation(3)
    at_3 = disk.vcr()
    assert at_2["sub_volumes"][0]["gen"] == 2 and at_3["sub_volumes"][0]["gen"] == 3
    assert _key(at_2) == _key(at_3) == key, "the key changed with the generation or a replacement"
    # Only the generation and one target differ: a replacement the storage takes.
    old_opts = {k: v for k, v in at_2["sub_volumes"][0]["opts"].items() if k != "target"}
    new_opts = {k: v for k, v in at_3["sub_volumes"][0]["opts"].items() if k != "target"}
    assert old_opts == new_opts
    disk.destroy()


def test_regions_and_spares_must_match_the_disks_encryption() -> None:
    alloc = PortAllocator(base=31320, index=0, size=10)
    holes = [alloc.black_hole("refused")]
    mixed = [FakeDownstairs(4001, encrypted=True), FakeDownstairs(4002), FakeDownstairs(4003, encrypted=True)]
    with pytest.raises(HarnessError, match=r"ds4002.*not encrypted"):
        CrucibleDisk("d", 1 << 30, 512, 64 << 20, mixed, holes, encrypted=True)  # type: ignore[arg-type]
    holes[0].close()
    disk, _ = _disk(encrypted=True)
    with pytest.raises(HarnessError, match="add_downstairs"):
        disk.replace_downstairs(1, FakeDownstairs(4005))  # type: ignore[arg-type]
    disk.destroy()


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

    from phd.vm import TestVm, _Attached

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
