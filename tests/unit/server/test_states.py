"""Instance states and the state monitor behind the long-polling state API."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from sut.server.states import InstanceState as S
from sut.server.states import StateMonitor, StateSnapshot

DEADLINE_S = 5.0


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


@pytest.mark.parametrize("state", list(S))
def test_only_destroyed_and_failed_are_final(state: S) -> None:
    assert state.final is (state in (S.DESTROYED, S.FAILED))


def test_values_are_propolis_state_names() -> None:
    assert [s.value for s in S] == ["Creating", "Starting", "Running", "Stopping", "Stopped", "Rebooting",
                                    "Migrating", "Repairing", "Failed", "Destroyed"]


def test_a_new_monitor_is_creating_at_generation_one() -> None:
    async def body() -> None:
        monitor = StateMonitor()
        assert monitor.current == StateSnapshot(S.CREATING, 1)
        assert monitor.history == [StateSnapshot(S.CREATING, 1)]

    run(body)


def test_each_publish_bumps_the_generation_by_one_and_is_kept() -> None:
    async def body() -> None:
        monitor = StateMonitor()
        assert await monitor.publish(S.STARTING) == StateSnapshot(S.STARTING, 2)
        assert await monitor.publish(S.STARTING) == StateSnapshot(S.STARTING, 3)  # a change even if equal
        assert monitor.current == StateSnapshot(S.STARTING, 3)
        assert monitor.history == [StateSnapshot(S.CREATING, 1), StateSnapshot(S.STARTING, 2),
                                   StateSnapshot(S.STARTING, 3)]

    run(body)


def test_a_reached_generation_is_answered_at_once() -> None:
    async def body() -> None:
        monitor = StateMonitor()
        assert await asyncio.wait_for(monitor.wait_for_gen(1), DEADLINE_S) == StateSnapshot(S.CREATING, 1)
        assert await asyncio.wait_for(monitor.wait_for_gen(0), DEADLINE_S) == StateSnapshot(S.CREATING, 1)

    run(body)


def test_a_long_poll_waits_for_its_generation() -> None:
    async def body() -> None:
        monitor = StateMonitor()
        poll = asyncio.create_task(monitor.wait_for_gen(3))
        await monitor.publish(S.STARTING)
        await asyncio.sleep(0)
        assert not poll.done()  # generation 2 is not the 3 it asked for
        await monitor.publish(S.RUNNING)
        assert await asyncio.wait_for(poll, DEADLINE_S) == StateSnapshot(S.RUNNING, 3)

    run(body)


@pytest.mark.parametrize("final", [S.DESTROYED, S.FAILED])
def test_a_final_state_answers_every_long_poll(final: S) -> None:
    async def body() -> None:
        monitor = StateMonitor()
        poll = asyncio.create_task(monitor.wait_for_gen(100))
        await asyncio.sleep(0)
        await monitor.publish(S.STOPPED)  # not final: the poll keeps waiting
        await asyncio.sleep(0)
        assert not poll.done()
        await monitor.publish(final)
        assert await asyncio.wait_for(poll, DEADLINE_S) == StateSnapshot(final, 3)
        # and a later poll for a generation that can never come
        assert await asyncio.wait_for(monitor.wait_for_gen(7), DEADLINE_S) == StateSnapshot(final, 3)

    run(body)


def test_release_answers_waiting_and_later_polls_with_the_current_state() -> None:
    async def body() -> None:
        monitor = StateMonitor()
        await monitor.publish(S.STARTING)
        polls = [asyncio.create_task(monitor.wait_for_gen(9)) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(p.done() for p in polls)
        await monitor.release_waiters()
        answers = await asyncio.wait_for(asyncio.gather(*polls), DEADLINE_S)
        assert answers == [StateSnapshot(S.STARTING, 2)] * 3
        assert await asyncio.wait_for(monitor.wait_for_gen(9), DEADLINE_S) == StateSnapshot(S.STARTING, 2)

    run(body)
