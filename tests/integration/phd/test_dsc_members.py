"""DownstairsSet against real downstairs, in both flavours (processes and containers)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time
from typing import Any

import pytest

from phd.core.errors import PhdError
from phd.core.wait import wait_until
from phd.framework import Framework
from phd.storage.downstairs import DsState
from phd.storage.dsc import DownstairsSet, docker_members

from .conftest import GEOMETRY, Made, SetFactory, answer, docker_leftovers, processes_under

pytestmark = pytest.mark.integration


def listening_uuids(log: str) -> list[str]:
    """The region uuid of every `listening` line: one per start of the downstairs."""
    out = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "listening":
            out.append(str(record["uuid"]))
    return out


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_stop_or_kill_then_start_serves_the_same_region_on_the_same_port(
        make_set: SetFactory, how: str) -> None:
    dss = make_set()
    target = dss.targets[1]
    assert answer(target) == "YesItsMe"
    dss.act(how, 1)
    assert dss.states() == [DsState.RUNNING, DsState.STOPPED, DsState.RUNNING]
    assert answer(target).startswith("refused"), dss.format_steps()
    dss.start(1)
    assert dss.targets[1] == target
    assert dss.member(1).state is DsState.RUNNING
    assert answer(target) == "YesItsMe", dss.format_steps()
    # both starts served the region this set created for member 1: the region was kept
    assert_listened(dss, 1, times=2)
    dss.restart(1)
    assert answer(target) == "YesItsMe"
    assert_listened(dss, 1, times=3)


def assert_listened(dss: DownstairsSet, i: int, *, times: int) -> None:
    """Member i's log shows `times` starts, each serving the region the set made for it (polled
    briefly: on a loaded machine a line can reach the log a moment after the port answers)."""
    logs = wait_until(lambda: dss.member(i).logs(), lambda text: len(listening_uuids(text)) >= times,
                      what=f"{times} 'listening' lines in member {i}'s log", timeout_s=10, interval_s=0.1)
    assert listening_uuids(logs) == [dss.region_uuid(i)] * times, logs[-3000:]


def test_pause_makes_a_member_silent_and_resume_brings_it_back(make_set: SetFactory) -> None:
    dss = make_set()
    target = dss.targets[0]
    dss.pause(0)
    assert dss.states() == [DsState.PAUSED, DsState.RUNNING, DsState.RUNNING]
    assert answer(target, timeout_s=1.0) == "timeout", dss.format_steps()
    assert answer(dss.targets[1]) == "YesItsMe"  # the others still answer
    dss.resume(0)
    assert dss.member(0).state is DsState.RUNNING
    assert answer(target) == "YesItsMe", dss.format_steps()


def test_kill_and_stop_of_a_paused_member(make_set: SetFactory) -> None:
    dss = make_set()
    dss.pause(0)
    dss.pause(1)
    dss.kill(0)  # SIGKILL reaches a frozen process
    dss.stop(1)  # graceful: thawed so it can act on SIGTERM
    assert dss.states()[:2] == [DsState.STOPPED, DsState.STOPPED]
    assert dss.heal() == ["start 0", "start 1"]
    assert [answer(t) for t in dss.targets] == ["YesItsMe"] * 3


def test_random_faults_and_heal(make_set: SetFactory) -> None:
    dss = make_set()
    rng = random.Random(20240611)
    for _ in range(4):
        what = dss.random_fault(rng)
        action, member = what.split()
        expected = {"kill": DsState.STOPPED, "stop": DsState.STOPPED, "pause": DsState.PAUSED}[action]
        assert dss.member(int(member)).state is expected, dss.format_steps()
        dss.heal()
        assert [answer(t) for t in dss.targets] == ["YesItsMe"] * 3, dss.format_steps()


def test_an_added_member_has_a_fresh_region(make_set: SetFactory) -> None:
    dss = make_set(spares=1)
    i = dss.add()
    assert i == 3 and len(set(dss.targets)) == 4
    assert answer(dss.targets[i]) == "YesItsMe"
    assert listening_uuids(dss.member(i).logs()) == [dss.region_uuid(i)]
    assert dss.region_uuid(i) not in {dss.region_uuid(j) for j in range(3)}


def test_destroy_in_every_state_leaves_nothing(make_set: SetFactory, made: Made, flavour: str,
                                               request: pytest.FixtureRequest) -> None:
    dss = make_set(spares=2)
    dss.pause(0)
    dss.kill(1)
    dss.add(start=False)  # 3: a region, never started
    dss.add()
    dss.stop(4)
    assert dss.states() == [DsState.PAUSED, DsState.STOPPED, DsState.RUNNING, DsState.NEW,
                            DsState.STOPPED]
    started = time.monotonic()
    dss.close()
    took = time.monotonic() - started
    assert dss.states() == [DsState.DESTROYED] * 5
    dss.close()  # idempotent
    if flavour == "docker":
        client, _image = request.getfixturevalue("docker_env")
        assert docker_leftovers(client, f"phd.dsc={made.tag}") == []
    assert processes_under(made.root) == []
    assert took < 20, f"teardown took {took:.1f}s: a member waited for its stop timeout"


def test_a_member_that_dies_on_its_own_shows_stopped(make_set: SetFactory, made: Made, flavour: str,
                                                     request: pytest.FixtureRequest) -> None:
    dss = make_set(count=1)
    # the downstairs exits without the controller's help: state is read from reality
    if flavour == "process":
        [line] = processes_under(made.root)
        os.kill(int(line.split(":", 1)[0]), signal.SIGTERM)
    else:
        client, _image = request.getfixturevalue("docker_env")
        client.containers.get(dss.member(0).name).stop(timeout=10)
    wait_until(lambda: dss.member(0).state, lambda s: s is DsState.STOPPED,
               what="the member to show stopped", timeout_s=10)
    dss.start(0)
    assert answer(dss.targets[0]) == "YesItsMe"


def test_docker_host_network_member_listens_on_loopback_itself(
        docker_env: tuple[Any, str], phd_framework: Framework, made: Made,
        request: pytest.FixtureRequest) -> None:
    client, image = docker_env
    labels = {**phd_framework.labels(request.node.nodeid), "phd.dsc": made.tag}
    members = docker_members(client, image, labels, f"phd-{phd_framework.session_id}-{made.tag}")
    port = phd_framework.ports.allocate_pair()
    try:
        with DownstairsSet(members, [port], count=1, geometry=GEOMETRY) as dss:
            attrs = client.containers.get(dss.member(0).name).attrs
            assert attrs["HostConfig"]["NetworkMode"] == "host"
            assert not attrs["HostConfig"]["PortBindings"]  # nothing published: no docker-proxy
            listening = [json.loads(line) for line in dss.member(0).logs().splitlines()
                         if '"listening"' in line]
            assert [(r["address"], r["port"], r["repair_port"]) for r in listening] == [
                ("127.0.0.1", port, port + 4000)]
            assert answer(dss.targets[0]) == "YesItsMe"
            dss.kill(0)
            assert answer(dss.targets[0]).startswith("refused")
            dss.start(0)
            dss.pause(0)
            assert answer(dss.targets[0], timeout_s=1.0) == "timeout"
            dss.resume(0)
            assert answer(dss.targets[0]) == "YesItsMe"
    finally:
        phd_framework.ports.release(port)
    assert docker_leftovers(client, f"phd.dsc={made.tag}") == []


def test_a_taken_port_fails_the_open_clearly_and_leaves_nothing(
        make_set: SetFactory, made: Made, flavour: str, phd_framework: Framework,
        request: pytest.FixtureRequest) -> None:
    free = [phd_framework.ports.allocate_pair() for _ in range(2)]
    try:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", free[1]))
            squatter.listen()
            taken = squatter.getsockname()[1]
            with pytest.raises(PhdError, match=f"127.0.0.1:{taken}|{taken}") as info:
                make_set(count=2, given=free)
    finally:
        for port in free:
            phd_framework.ports.release(port)
    assert "ds1" in str(info.value)
    if flavour == "docker":
        client, _image = request.getfixturevalue("docker_env")
        assert docker_leftovers(client, f"phd.dsc={made.tag}") == []
    assert processes_under(made.root) == []
