"""The downstairs controller's rules, against fake members (no process, no Docker).

The lifecycle rules are the real `_Lifecycle` code; only the primitives are simulated. The
same operations run against real processes and containers in tests/integration/phd/.
"""

from __future__ import annotations

import json
import random
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phd.cli import main
from phd.core.errors import HarnessError
from phd.storage.downstairs import DsState, _listening_count
from phd.storage.dsc import ControlServer, DownstairsSet, RegionGeometry, parse_loopback
from tests.unit.phd.fake_downstairs import FakeDs, Fakes, now

G = RegionGeometry(block_size=512, extent_size=8, extent_count=2)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 0.5
        return self.now


@pytest.fixture
def fakes() -> Fakes:
    return Fakes()


@pytest.fixture
def dss(fakes: Fakes) -> Iterator[DownstairsSet]:
    with DownstairsSet(fakes, [5000, 5001, 5002, 5003], geometry=G, clock=Clock()) as opened:
        yield opened


# --- one member's lifecycle -----------------------------------------------------------------
def test_an_encrypted_geometry_creates_every_region_encrypted(fakes: Fakes) -> None:
    geometry = RegionGeometry(block_size=512, extent_size=8, extent_count=2, encrypted=True)
    with DownstairsSet(fakes, [5000, 5001, 5002, 5003], geometry=geometry, clock=Clock()) as dss:
        dss.add()
        assert [ds.region and ds.region[1:] for ds in fakes.made] == [(512, 8, 2, True)] * 4
        assert all(ds.encrypted for ds in fakes.made)
    plain = FakeDs(0, 1)
    plain.create_region("u", 512, 8, 2)
    assert plain.region == ("u", 512, 8, 2, False) and not plain.encrypted


def test_start_needs_a_region_first() -> None:
    ds = FakeDs(0, 1)
    with pytest.raises(HarnessError, match="create_region"):
        ds.start()


def test_operations_follow_the_state_rules() -> None:
    ds = FakeDs(0, 1)
    ds.stop()
    ds.kill()  # nothing runs yet: both are no-ops
    assert ds.calls == []
    ds.create_region("u", 512, 8, 2)
    with pytest.raises(HarnessError, match="already has a region"):
        ds.create_region("u", 512, 8, 2)
    with pytest.raises(HarnessError, match="cannot pause downstairs ds0: it is new"):
        ds.pause()
    ds.start()
    ds.start()  # idempotent
    assert ds.calls == ["create", "launch"]
    ds.pause()
    ds.pause()  # idempotent
    with pytest.raises(HarnessError, match="is paused: resume"):
        ds.start()
    ds.stop()  # a paused member is thawed for its SIGTERM
    assert ds.calls[-1] == "terminate-paused"
    assert now(ds) is DsState.STOPPED
    with pytest.raises(HarnessError, match="cannot resume downstairs ds0: it is stopped"):
        ds.resume()
    ds.restart()
    assert now(ds) is DsState.RUNNING
    ds.kill()
    ds.kill()
    assert ds.calls.count("sigkill") == 1


@pytest.mark.parametrize("state", ["new", "running", "paused", "stopped"])
def test_destroy_works_in_every_state_and_twice(state: str) -> None:
    ds = FakeDs(0, 1)
    ds.create_region("u", 512, 8, 2)
    if state != "new":
        ds.start()
    if state == "paused":
        ds.pause()
    if state == "stopped":
        ds.kill()
    ds.destroy()
    ds.destroy()
    assert ds.state is DsState.DESTROYED
    assert ds.calls.count("teardown") == 1
    for op in (ds.start, ds.stop, ds.kill, ds.pause, ds.resume, ds.restart):
        with pytest.raises(HarnessError, match="was destroyed"):
            op()


def test_listening_count_reads_json_events_only() -> None:
    log = "\n".join([json.dumps({"event": "listening"}), "not json listening",
                     json.dumps({"event": "connection_lost", "why": "listening"}),
                     json.dumps({"event": "listening"})])
    assert _listening_count(log) == 2


# --- the set --------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ports": [1, 2]}, "3 members need 3 ports"),
    ({"ports": [1, 1, 2]}, "distinct"),
    ({"ports": [1], "count": 0}, "at least one member"),
])
def test_set_arguments_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(HarnessError, match=match):
        DownstairsSet(Fakes(), **kwargs)


@pytest.mark.parametrize(("geometry", "match"), [
    ({"block_size": 1000}, "power of two"),
    ({"extent_count": 0}, "positive"),
])
def test_geometry_is_checked(geometry: dict[str, Any], match: str) -> None:
    with pytest.raises(HarnessError, match=match):
        RegionGeometry(**geometry)


def test_open_makes_regions_with_one_geometry_and_own_uuids(dss: DownstairsSet, fakes: Fakes) -> None:
    assert dss.targets == ["127.0.0.1:5000", "127.0.0.1:5001", "127.0.0.1:5002"]
    assert dss.states() == [DsState.RUNNING] * 3
    regions = [ds.region for ds in fakes.made]
    assert all(r is not None and r[1:] == (512, 8, 2, False) for r in regions)
    assert len({r[0] for r in regions if r is not None}) == 3
    assert {dss.region_uuid(i) for i in range(3)} == {r[0] for r in regions if r is not None}


def test_actions_are_logged_with_time_and_member(dss: DownstairsSet) -> None:
    dss.kill(1)
    with pytest.raises(HarnessError, match="cannot pause"):
        dss.pause(1)
    dss.start(1)
    tail = [(s.action, s.member) for s in dss.steps[-3:]]
    assert tail[0] == ("kill", 1)
    assert tail[1][0].startswith("pause FAILED: cannot pause downstairs ds1")
    assert tail[2] == ("start", 1)
    times = [s.at_s for s in dss.steps]
    assert times == sorted(times)
    assert "ds1 kill" in dss.format_steps()


def test_member_index_and_action_are_checked(dss: DownstairsSet) -> None:
    with pytest.raises(HarnessError, match=r"no member 7: this set has members 0\.\.2"):
        dss.kill(7)
    with pytest.raises(HarnessError, match="unknown action 'nap'"):
        dss.act("nap", 0)


def test_random_fault_only_hits_running_members(dss: DownstairsSet) -> None:
    dss.kill(0)
    dss.pause(2)
    rng = random.Random(7)
    what = dss.random_fault(rng)
    action, member = what.split()
    assert action in ("kill", "stop", "pause")
    assert member == "1"
    with pytest.raises(HarnessError, match="no running member"):
        dss.random_fault(rng)


def test_random_fault_is_reproducible_from_the_seed() -> None:
    seen = []
    for _ in range(2):
        with DownstairsSet(Fakes(), [1, 2, 3], geometry=G) as dss:
            rng = random.Random(1234)
            seen.append([(dss.random_fault(rng), dss.heal()) for _ in range(5)])
    assert seen[0] == seen[1]


def test_heal_brings_every_member_back(dss: DownstairsSet) -> None:
    dss.kill(0)
    dss.pause(1)
    dss.add(start=False)
    assert dss.states() == [DsState.STOPPED, DsState.PAUSED, DsState.RUNNING, DsState.NEW]
    assert dss.heal() == ["start 0", "resume 1", "start 3"]
    assert dss.states() == [DsState.RUNNING] * 4
    assert dss.heal() == []


def test_heal_skips_destroyed_members_and_reports_all_failures(fakes: Fakes) -> None:
    with DownstairsSet(fakes, [1, 2, 3], geometry=G) as dss:
        dss.kill(0)
        dss.kill(1)
        dss.destroy(2)
        fakes.made[0].fail_on = fakes.made[1].fail_on = "launch"
        with pytest.raises(HarnessError, match="heal failed for 2 member") as info:
            dss.heal()
        assert "ds0: simulated launch" in str(info.value) and "ds1: simulated launch" in str(info.value)
        assert dss.states() == [DsState.STOPPED, DsState.STOPPED, DsState.DESTROYED]


def test_add_uses_spare_ports_then_needs_one(dss: DownstairsSet) -> None:
    assert dss.add() == 3
    assert dss.targets[3] == "127.0.0.1:5003"
    with pytest.raises(HarnessError, match="no spare port for member 4"):
        dss.add()
    with pytest.raises(HarnessError, match="already used"):
        dss.add(port=5001)
    assert dss.add(port=6000) == 4
    assert dss.member(4).address == "127.0.0.1:6000"
    assert dss.states()[4] is DsState.RUNNING


def test_close_destroys_every_member_and_reports_errors_together() -> None:
    fakes = Fakes({0: "teardown", 2: "teardown"})
    dss = DownstairsSet(fakes, [1, 2, 3], geometry=G).open()
    dss.pause(1)
    with pytest.raises(ExceptionGroup, match="2 errors tearing down the downstairs set") as info:
        dss.close()
    # Each member's error is kept as itself (type, traceback), not flattened into a string.
    assert [str(e) for e in info.value.exceptions] == ["ds0: simulated teardown failure",
                                                       "ds2: simulated teardown failure"]
    assert all(isinstance(e, HarnessError) for e in info.value.exceptions)
    assert any("ds2 destroy FAILED" in note for note in info.value.__notes__)
    assert [ds.state for ds in fakes.made] == [DsState.DESTROYED] * 3
    dss.close()  # idempotent
    with pytest.raises(HarnessError, match="closed"):
        dss.kill(0)


def test_a_failed_open_undoes_itself() -> None:
    fakes = Fakes({1: "launch", 2: "teardown"})
    with pytest.raises(HarnessError, match="simulated launch failure") as info:
        DownstairsSet(fakes, [1, 2, 3], geometry=G).open()
    assert [ds.state for ds in fakes.made] == [DsState.DESTROYED] * 3
    # the teardown error is attached to the start error, not raised instead of it
    assert any("simulated teardown" in note for note in getattr(info.value, "__notes__", []))


def test_an_error_in_the_with_body_still_tears_down(fakes: Fakes) -> None:
    with pytest.raises(ValueError, match="test body"), DownstairsSet(fakes, [1, 2, 3], geometry=G):
        raise ValueError("test body")
    assert [ds.state for ds in fakes.made] == [DsState.DESTROYED] * 3


def test_the_set_must_be_opened_first(fakes: Fakes) -> None:
    dss = DownstairsSet(fakes, [1, 2, 3], geometry=G)
    with pytest.raises(HarnessError, match="before open"):
        dss.kill(0)
    dss.open()
    with pytest.raises(HarnessError, match="already open"):
        dss.open()
    dss.close()


# --- the control API --------------------------------------------------------------------------
@pytest.mark.parametrize("address", ["127.0.0.1:9998", "127.0.0.1:0", "127.3.2.1:80"])
def test_loopback_control_addresses_are_accepted(address: str) -> None:
    host, port = parse_loopback(address)
    assert f"{host}:{port}" == address


@pytest.mark.parametrize(("address", "match"), [
    ("0.0.0.0:9998", "not on IPv4 loopback"),
    ("localhost:9998", "not an IP address"),
    ("127.0.0.1", "must look like 127.0.0.1:PORT"),
    ("127.0.0.1:70000", "must look like"),
])
def test_other_control_addresses_are_refused(address: str, match: str) -> None:
    with pytest.raises(HarnessError, match=match):
        parse_loopback(address)


def _http(method: str, url: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status), json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_control_api_maps_actions_and_errors_to_http(dss: DownstairsSet) -> None:
    control = ControlServer(dss, "127.0.0.1:0")
    base = f"http://{control.address}"
    try:
        assert _http("POST", f"{base}/ds/1/kill") == (200, {"id": 1, "action": "kill", "state": "stopped"})
        status, body = _http("POST", f"{base}/ds/1/pause")
        assert status == 409 and "cannot pause downstairs ds1: it is stopped" in body["message"]
        assert _http("POST", f"{base}/ds/9/kill")[0] == 404
        assert _http("POST", f"{base}/ds/0/nap")[0] == 400
        assert _http("GET", f"{base}/nope")[0] == 404
        status, body = _http("GET", f"{base}/state")
        assert status == 200
        assert [m["state"] for m in body["members"]] == ["running", "stopped", "running"]
        assert body["targets"] == dss.targets
        assert any("ds1 kill" in s for s in body["steps"])
    finally:
        control.close()


# --- `phd dsc` argument checks (all refused before anything starts) ---------------------------
@pytest.mark.parametrize(("extra", "match"), [
    (["--random-stop-min", "1"], "go together"),
    (["--random-stop-min", "3", "--random-stop-max", "1"], "random-stop-min <= --random-stop-max"),
    (["--count", "0"], "--count must be at least 1"),
    (["--control", "0.0.0.0:9998"], "not on IPv4 loopback"),
    (["--port-base", "80"], "--port-base 80"),
])
def test_dsc_run_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       extra: list[str], match: str) -> None:
    assert main(["dsc", "run", "--dir", str(tmp_path), *extra]) == 2
    assert match in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_dsc_run_refuses_a_dir_holding_regions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ds1").mkdir()
    assert main(["dsc", "run", "--dir", str(tmp_path)]) == 2
    assert "ds1 already exist" in capsys.readouterr().err


def test_dsc_cmd_needs_a_member_for_member_actions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["dsc", "cmd", "kill", "--control", "127.0.0.1:9998"])
    assert info.value.code == 2
    assert "needs a member index" in capsys.readouterr().err


def test_dsc_cmd_says_when_nothing_answers(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # bound, never listening: connects are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert main(["dsc", "cmd", "state", "--control", f"127.0.0.1:{port}"]) == 1
    assert "is `phd dsc run --control" in capsys.readouterr().err


def test_a_disks_geometry_comes_from_its_size_and_extent_size() -> None:
    g = RegionGeometry.of_size(1 << 30, block_size=4096, extent_bytes=64 << 20, encrypted=True)
    assert (g.block_size, g.extent_size, g.extent_count, g.encrypted) == (4096, 16384, 16, True)
    assert (g.extent_bytes, g.size_bytes) == (64 << 20, 1 << 30)
    with pytest.raises(HarnessError, match="multiple of the extent size"):
        RegionGeometry.of_size(1 << 30, extent_bytes=3 << 20)
    with pytest.raises(HarnessError, match="multiple of the block size"):
        RegionGeometry.of_size(1 << 30, block_size=4096, extent_bytes=1 << 11)
