"""Every disposition row of the request queue (phd.md "Request queue and state driver").

The table is the full cross product of queue conditions and request kinds,
each row written out by hand so a reviewer can check it against the prose:

- terminal: stop ignored, everything else denied;
- Start: denied if a stop is pending, ignored unless NotStarted;
- Reboot: denied while not started / starting / stop pending (in that order
  of precedence), ignored if one is pending or in progress;
- Stop: ignored if pending, else queued (every live state);
- VCR replacement: queued unless terminal, also behind a queued stop.

``test_table_covers_every_condition_and_kind`` fails when a row is missing,
so a new condition or kind cannot be added without deciding its rows.
"""

from __future__ import annotations

import itertools

import pytest

from sut.server.request_queue import (
    DenyReason,
    Disposition,
    QueuedRequest,
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
MIGRATE = RequestKind.MIGRATE_OUT
ENQ, IGN, DENY = Disposition.ENQUEUE, Disposition.IGNORE, Disposition.DENY
TERMINAL = DenyReason.TERMINAL
STOP_PENDING = DenyReason.STOP_PENDING
NOT_STARTED = DenyReason.NOT_STARTED
STARTING = DenyReason.STARTING
NOT_RUNNING = DenyReason.NOT_RUNNING

Payload = str
Expected = tuple[Disposition, DenyReason | None]

# Queue conditions, each reached through the public API only (make_queue).
CONDITIONS = (
    "not-started",
    "not-started+stop",
    "starting",  # Start queued, the driver has not read it yet
    "starting-popped",  # the driver popped the Start: activation under way
    "starting+stop",
    "running",
    "running+reboot",
    "running+stop",
    "running+reboot+stop",
    "rebooting",  # Reboot popped, notify_running not yet called
    "stopping",  # Stop popped, notify_stopped not yet called
    "stopped",
    "failed",
)
KINDS = tuple(RequestKind)


def make_queue(condition: str, regressions: QueueRegressions | None = None) -> RequestQueue[Payload]:
    """Drive a queue into ``condition`` as the state driver would, through the public API."""
    q: RequestQueue[Payload] = RequestQueue(regressions or QueueRegressions())
    if condition == "not-started":
        return q
    if condition == "not-started+stop":
        q.try_queue(STOP, "stop")
        return q
    q.try_queue(START, "start")
    if condition == "starting":
        return q
    if condition == "starting+stop":
        q.try_queue(STOP, "stop")
        return q
    assert _pop_kind(q) is START
    if condition == "starting-popped":
        return q
    q.notify_running()
    if condition == "running":
        return q
    if condition == "running+reboot":
        q.try_queue(REBOOT, "reboot")
        return q
    if condition == "running+stop":
        q.try_queue(STOP, "stop")
        return q
    if condition == "running+reboot+stop":
        q.try_queue(REBOOT, "reboot")
        q.try_queue(STOP, "stop")
        return q
    if condition == "rebooting":
        q.try_queue(REBOOT, "reboot")
        assert _pop_kind(q) is REBOOT
        return q
    if condition == "stopping":
        q.try_queue(STOP, "stop")
        assert _pop_kind(q) is STOP
        return q
    if condition == "stopped":
        q.try_queue(STOP, "stop")
        assert _pop_kind(q) is STOP
        assert q.notify_stopped() == []
        return q
    if condition == "failed":
        assert q.notify_failed() == []
        return q
    raise AssertionError(f"unknown condition {condition!r}")


def _pop_kind(q: RequestQueue[Payload]) -> RequestKind | None:
    item = q.pop()
    return None if item is None else item.kind


def drain(q: RequestQueue[Payload]) -> list[tuple[RequestKind, Payload | None]]:
    """Everything a driver would pop, in order (empties the queue)."""
    out: list[tuple[RequestKind, Payload | None]] = []
    while (item := q.pop()) is not None:
        out.append((item.kind, item.payload))
    return out


# (condition, kind) -> (disposition, deny reason). One line per row, on purpose.
TABLE: list[tuple[str, RequestKind, Disposition, DenyReason | None]] = [
    # Creating, nobody asked for anything yet.
    ("not-started", START, ENQ, None),
    ("not-started", STOP, ENQ, None),
    ("not-started", REBOOT, DENY, NOT_STARTED),
    ("not-started", REPLACE, ENQ, None),
    # Creating with a stop queued: nothing may start any more.
    ("not-started+stop", START, DENY, STOP_PENDING),
    ("not-started+stop", STOP, IGN, None),
    # "not started" outranks "stop pending" (prose order; Propolis says HaltPending).
    ("not-started+stop", REBOOT, DENY, NOT_STARTED),
    ("not-started+stop", REPLACE, ENQ, None),
    # Start queued, not read yet.
    ("starting", START, IGN, None),
    ("starting", STOP, ENQ, None),
    ("starting", REBOOT, DENY, STARTING),
    ("starting", REPLACE, ENQ, None),
    # Start read: activation under way (PR 873 serves requests meanwhile).
    ("starting-popped", START, IGN, None),
    ("starting-popped", STOP, ENQ, None),
    ("starting-popped", REBOOT, DENY, STARTING),
    ("starting-popped", REPLACE, ENQ, None),
    # Starting with a stop queued.
    ("starting+stop", START, DENY, STOP_PENDING),
    ("starting+stop", STOP, IGN, None),
    ("starting+stop", REBOOT, DENY, STARTING),
    ("starting+stop", REPLACE, ENQ, None),  # PR 879: replacements still queue
    # Running, idle.
    ("running", START, IGN, None),
    ("running", STOP, ENQ, None),
    ("running", REBOOT, ENQ, None),
    ("running", REPLACE, ENQ, None),
    # Running with a reboot queued.
    ("running+reboot", START, IGN, None),
    ("running+reboot", STOP, ENQ, None),
    ("running+reboot", REBOOT, IGN, None),
    ("running+reboot", REPLACE, ENQ, None),
    # Running with a stop queued.
    ("running+stop", START, DENY, STOP_PENDING),
    ("running+stop", STOP, IGN, None),
    ("running+stop", REBOOT, DENY, STOP_PENDING),
    ("running+stop", REPLACE, ENQ, None),
    # Running with a reboot then a stop queued: the stop wins over "reboot pending".
    ("running+reboot+stop", START, DENY, STOP_PENDING),
    ("running+reboot+stop", STOP, IGN, None),
    ("running+reboot+stop", REBOOT, DENY, STOP_PENDING),
    ("running+reboot+stop", REPLACE, ENQ, None),
    # A reboot in progress still counts as pending until notify_running.
    ("rebooting", START, IGN, None),
    ("rebooting", STOP, ENQ, None),
    ("rebooting", REBOOT, IGN, None),
    ("rebooting", REPLACE, ENQ, None),
    # A stop in progress still counts as pending until notify_stopped.
    ("stopping", START, DENY, STOP_PENDING),
    ("stopping", STOP, IGN, None),
    ("stopping", REBOOT, DENY, STOP_PENDING),
    ("stopping", REPLACE, ENQ, None),  # queued, then answered 410 by notify_stopped
    # Terminal: stop ignored, everything else denied.
    ("stopped", START, DENY, TERMINAL),
    ("stopped", STOP, IGN, None),
    ("stopped", REBOOT, DENY, TERMINAL),
    ("stopped", REPLACE, DENY, TERMINAL),
    ("failed", START, DENY, TERMINAL),
    ("failed", STOP, IGN, None),
    ("failed", REBOOT, DENY, TERMINAL),
    ("failed", REPLACE, DENY, TERMINAL),
    # A migration out: only from a running guest, never behind a stop.
    ("not-started", MIGRATE, DENY, NOT_STARTED),
    ("not-started+stop", MIGRATE, DENY, NOT_STARTED),
    ("starting", MIGRATE, DENY, STARTING),
    ("starting-popped", MIGRATE, DENY, STARTING),
    ("starting+stop", MIGRATE, DENY, STARTING),
    ("running", MIGRATE, ENQ, None),
    ("running+reboot", MIGRATE, ENQ, None),
    ("running+stop", MIGRATE, DENY, STOP_PENDING),
    ("running+reboot+stop", MIGRATE, DENY, STOP_PENDING),
    ("rebooting", MIGRATE, ENQ, None),
    ("stopping", MIGRATE, DENY, STOP_PENDING),
    ("stopped", MIGRATE, DENY, TERMINAL),
    ("failed", MIGRATE, DENY, TERMINAL),
]


def test_table_covers_every_condition_and_kind() -> None:
    keys = [(condition, kind) for condition, kind, _, _ in TABLE]
    duplicates = {key for key in keys if keys.count(key) > 1}
    assert not duplicates, f"rows stated twice: {sorted(duplicates, key=str)}"
    missing = set(itertools.product(CONDITIONS, KINDS)) - set(keys)
    assert not missing, f"rows missing from the table: {sorted(missing, key=str)}"
    unknown = {condition for condition, _ in keys} - set(CONDITIONS)
    assert not unknown, f"rows for unknown conditions: {unknown}"
    for condition, kind, disposition, reason in TABLE:
        # A deny row names its reason; other rows name none.
        assert (disposition is DENY) == (reason is not None), (condition, kind)


@pytest.mark.parametrize("condition", CONDITIONS)
def test_conditions_reach_the_intended_queue_state(condition: str) -> None:
    """Guards the table's premise: make_queue really builds what each name says."""
    q = make_queue(condition)
    expected_state = {
        "not-started": QueueState.NOT_STARTED,
        "not-started+stop": QueueState.NOT_STARTED,
        "starting": QueueState.START_PENDING,
        "starting-popped": QueueState.START_PENDING,
        "starting+stop": QueueState.START_PENDING,
        "stopped": QueueState.STOPPED,
        "failed": QueueState.FAILED,
    }.get(condition, QueueState.RUNNING)
    assert q.state is expected_state
    assert q.awaiting_stop == (condition.endswith("+stop") or condition == "stopping")
    assert q.awaiting_reboot == (condition.startswith("running+reboot") or condition == "rebooting")


def _row_id(row: tuple[str, RequestKind, Disposition, DenyReason | None]) -> str:
    return f"{row[0]}-{row[1].value}"


@pytest.mark.parametrize(("condition", "kind", "expected", "reason"), TABLE, ids=[_row_id(r) for r in TABLE])
def test_disposition_row(
    condition: str, kind: RequestKind, expected: Disposition, reason: DenyReason | None
) -> None:
    q = make_queue(condition)
    untouched = make_queue(condition)  # same history, never offered the request
    assert q.disposition(kind) == (expected, reason)
    state, stop, reboot = q.state, q.awaiting_stop, q.awaiting_reboot
    if expected is DENY:
        with pytest.raises(RequestDeniedError) as info:
            q.try_queue(kind, "new")
        assert info.value.kind is kind
        assert info.value.reason is reason
        assert reason is not None and reason.value in str(info.value)
    else:
        assert q.try_queue(kind, "new") is expected
    if expected is ENQ:
        # The queue's view moves on: a Start makes it StartPending, a Stop or
        # Reboot raises its awaiting flag.
        assert q.state is (QueueState.START_PENDING if kind is START else state)
        assert q.awaiting_stop == (stop or kind is STOP)
        assert q.awaiting_reboot == (reboot or kind is REBOOT)
        # Queued at the tail of its own FIFO; state changes still pop first.
        before = drain(untouched)
        states = [item for item in before if item[0].is_state_change]
        components = [item for item in before if not item[0].is_state_change]
        (states if kind.is_state_change else components).append((kind, "new"))
        assert drain(q) == states + components
    else:
        # Ignored or denied: nothing at all changed.
        assert (q.state, q.awaiting_stop, q.awaiting_reboot) == (state, stop, reboot)
        assert drain(q) == drain(untouched)


# -- regression switches -------------------------------------------------------

WHILE_STARTING = QueueRegressions(vcr_denied_while_starting=True)
AFTER_STOP = QueueRegressions(vcr_denied_after_stop=True)
BOTH = QueueRegressions(vcr_denied_while_starting=True, vcr_denied_after_stop=True)
SWITCHES = {"vcr-denied-while-starting": WHILE_STARTING, "vcr-denied-after-stop": AFTER_STOP, "both": BOTH}

# (switch, condition) -> ReplaceVcr disposition with the switch on, and whether
# the switch CHANGED it from TABLE or must leave it the SAME (both are checked).
CHANGED, SAME = True, False
REGRESSION_TABLE: list[tuple[str, str, Disposition, DenyReason | None, bool]] = [
    # vcr-denied-while-starting (pre-PR 873): only Running accepts replacements.
    ("vcr-denied-while-starting", "not-started", DENY, NOT_RUNNING, CHANGED),
    ("vcr-denied-while-starting", "not-started+stop", DENY, NOT_RUNNING, CHANGED),
    ("vcr-denied-while-starting", "starting", DENY, NOT_RUNNING, CHANGED),
    ("vcr-denied-while-starting", "starting-popped", DENY, NOT_RUNNING, CHANGED),
    ("vcr-denied-while-starting", "starting+stop", DENY, NOT_RUNNING, CHANGED),
    ("vcr-denied-while-starting", "running", ENQ, None, SAME),
    ("vcr-denied-while-starting", "running+reboot", ENQ, None, SAME),
    ("vcr-denied-while-starting", "running+stop", ENQ, None, SAME),
    ("vcr-denied-while-starting", "running+reboot+stop", ENQ, None, SAME),
    ("vcr-denied-while-starting", "rebooting", ENQ, None, SAME),
    ("vcr-denied-while-starting", "stopping", ENQ, None, SAME),
    ("vcr-denied-while-starting", "stopped", DENY, TERMINAL, SAME),
    ("vcr-denied-while-starting", "failed", DENY, TERMINAL, SAME),
    # vcr-denied-after-stop (issue 879): a queued stop refuses replacements.
    ("vcr-denied-after-stop", "not-started", ENQ, None, SAME),
    ("vcr-denied-after-stop", "not-started+stop", DENY, STOP_PENDING, CHANGED),
    ("vcr-denied-after-stop", "starting", ENQ, None, SAME),
    ("vcr-denied-after-stop", "starting-popped", ENQ, None, SAME),
    ("vcr-denied-after-stop", "starting+stop", DENY, STOP_PENDING, CHANGED),
    ("vcr-denied-after-stop", "running", ENQ, None, SAME),
    ("vcr-denied-after-stop", "running+reboot", ENQ, None, SAME),
    ("vcr-denied-after-stop", "running+stop", DENY, STOP_PENDING, CHANGED),
    ("vcr-denied-after-stop", "running+reboot+stop", DENY, STOP_PENDING, CHANGED),
    ("vcr-denied-after-stop", "rebooting", ENQ, None, SAME),
    ("vcr-denied-after-stop", "stopping", DENY, STOP_PENDING, CHANGED),
    ("vcr-denied-after-stop", "stopped", DENY, TERMINAL, SAME),
    ("vcr-denied-after-stop", "failed", DENY, TERMINAL, SAME),
    # Both on: "not running" is checked first.
    ("both", "not-started", DENY, NOT_RUNNING, CHANGED),
    ("both", "not-started+stop", DENY, NOT_RUNNING, CHANGED),
    ("both", "starting", DENY, NOT_RUNNING, CHANGED),
    ("both", "starting-popped", DENY, NOT_RUNNING, CHANGED),
    ("both", "starting+stop", DENY, NOT_RUNNING, CHANGED),
    ("both", "running", ENQ, None, SAME),
    ("both", "running+reboot", ENQ, None, SAME),
    ("both", "running+stop", DENY, STOP_PENDING, CHANGED),
    ("both", "running+reboot+stop", DENY, STOP_PENDING, CHANGED),
    ("both", "rebooting", ENQ, None, SAME),
    ("both", "stopping", DENY, STOP_PENDING, CHANGED),
    ("both", "stopped", DENY, TERMINAL, SAME),
    ("both", "failed", DENY, TERMINAL, SAME),
]


def test_regression_table_covers_every_switch_and_condition() -> None:
    keys = [(switch, condition) for switch, condition, *_ in REGRESSION_TABLE]
    assert len(keys) == len(set(keys)), "a regression row is stated twice"
    assert set(keys) == set(itertools.product(SWITCHES, CONDITIONS))


@pytest.mark.parametrize(
    ("switch", "condition", "expected", "reason", "changed"),
    REGRESSION_TABLE,
    ids=[f"{row[0]}-{row[1]}" for row in REGRESSION_TABLE],
)
def test_regression_switch_row(
    switch: str, condition: str, expected: Disposition, reason: DenyReason | None, changed: bool
) -> None:
    # The row says whether the switch changes the plain answer; hold it to that.
    plain = {(c, k): (d, r) for c, k, d, r in TABLE}[(condition, REPLACE)]
    assert ((expected, reason) != plain) == changed, f"row marked {'CHANGED' if changed else 'SAME'}"
    q = make_queue(condition, SWITCHES[switch])
    assert q.disposition(REPLACE) == (expected, reason)
    if expected is DENY:
        with pytest.raises(RequestDeniedError) as info:
            q.try_queue(REPLACE, "vcr")
        assert info.value.reason is reason
        assert "vcr" not in [payload for _, payload in drain(q)]
    else:
        assert q.try_queue(REPLACE, "vcr") is expected
        assert drain(q)[-1] == (REPLACE, "vcr")


@pytest.mark.parametrize("switch", list(SWITCHES))
@pytest.mark.parametrize("condition", CONDITIONS)
@pytest.mark.parametrize("kind", [START, STOP, REBOOT])
def test_regression_switches_never_touch_state_changes(
    switch: str, condition: str, kind: RequestKind
) -> None:
    plain = {(c, k): (d, r) for c, k, d, r in TABLE}
    assert make_queue(condition, SWITCHES[switch]).disposition(kind) == plain[(condition, kind)]


# -- the two FIFOs, awaiting flags, leftovers -------------------------------------


def test_state_changes_are_served_before_component_changes() -> None:
    q: RequestQueue[str] = RequestQueue()
    q.try_queue(REPLACE, "vcr-1")
    q.try_queue(START, "start")
    q.try_queue(REPLACE, "vcr-2")
    q.try_queue(STOP, "stop")
    assert drain(q) == [(START, "start"), (STOP, "stop"), (REPLACE, "vcr-1"), (REPLACE, "vcr-2")]


def test_pop_without_state_changes_leaves_stop_queued() -> None:
    q: RequestQueue[str] = RequestQueue()
    q.try_queue(START)
    q.pop()
    q.try_queue(STOP)
    q.try_queue(REPLACE, "vcr")
    assert q.has_ready(state_changes=False)
    item = q.pop(state_changes=False)
    assert item is not None and item.kind is REPLACE
    assert q.pop(state_changes=False) is None
    assert q.has_ready() and not q.has_ready(state_changes=False)
    item = q.pop()
    assert item is not None and item.kind is STOP


def test_termination_returns_leftovers_for_410_in_pop_order() -> None:
    q: RequestQueue[str] = RequestQueue()
    q.try_queue(REPLACE, "a")
    q.try_queue(START, "start")
    q.try_queue(REPLACE, "b")
    q.try_queue(STOP, "stop")
    leftovers = q.notify_stopped()
    assert [(r.kind, r.payload) for r in leftovers] == [
        (START, "start"),
        (STOP, "stop"),
        (REPLACE, "a"),
        (REPLACE, "b"),
    ]
    assert len(q) == 0 and not q.has_ready()
    assert q.state is QueueState.STOPPED
    assert not q.awaiting_stop and not q.awaiting_reboot


def test_reboot_can_be_queued_again_after_it_completed() -> None:
    q = make_queue("rebooting")
    q.notify_running()
    assert not q.awaiting_reboot
    assert q.try_queue(REBOOT) is ENQ


def test_reboot_stays_denied_after_a_reboot_completes_behind_a_stop() -> None:
    # Propolis's reboot_requests_are_idempotent_except_when_stopping.
    q = make_queue("running+reboot+stop")
    assert _pop_kind(q) is REBOOT
    q.notify_running()
    assert q.disposition(REBOOT) == (DENY, STOP_PENDING)
    assert _pop_kind(q) is STOP


def test_ten_reboots_in_a_row_are_each_accepted() -> None:
    # phd.md "ten queued reboots all succeed": each answered 204 (queued or ignored).
    q = make_queue("running")
    for _ in range(10):
        assert q.try_queue(REBOOT) in (ENQ, IGN)
        if (item := q.pop()) is not None:
            assert item.kind is REBOOT
            q.notify_running()
    assert q.state is QueueState.RUNNING and not q.awaiting_reboot


@pytest.mark.parametrize("first", ["stopped", "failed"])
@pytest.mark.parametrize("second", ["stopped", "failed"])
def test_first_terminal_state_is_final(first: str, second: str) -> None:
    """The driver notifies twice on some paths (stop, then teardown); the first wins."""
    q = make_queue("running")
    q.try_queue(REPLACE, "vcr")
    notify = {"stopped": q.notify_stopped, "failed": q.notify_failed}
    leftovers: list[QueuedRequest[str]] = notify[first]()
    assert [r.payload for r in leftovers] == ["vcr"]
    state = q.state
    assert notify[second]() == []
    q.notify_running()
    assert q.state is state
    assert q.state is (QueueState.STOPPED if first == "stopped" else QueueState.FAILED)
