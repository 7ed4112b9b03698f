"""Replacement rules over the wire: CrucibleBackend.replace with real downstairs and real NBD
I/O, every result and every rule code; then a few rules through the reference server's HTTP API.

A refused replacement must leave the backend exactly as it was: same VCR in force, same
status (activation, generation, targets, states) and working I/O.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest

from sut.storage.backend import CrucibleBackend, ReplaceRuleError, RetryPolicy
from sut.storage.vcr import FileVcr, RegionVcr, VolumeVcr, dump_vcr

from .conftest import (
    BLOCK_SIZE,
    DownstairsFactory,
    DownstairsProc,
    make_vcr,
    poll_until,
    qemu_io,
    run_bounded,
)

pytestmark = pytest.mark.integration

FAST = RetryPolicy(connect_timeout_s=1.0, reconnect_delay_s=0.2)
STEP_S = 30.0
T = TypeVar("T")


# -- VCR edits -----------------------------------------------------------------------------
def region_of(vcr: VolumeVcr) -> RegionVcr:
    region = vcr.sub_volumes[0]
    assert isinstance(region, RegionVcr)
    return region


def with_region(vcr: VolumeVcr, **changes: Any) -> VolumeVcr:
    return vcr.model_copy(update={"sub_volumes": [region_of(vcr).model_copy(update=changes)]})


def with_opts(vcr: VolumeVcr, **changes: Any) -> VolumeVcr:
    region = region_of(vcr)
    return with_region(vcr, opts=region.opts.model_copy(update=changes))


def with_targets(vcr: VolumeVcr, targets: list[str], gen: int | None = None) -> VolumeVcr:
    new = with_opts(vcr, target=targets)
    return with_region(new, gen=region_of(vcr).gen if gen is None else gen)


def bumped(vcr: VolumeVcr) -> int:
    return region_of(vcr).gen + 1


def parent_file(path: str) -> FileVcr:
    return FileVcr(id="7d3c2b1a-0f9e-4d8c-b7a6-958473625140", block_size=BLOCK_SIZE, path=path)


KEY = base64.b64encode(bytes(range(32))).decode()
Edit = Callable[[VolumeVcr], VolumeVcr]


@dataclass(frozen=True)
class RuleCase:
    name: str
    rule: str
    edit: Edit
    needs_parent: bool = False  # run against the backend that has a read-only parent


RULE_CASES = [
    RuleCase("volume-id", "volume-id-changed", lambda v: v.model_copy(update={"id": str(uuid.uuid4())})),
    RuleCase(
        "block-size",
        "block-size-changed",
        # the region must follow, or the VCR is invalid before any rule is checked
        lambda v: with_region(v, block_size=4096).model_copy(update={"block_size": 4096}),
    ),
    RuleCase(
        "sub-volume-added",
        "sub-volume-count-changed",
        lambda v: v.model_copy(update={"sub_volumes": [region_of(v), region_of(v)]}),
    ),
    RuleCase(
        "parent-added",
        "read-only-parent-added",
        lambda v: v.model_copy(update={"read_only_parent": parent_file("/nonexistent/parent.raw")}),
    ),
    RuleCase(
        "parent-changed",
        "read-only-parent-changed",
        lambda v: v.model_copy(update={"read_only_parent": parent_file("/nonexistent/other.raw")}),
        needs_parent=True,
    ),
    RuleCase(
        "blocks-per-extent",
        "geometry-changed",
        lambda v: with_region(v, blocks_per_extent=region_of(v).blocks_per_extent * 2),
    ),
    RuleCase(
        "extent-count",
        "geometry-changed",
        lambda v: with_region(v, extent_count=region_of(v).extent_count + 1),
    ),
    RuleCase("generation-lower", "generation-lower", lambda v: with_region(v, gen=region_of(v).gen - 1)),
    RuleCase("opts-lossy", "opts-changed", lambda v: with_opts(v, lossy=not region_of(v).opts.lossy)),
    RuleCase("opts-read-only", "opts-changed", lambda v: with_opts(v, read_only=True)),
    RuleCase("opts-flush-timeout", "opts-changed", lambda v: with_opts(v, flush_timeout=7.5)),
    RuleCase("opts-key", "opts-changed", lambda v: with_opts(v, key=KEY)),
    RuleCase("opts-id", "upstairs-id-changed", lambda v: with_opts(v, id=str(uuid.uuid4()))),
    RuleCase(
        "two-targets",
        "two-targets-changed",
        lambda v: with_targets(v, ["127.0.0.1:1", "127.0.0.1:2", region_of(v).opts.target[2]], bumped(v)),
    ),
    # a target change hidden behind a rule: the rule wins, the target is not touched
    RuleCase(
        "target-and-volume-id",
        "volume-id-changed",
        lambda v: with_targets(v, ["127.0.0.1:1", *region_of(v).opts.target[1:]], bumped(v)).model_copy(
            update={"id": str(uuid.uuid4())}
        ),
    ),
    RuleCase("identical", "no-change", lambda v: v),
]


# -- shared backends: one event loop for the module, driven with run_until_complete -------------
@dataclass
class Shared:
    loop: asyncio.AbstractEventLoop
    backend: CrucibleBackend
    dss: list[DownstairsProc]
    io_count: int = 0

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout_s))

    def snapshot(self) -> tuple[str, dict[str, object]]:
        status = self.backend.status()
        downstairs = [
            {k: d[k] for k in ("target", "state", "connect_attempts")}
            for d in cast(list[dict[str, Any]], status["downstairs"])
        ]
        return dump_vcr(self.backend.vcr), {
            "activation": status["activation"],
            "generation": status["generation"],
            "downstairs": downstairs,
        }

    def io_works(self) -> None:
        # a different pattern and place each time, so an earlier check cannot pass this one
        self.io_count += 1
        byte, offset = 0x20 + self.io_count, (self.io_count % 32) * 65536
        self.run(
            qemu_io(
                self.backend.socket_path,
                f"write -P {byte} {offset} 64k",
                "flush",
                f"read -P {byte} {offset} 64k",
            )
        )


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _shared(loop: asyncio.AbstractEventLoop, root: Path, *, parent: bool) -> Iterator[Shared]:
    factory = DownstairsFactory(root)
    backend: CrucibleBackend | None = None
    try:
        dss = [factory.create() for _ in range(3)]
        parent_path = None
        if parent:
            parent_path = root / "parent.raw"
            parent_path.write_bytes(b"\x7e" * 65536)
        # gen 2, so the generation-lower case has a valid lower generation (1) to send
        parent_arg = None if parent_path is None else str(parent_path)
        vcr = make_vcr([d.target for d in dss], gen=2, parent=parent_arg)
        backend = CrucibleBackend("rules", vcr, root / "r.nbd", retry=FAST)
        shared = Shared(loop, backend, dss)
        shared.run(backend.start_export())
        shared.run(backend.activate())
        yield shared
    finally:
        try:
            if backend is not None:
                loop.run_until_complete(backend.close())
        finally:
            factory.close()


@pytest.fixture(scope="module")
def plain(loop: asyncio.AbstractEventLoop, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    yield from _shared(loop, tmp_path_factory.mktemp("plain"), parent=False)


@pytest.fixture(scope="module")
def with_parent(
    loop: asyncio.AbstractEventLoop, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Shared]:
    yield from _shared(loop, tmp_path_factory.mktemp("parent"), parent=True)


@pytest.mark.parametrize("case", RULE_CASES, ids=[c.name for c in RULE_CASES])
def test_rule_is_refused_and_backend_unchanged(case: RuleCase, request: pytest.FixtureRequest) -> None:
    shared = cast(Shared, request.getfixturevalue("with_parent" if case.needs_parent else "plain"))
    before = shared.snapshot()
    new_json = dump_vcr(case.edit(shared.backend.vcr))
    with pytest.raises(ReplaceRuleError) as caught:
        shared.run(shared.backend.replace(new_json))
    assert caught.value.rule == case.rule, str(caught.value)
    assert f"(rule: {case.rule})" in str(caught.value)
    assert shared.snapshot() == before
    shared.io_works()
    assert shared.snapshot()[1]["downstairs"] == before[1]["downstairs"]


def test_invalid_vcr_is_not_a_rule_and_changes_nothing(plain: Shared) -> None:
    """Targets must be distinct, so a VCR naming one downstairs twice never reaches compare."""
    before = plain.snapshot()
    targets = region_of(plain.backend.vcr).opts.target
    duplicate = with_targets(
        plain.backend.vcr, [targets[0], targets[0], targets[2]], bumped(plain.backend.vcr)
    )
    with pytest.raises(ValueError, match="distinct") as caught:
        plain.run(plain.backend.replace(dump_vcr(duplicate)))
    assert not isinstance(caught.value, ReplaceRuleError)
    assert plain.snapshot() == before
    plain.io_works()


# -- every result of replace -------------------------------------------------------------------
def ds_states(backend: CrucibleBackend) -> list[str]:
    return [str(d["state"]) for d in cast(list[dict[str, Any]], backend.status()["downstairs"])]


def targets_of(backend: CrucibleBackend) -> list[str]:
    return [str(d["target"]) for d in cast(list[dict[str, Any]], backend.status()["downstairs"])]


def test_every_replace_result_in_one_volume_life(
    downstairs: DownstairsFactory, dead_target: str, tmp_path: Path
) -> None:
    """Started / StartedAlready / CompletedAlready / VcrMatches, before and after activation,
    and another-downstairs-in-flux while a replacement target is unreachable."""
    dss = [downstairs.create() for _ in range(4)]
    a, b, c, spare = (d.target for d in dss)
    vid = "4e5f6a7b-8c9d-4e0f-a1b2-c3d4e5f6a7b8"
    sock = tmp_path / "flow.nbd"

    def vcr(targets: list[str], gen: int) -> str:
        return make_vcr(targets, gen=gen, volume_id=vid)

    async def main() -> None:
        backend = CrucibleBackend("flow", vcr([dead_target, b, c], 1), sock, retry=FAST)
        try:
            await backend.start_export()
            activation = asyncio.create_task(backend.activate())
            await poll_until(
                lambda: ds_states(backend)[1:] == ["wait_quorum"] * 2,
                "b and c waiting",
                last=lambda: backend.status(),
            )
            # pending activation: the replacement joins it
            fixed = vcr([a, b, c], 2)
            assert await backend.replace(fixed) == "Started"
            # no await in between: the new downstairs cannot be active yet
            assert await backend.replace(fixed) == "StartedAlready"
            await asyncio.wait_for(activation, STEP_S)
            assert await backend.replace(fixed) == "CompletedAlready"
            assert await backend.replace(vcr([a, b, c], 3)) == "VcrMatches"
            assert backend.status()["generation"] == 3
            await qemu_io(sock, "write -P 0x31 0 1M", "flush")

            # active: the replacement is live-repaired
            moved = vcr([a, spare, c], 4)
            assert await backend.replace(moved) == "Started"
            assert await backend.replace(moved) == "StartedAlready"
            await poll_until(
                lambda: ds_states(backend) == ["active"] * 3,
                "the live repair",
                STEP_S,
                last=lambda: backend.status()["downstairs"],
            )
            assert await backend.replace(moved) == "CompletedAlready"
            await qemu_io(sock, "read -P 0x31 0 1M", "write -P 0x32 1M 1M", "flush")

            # a replacement onto an unreachable target stays in flux...
            stuck = vcr([a, spare, dead_target], 5)
            assert await backend.replace(stuck) == "Started"
            assert await backend.replace(stuck) == "StartedAlready"
            # ...so replacing a second downstairs is refused and changes nothing
            before = (dump_vcr(backend.vcr), targets_of(backend))
            with pytest.raises(ReplaceRuleError) as caught:
                await backend.replace(vcr([b, spare, dead_target], 6))
            assert caught.value.rule == "another-downstairs-in-flux", str(caught.value)
            assert (dump_vcr(backend.vcr), targets_of(backend)) == before
            await qemu_io(sock, "read -P 0x32 1M 1M", "write -P 0x33 2M 1M", "flush")  # two copies serve
            # replacing the one in flux is allowed (c comes back, stale, and is repaired)
            assert await backend.replace(vcr([a, spare, c], 6)) == "Started"
            await poll_until(
                lambda: ds_states(backend) == ["active"] * 3,
                "c to be repaired",
                STEP_S,
                last=lambda: backend.status()["downstairs"],
            )
            await qemu_io(sock, "read -P 0x31 0 1M", "read -P 0x32 1M 1M", "read -P 0x33 2M 1M")
            assert backend.status()["generation"] == 6
        finally:
            await backend.close()

    run_bounded(main(), 120)


def test_both_targets_present_needs_the_multi_target_regression(
    downstairs: DownstairsFactory, tmp_path: Path
) -> None:
    """both-targets-present cannot come out of a valid VCR: compare() allows one target change
    and VCR targets are distinct. The multi-target-replace regression applies several changes
    in turn, and the first of [A,B,C] -> [B,D,C] (A -> B) names a present target."""
    dss = [downstairs.create() for _ in range(3)]
    a, b, c = (d.target for d in dss)
    vid = "5f6a7b8c-9d0e-4f1a-b2c3-d4e5f6a7b8c9"
    sock = tmp_path / "both.nbd"

    async def main() -> None:
        backend = CrucibleBackend(
            "both",
            make_vcr([a, b, c], volume_id=vid),
            sock,
            retry=FAST,
            regressions=frozenset({"multi-target-replace"}),
        )
        try:
            await backend.start_export()
            await backend.activate()
            before = dump_vcr(backend.vcr)
            with pytest.raises(ReplaceRuleError) as caught:
                await backend.replace(make_vcr([b, "127.0.0.1:9", c], gen=2, volume_id=vid))
            assert caught.value.rule == "both-targets-present", str(caught.value)
            assert dump_vcr(backend.vcr) == before
            assert ds_states(backend) == ["active"] * 3
            assert targets_of(backend) == [a, b, c]
            await qemu_io(sock, "write -P 0x44 0 64k", "flush", "read -P 0x44 0 64k")
        finally:
            await backend.close()

    run_bounded(main(), 60)


# -- through the reference server's HTTP API ---------------------------------------------------
HTTP_CASES = ["volume-id", "generation-lower", "two-targets", "opts-id"]


@pytest.mark.crucible
def test_rules_through_the_server_api(downstairs: DownstairsFactory, tmp_path: Path) -> None:
    """PUT /instance/disk/{id}/vcr -> 400 with the rule; the disk keeps running."""
    from tests import v5
    from tests.integration.server.conftest import qemu_pids_for, start_server

    dss = [downstairs.create() for _ in range(3)]
    vid = str(uuid.uuid4())
    current = make_vcr([d.target for d in dss], gen=2, volume_id=vid)  # generation-lower sends 1
    current_model = VolumeVcr.model_validate_json(current)
    bid = "data-backend"
    srv = start_server(tmp_path)
    try:
        with srv.client(timeout=STEP_S) as http:
            spec = v5.spec(v5.disk("data", v5.crucible_backend(current)), v5.boot_order("data"))
            assert http.put("/instance", json=v5.ensure(spec, name="rules")).status_code == 201
            assert http.put("/instance/state", json="Run").status_code == 204
            running = wait_state(http, "Running")
            before = http.get(f"/instance/disk/{bid}/status").json()
            upstairs = before["volume_info"]["volume"]["sub_volumes"][0]["upstairs"]
            assert (upstairs["state"], upstairs["generation"]) == ("active", 2), before
            for name in HTTP_CASES:
                case = next(c for c in RULE_CASES if c.name == name)
                new = dump_vcr(case.edit(current_model))
                answer = http.put(f"/instance/disk/{bid}/vcr", json={"vcr_json": new})
                assert answer.status_code == 400, answer.text
                # The Error body's error_code carries the rule.
                assert answer.json()["error_code"] == f"ReplacementRejected:{case.rule}", answer.text
                assert f"(rule: {case.rule})" in answer.json()["message"]
            after = http.get(f"/instance/disk/{bid}/status").json()
            assert after == before
            assert http.get("/instance").json()["instance"]["state"] == "Running"
            assert wait_state(http, "Running", since=0) == running  # no state change since
            assert http.put("/instance/state", json="Stop").status_code == 204
            wait_state(http, "Destroyed", since=running + 1)
    finally:
        code = srv.close()
    assert code == 0, srv.log_path.read_text()[-3000:]
    assert qemu_pids_for(srv.data_dir) == []


def wait_state(http: httpx.Client, state: str, since: int = 1) -> int:
    """Follow the state monitor from generation ``since`` until ``state``; returns its generation."""
    gen = since
    deadline = time.monotonic() + 60
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = http.request("GET", "/instance/state-monitor", json={"gen": gen}, timeout=60).json()
        if seen["state"] == state:
            return int(seen["gen"])
        assert seen["state"] not in ("Failed", "Destroyed"), f"waiting for {state}: {seen}"
        gen = int(seen["gen"]) + 1
    raise AssertionError(f"the instance never reached {state}; last saw {seen}")
