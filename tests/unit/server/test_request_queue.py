"""Every disposition row of the request queue (phd.md "Request queue and state driver")."""

from __future__ import annotations

import pytest

from sut.server.request_queue import (
    DenyReason,
    Disposition,
    QueueRegressions,
    QueueState,
    RequestDeniedError,
    RequestKind,
    RequestQueue,
)

START, STOP, REBOOT, REPLACE = (
    RequestKind.START,
    RequestKind.STOP,
    RequestKind.REBOOT,
    RequestKind.REPLACE,
)
ENQ, IGN, DENY = Disposition.ENQUEUE, Disposition.IGNORE, Disposition.DENY


def make_queue(condition: str, regressions: QueueRegressions | None = None) -> RequestQueue[None]:
    """Drive a queue into ``condition`` through its public API only."""
    q: RequestQueue[None] = RequestQueue(regressions or QueueRegressions())
    if condition == "not-started":
        return q
    if condition == "not-started+stop":
        q.try_queue(STOP)
        return q
    q.try_queue(START)
    if condition == "starting":
        return q
    if condition == "starting+stop":
        q.try_queue(STOP)
        return q
    q.pop()
    q.notify_running()
    if condition == "running":
        return q
    if condition == "running+reboot":
        q.try_queue(REBOOT)
        return q
    if condition == "running+stop":
        q.try_queue(STOP)
        return q
    if condition == "stopped":
        q.notify_stopped()
        return q
    if condition == "failed":
        q.notify_failed()
        return q
    raise AssertionError(condition)


ROWS = [
    # terminal: stop ignored, everything else denied
    ("stopped", STOP, IGN, None),
    ("stopped", START, DENY, DenyReason.TERMINAL),
    ("stopped", REBOOT, DENY, DenyReason.TERMINAL),
    ("stopped", REPLACE, DENY, DenyReason.TERMINAL),
    ("failed", STOP, IGN, None),
    ("failed", START, DENY, DenyReason.TERMINAL),
    ("failed", REBOOT, DENY, DenyReason.TERMINAL),
    ("failed", REPLACE, DENY, DenyReason.TERMINAL),
    # start: denied if a stop is pending, ignored unless NotStarted
    ("not-started", START, ENQ, None),
    ("not-started+stop", START, DENY, DenyReason.STOP_PENDING),
    ("starting+stop", START, DENY, DenyReason.STOP_PENDING),
    ("starting", START, IGN, None),
    ("running", START, IGN, None),
    # reboot: denied while not started / starting / stop pending; ignored if pending
    ("not-started", REBOOT, DENY, DenyReason.NOT_STARTED),
    ("starting", REBOOT, DENY, DenyReason.STARTING),
    ("running+stop", REBOOT, DENY, DenyReason.STOP_PENDING),
    ("running+reboot", REBOOT, IGN, None),
    ("running", REBOOT, ENQ, None),
    # stop: ignored if pending, else queued in every live state
    ("not-started", STOP, ENQ, None),
    ("starting", STOP, ENQ, None),
    ("running", STOP, ENQ, None),
    ("running+reboot", STOP, ENQ, None),
    ("starting+stop", STOP, IGN, None),
    ("running+stop", STOP, IGN, None),
    # VCR replacement: queued unless terminal, also behind a queued stop (PR 879)
    ("not-started", REPLACE, ENQ, None),
    ("starting", REPLACE, ENQ, None),
    ("running", REPLACE, ENQ, None),
    ("starting+stop", REPLACE, ENQ, None),
    ("running+stop", REPLACE, ENQ, None),
]


@pytest.mark.parametrize(
    ("condition", "kind", "expected", "reason"),
    ROWS,
    ids=[f"{c}-{k.value}" for c, k, _, _ in ROWS],
)
def test_disposition_row(
    condition: str, kind: RequestKind, expected: Disposition, reason: DenyReason | None
) -> None:
    q = make_queue(condition)
    before = len(q)
    if expected is DENY:
        with pytest.raises(RequestDeniedError) as info:
            q.try_queue(kind)
        assert info.value.reason is reason
        assert len(q) == before
    else:
        assert q.try_queue(kind) is expected
        assert len(q) == before + (1 if expected is ENQ else 0)


def test_state_changes_are_served_before_component_changes() -> None:
    q: RequestQueue[str] = RequestQueue()
    q.try_queue(REPLACE, "vcr-1")
    q.try_queue(START)
    q.try_queue(REPLACE, "vcr-2")
    q.try_queue(STOP)
    popped = []
    while (item := q.pop()) is not None:
        popped.append((item.kind, item.payload))
    assert popped == [(START, None), (STOP, None), (REPLACE, "vcr-1"), (REPLACE, "vcr-2")]


def test_pop_without_state_changes_leaves_stop_queued() -> None:
    q: RequestQueue[str] = RequestQueue()
    q.try_queue(START)
    q.pop()
    q.try_queue(STOP)
    q.try_queue(REPLACE, "vcr")
    item = q.pop(state_changes=False)
    assert item is not None and item.kind is REPLACE
    assert q.pop(state_changes=False) is None
    assert q.has_ready() and not q.has_ready(state_changes=False)


def test_termination_returns_leftovers_for_410() -> None:
    q: RequestQueue[str] = RequestQueue()
    q.try_queue(START)
    q.try_queue(REPLACE, "a")
    q.try_queue(REPLACE, "b")
    leftovers = q.notify_stopped()
    assert [r.payload for r in leftovers] == [None, "a", "b"]
    assert len(q) == 0
    assert q.state is QueueState.STOPPED


def test_reboot_can_be_queued_again_after_it_completed() -> None:
    q = make_queue("running+reboot")
    q.pop()
    q.notify_running()
    assert q.try_queue(REBOOT) is ENQ


@pytest.mark.parametrize("condition", ["not-started", "starting"])
def test_regression_vcr_denied_while_starting(condition: str) -> None:
    q = make_queue(condition, QueueRegressions(vcr_denied_while_starting=True))
    with pytest.raises(RequestDeniedError) as info:
        q.try_queue(REPLACE)
    assert info.value.reason is DenyReason.NOT_RUNNING
    running = make_queue("running", QueueRegressions(vcr_denied_while_starting=True))
    assert running.try_queue(REPLACE) is ENQ


def test_regression_vcr_denied_after_stop() -> None:
    q = make_queue("starting+stop", QueueRegressions(vcr_denied_after_stop=True))
    with pytest.raises(RequestDeniedError) as info:
        q.try_queue(REPLACE)
    assert info.value.reason is DenyReason.STOP_PENDING
