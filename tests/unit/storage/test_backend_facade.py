"""The facade before any network I/O: parsing, status shape, replacement bookkeeping."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import pytest

from sut.storage.backend import CrucibleBackend, ReplaceRuleError, StorageError, VcrError
from sut.storage.client import RetryPolicy
from sut.storage.upstairs import Upstairs
from sut.storage.vcr import parse_volume

VID = "3f1c6a52-7f0e-4b44-9d8b-2a9f0c1e5d10"
TARGETS = ["127.0.0.1:8810", "127.0.0.1:8820", "127.0.0.1:8830"]


def vcr(targets: list[str] = TARGETS, gen: int = 1, parent: str | None = None) -> str:
    return json.dumps(
        {
            "type": "volume",
            "id": VID,
            "block_size": 512,
            "sub_volumes": [
                {
                    "type": "region",
                    "block_size": 512,
                    "blocks_per_extent": 64,
                    "extent_count": 4,
                    "gen": gen,
                    "opts": {"id": VID, "target": targets, "lossy": False, "read_only": False},
                }
            ],
            "read_only_parent": None
            if parent is None
            else {"type": "file", "id": VID, "block_size": 512, "path": parent},
        }
    )


def test_geometry_and_initial_status(tmp_path: Path) -> None:
    backend = CrucibleBackend("disk-backend", vcr(), tmp_path / "s")
    assert (backend.size_bytes, backend.block_size) == (512 * 64 * 4, 512)
    status = backend.status()
    assert status["backend_id"] == "disk-backend"
    assert status["activation"] == "inactive"
    assert status["generation"] == 1
    assert status["downstairs"] == [
        {"target": t, "state": "new", "connect_attempts": 0, "failed_attempts": 0, "last_error": None}
        for t in TARGETS
    ]
    json.dumps(status)  # JSON-able


def test_bad_vcr_and_missing_parent_are_vcr_errors(tmp_path: Path) -> None:
    with pytest.raises(VcrError, match="not valid JSON"):
        CrucibleBackend("b", "{", tmp_path / "s")
    with pytest.raises(VcrError, match=r"read_only_parent.path: cannot open"):
        CrucibleBackend("b", vcr(parent=str(tmp_path / "nope.raw")), tmp_path / "s")


def test_replace_before_activation_and_idempotent_retry(tmp_path: Path) -> None:
    async def main() -> None:
        backend = CrucibleBackend("b", vcr(), tmp_path / "s")
        new = vcr(["127.0.0.1:9999", *TARGETS[1:]], gen=2)
        assert await backend.replace(new) == "Started"
        assert backend.status()["downstairs"][0]["target"] == "127.0.0.1:9999"  # type: ignore[index]
        assert await backend.replace(new) == "StartedAlready"  # not active yet
        assert await backend.replace(vcr(["127.0.0.1:9999", *TARGETS[1:]], gen=3)) == ("VcrMatches")
        with pytest.raises(ReplaceRuleError) as info:
            await backend.replace(vcr(["127.0.0.1:1", "127.0.0.1:2", TARGETS[2]], gen=4))
        assert info.value.rule == "two-targets-changed"
        with pytest.raises(ReplaceRuleError) as info:
            await backend.replace(vcr(["127.0.0.1:9999", *TARGETS[1:]], gen=1))
        assert info.value.rule == "generation-lower"
        await backend.close()
        await backend.close()  # idempotent
        with pytest.raises(StorageError, match="closed"):
            await backend.replace(new)

    asyncio.run(main())


def test_multi_target_regression_accepts_two_changes(tmp_path: Path) -> None:
    async def main() -> None:
        backend = CrucibleBackend("b", vcr(), tmp_path / "s", regressions=frozenset({"multi-target-replace"}))
        two = vcr(["127.0.0.1:1", "127.0.0.1:2", TARGETS[2]], gen=2)
        assert await backend.replace(two) == "Started"
        downstairs = cast(list[dict[str, Any]], backend.status()["downstairs"])
        targets = [d["target"] for d in downstairs]
        assert targets == ["127.0.0.1:1", "127.0.0.1:2", TARGETS[2]]
        await backend.close()

    asyncio.run(main())


def test_replace_downstairs_outcomes() -> None:
    import logging

    async def main() -> None:
        region = parse_volume(vcr()).regions[0]
        up = Upstairs(region, read_only=False, retry=RetryPolicy(), logger=logging.getLogger())
        assert await up.replace_downstairs("127.0.0.1:1", "127.0.0.1:2") == "Missing"
        with pytest.raises(ReplaceRuleError) as info:
            await up.replace_downstairs(TARGETS[0], TARGETS[1])
        assert info.value.rule == "both-targets-present"
        assert await up.replace_downstairs(TARGETS[0], "127.0.0.1:5") == "Started"
        assert up.targets[0] == "127.0.0.1:5"

    asyncio.run(main())
