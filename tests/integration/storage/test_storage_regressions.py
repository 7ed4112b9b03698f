"""The storage regression switches re-create their bug, and the check that guards against the
bug notices it: each scenario runs once without the switch (the guard holds) and once with it
(the same assertion would fail, so we assert the buggy outcome instead).

Real downstairs processes, the real upstairs, qemu-io as the NBD client.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sut.storage.backend import CrucibleBackend, ReplaceRuleError, StorageFatalError

from .conftest import DownstairsFactory, make_vcr, qemu_io
from .test_backend import FAST, run, states

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("regression", [None, "no-generation-fence"])
def test_stale_generation_is_fenced_unless_the_fence_is_removed(
    regression: str | None, downstairs: DownstairsFactory, tmp_path: Path
) -> None:
    dss = [downstairs.create() for _ in range(3)]
    targets = [d.target for d in dss]
    vid = "6a1d2c3b-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
    regressions = frozenset({regression} if regression else set())

    async def main() -> None:
        vcr = make_vcr(targets, gen=3, volume_id=vid)
        current = CrucibleBackend("cur", vcr, tmp_path / "c.nbd", retry=FAST)
        try:
            await current.start_export()
            await current.activate()
            await qemu_io(current.socket_path, "write -P 0x3c 0 64k", "flush")
        finally:
            await current.close()
        stale = CrucibleBackend(
            "stale", make_vcr(targets, gen=2, volume_id=vid), tmp_path / "s.nbd", retry=FAST,
            regressions=regressions,
        )
        try:
            if regression is None:
                with pytest.raises(StorageFatalError, match="not greater than the stored extent gen"):
                    await stale.activate()
            else:
                await stale.activate()  # the bug: an older generation becomes the writer
                assert stale.status()["activation"] == "active"
        finally:
            await stale.close()

    run(main())


@pytest.mark.parametrize("regression", [None, "multi-target-replace"])
def test_two_target_replacement_is_refused_unless_allowed(
    regression: str | None, downstairs: DownstairsFactory, tmp_path: Path
) -> None:
    dss = [downstairs.create() for _ in range(5)]
    vid = "7b2e3d4c-5f6a-4b7c-9d8e-0f1a2b3c4d5e"
    regressions = frozenset({regression} if regression else set())
    sock = tmp_path / "m.nbd"

    async def main() -> None:
        backend = CrucibleBackend(
            "m", make_vcr([d.target for d in dss[:3]], volume_id=vid), sock, retry=FAST,
            regressions=regressions,
        )
        two_new = make_vcr([dss[0].target, dss[3].target, dss[4].target], gen=2, volume_id=vid)
        try:
            await backend.start_export()
            await backend.activate()
            await qemu_io(sock, "write -P 0x5d 0 64k", "flush")
            if regression is None:
                with pytest.raises(ReplaceRuleError) as caught:
                    await backend.replace(two_new)
                assert caught.value.rule == "two-targets-changed"
                assert states(backend) == ["active"] * 3
            else:
                # the bug: two downstairs in flux at once, one good copy left to repair from
                assert await backend.replace(two_new) == "Started"
                in_flux = [s for s in states(backend) if s != "active"]
                assert len(in_flux) == 2, states(backend)
        finally:
            await backend.close()

    run(main())
