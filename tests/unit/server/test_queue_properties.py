"""Property test of the request queue: random request sequences against a reference model.

The model below is written from the prose of phd.md ("Request queue and state
driver"), not by calling ``RequestQueue.disposition``: if the two disagree on
any sequence, hypothesis shrinks it to the shortest one that shows it.

The rules play a legal state driver: ``notify_running`` only while a popped
Start or Reboot is in progress, no pop after a Stop was popped (the driver
tears down instead). ``notify_stopped`` follows a popped Stop; an unprompted
``notify_failed`` / ``notify_stopped`` (QEMU died, driver cancelled) may come
at any point, and again after the first: the driver's teardown notifies a
second time after a served stop.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

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

START, STOP, REBOOT, REPLACE = RequestKind.START, RequestKind.STOP, RequestKind.REBOOT, RequestKind.REPLACE


@dataclass
class Model:
    """What phd.md says the queue must do, kept in the prose's own terms."""

    vcr_denied_while_starting: bool
    vcr_denied_after_stop: bool
    phase: str = "not-started"  # not-started | start-pending | running | stopped | failed
    awaiting_stop: bool = False
    awaiting_reboot: bool = False
    state_fifo: list[int] = field(default_factory=list)
    component_fifo: list[int] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.phase in ("stopped", "failed")

    def expect(self, kind: RequestKind) -> tuple[Disposition, DenyReason | None]:
        # "terminal -> stop ignored, everything else denied"
        if self.terminal:
            if kind is STOP:
                return Disposition.IGNORE, None
            return Disposition.DENY, DenyReason.TERMINAL
        if kind is START:
            # "Start -> denied if a stop is pending, ignored unless NotStarted"
            if self.awaiting_stop:
                return Disposition.DENY, DenyReason.STOP_PENDING
            if self.phase != "not-started":
                return Disposition.IGNORE, None
            return Disposition.ENQUEUE, None
        if kind is REBOOT:
            # "Reboot -> denied while not started / starting / stop pending;
            # ignored if one is pending"
            if self.phase == "not-started":
                return Disposition.DENY, DenyReason.NOT_STARTED
            if self.phase == "start-pending":
                return Disposition.DENY, DenyReason.STARTING
            if self.awaiting_stop:
                return Disposition.DENY, DenyReason.STOP_PENDING
            if self.awaiting_reboot:
                return Disposition.IGNORE, None
            return Disposition.ENQUEUE, None
        if kind is STOP:
            # "Stop -> ignored if pending, else queued (every live state)"
            if self.awaiting_stop:
                return Disposition.IGNORE, None
            return Disposition.ENQUEUE, None
        # "VCR replacement -> always queued unless terminal", except under the
        # two historical bugs the regression switches re-create.
        if self.vcr_denied_while_starting and self.phase != "running":
            return Disposition.DENY, DenyReason.NOT_RUNNING
        if self.vcr_denied_after_stop and self.awaiting_stop:
            return Disposition.DENY, DenyReason.STOP_PENDING
        return Disposition.ENQUEUE, None

    def enqueued(self, kind: RequestKind, ident: int) -> None:
        if kind is START:
            self.phase = "start-pending"
        elif kind is STOP:
            self.awaiting_stop = True
        elif kind is REBOOT:
            self.awaiting_reboot = True
        (self.state_fifo if kind.is_state_change else self.component_fifo).append(ident)

    def next_pop(self, *, state_changes: bool) -> int | None:
        # "Two FIFOs: state changes first, component changes second."
        if state_changes and self.state_fifo:
            return self.state_fifo.pop(0)
        if self.component_fifo:
            return self.component_fifo.pop(0)
        return None

    def terminate(self, phase: str) -> list[int]:
        # "Anything still queued when the VM is gone is answered 410."
        if not self.terminal:
            self.phase = phase
        self.awaiting_stop = self.awaiting_reboot = False
        leftovers = self.state_fifo + self.component_fifo
        self.state_fifo, self.component_fifo = [], []
        return leftovers


MODEL_PHASE = {
    "not-started": QueueState.NOT_STARTED,
    "start-pending": QueueState.START_PENDING,
    "running": QueueState.RUNNING,
    "stopped": QueueState.STOPPED,
    "failed": QueueState.FAILED,
}


class RequestQueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.queue: RequestQueue[int] = RequestQueue()
        self.model = Model(False, False)
        self.ids = itertools.count()
        self.kinds: dict[int, RequestKind] = {}  # every request the queue accepted
        self.popped: list[int] = []
        self.returned: list[int] = []  # leftovers handed back for a 410
        # What a driver is in the middle of (popped, not yet reported back).
        self.start_in_progress = False
        self.reboot_in_progress = False
        self.stop_popped = False
        self.terminal_state: QueueState | None = None

    @initialize(
        while_starting=st.booleans(),
        after_stop=st.booleans(),
        lifetime=st.integers(min_value=0, max_value=40),
    )
    def setup(self, while_starting: bool, after_stop: bool, lifetime: int) -> None:
        self.queue = RequestQueue(
            QueueRegressions(vcr_denied_while_starting=while_starting, vcr_denied_after_stop=after_stop)
        )
        self.model = Model(while_starting, after_stop)
        # Unprompted endings (failure, cancelled driver) are held back for
        # ``lifetime`` steps: rules are drawn uniformly, and two always-enabled
        # ending rules would otherwise end most runs within a few steps,
        # leaving long FIFOs and reboot cycles almost unexplored.
        self.lifetime = lifetime

    def _count_step(self) -> None:
        self.lifetime -= 1

    # -- requests from the API ---------------------------------------------------

    @rule()
    def queue_start(self) -> None:
        self.try_queue(START)

    @rule()
    def queue_stop(self) -> None:
        self.try_queue(STOP)

    @rule()
    def queue_reboot(self) -> None:
        self.try_queue(REBOOT)

    @rule()
    def queue_replacement(self) -> None:
        self.try_queue(REPLACE)

    def try_queue(self, kind: RequestKind) -> None:
        self._count_step()
        ident = next(self.ids)
        expected, reason = self.model.expect(kind)
        length = len(self.queue)
        denied: DenyReason | None = None
        try:
            got = self.queue.try_queue(kind, ident)
        except RequestDeniedError as exc:
            got, denied = Disposition.DENY, exc.reason
        assert (got, denied) == (expected, reason), (
            f"{kind.value}: queue says {got} ({denied}), model says {expected} ({reason})"
        )
        if got is Disposition.ENQUEUE:
            assert len(self.queue) == length + 1
            self.kinds[ident] = kind
            self.model.enqueued(kind, ident)
        else:
            assert len(self.queue) == length, f"a {got.value.lower()}d {kind.value} changed the queue"

    # -- the driver ----------------------------------------------------------------

    @precondition(lambda self: not self.stop_popped)
    @rule(state_changes=st.booleans())
    def pop(self, state_changes: bool) -> None:
        self._count_step()
        expected = self.model.next_pop(state_changes=state_changes)
        item: QueuedRequest[int] | None = self.queue.pop(state_changes=state_changes)
        got = None if item is None else item.payload
        assert got == expected, f"popped {got} ({item}), model expected {expected}"
        if item is None:
            return
        assert got is not None and self.kinds[got] is item.kind
        assert got not in self.popped and got not in self.returned, f"request {got} came out twice"
        self.popped.append(got)
        if item.kind is START:
            self.start_in_progress = True
        elif item.kind is REBOOT:
            self.reboot_in_progress = True
        elif item.kind is STOP:
            self.stop_popped = True

    @precondition(
        lambda self: (
            (self.start_in_progress or self.reboot_in_progress)
            and not self.stop_popped
            and not self.model.terminal
        )
    )
    @rule()
    def notify_running(self) -> None:
        self.queue.notify_running()
        # Startup (or the reboot) finished: the instance runs, no reboot pending.
        self.model.phase = "running"
        self.model.awaiting_reboot = False
        self.start_in_progress = self.reboot_in_progress = False

    @precondition(lambda self: self.stop_popped or self.model.terminal)
    @rule()
    def stop_served(self) -> None:
        # The orderly end: a popped Stop was carried out. Also the driver's
        # teardown notifying a second time after that.
        self._terminate(self.queue.notify_stopped(), "stopped")

    @precondition(lambda self: self.lifetime <= 0)
    @rule(failed=st.booleans())
    def instance_gone(self, failed: bool) -> None:
        # An unprompted end at any point: QEMU died or activation failed
        # (Failed), or the driver was cancelled on shutdown (Stopped).
        if failed:
            self._terminate(self.queue.notify_failed(), "failed")
        else:
            self._terminate(self.queue.notify_stopped(), "stopped")

    def _terminate(self, leftovers: list[QueuedRequest[int]], phase: str) -> None:
        expected = self.model.terminate(phase)
        got = [item.payload for item in leftovers]
        assert got == expected, f"leftovers {got}, model expected {expected} (state changes first, FIFO)"
        for ident in got:
            assert ident is not None
            assert ident not in self.popped and ident not in self.returned, f"request {ident} came out twice"
            self.returned.append(ident)
        self.start_in_progress = self.reboot_in_progress = self.stop_popped = False
        if self.terminal_state is None:
            self.terminal_state = self.queue.state

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def flags_and_state_match_the_model(self) -> None:
        assert self.queue.state is MODEL_PHASE[self.model.phase]
        assert self.queue.awaiting_stop == self.model.awaiting_stop
        assert self.queue.awaiting_reboot == self.model.awaiting_reboot

    @invariant()
    def no_request_lost(self) -> None:
        # Every accepted request is queued, popped or returned: exactly one of the three.
        queued = self.model.state_fifo + self.model.component_fifo
        assert len(self.queue) == len(queued)
        outcomes = queued + self.popped + self.returned
        assert len(outcomes) == len(set(outcomes)), "a request is in two places"
        assert set(outcomes) == set(self.kinds), f"lost: {set(self.kinds) - set(outcomes)}"
        assert self.queue.has_ready() == bool(queued)
        assert self.queue.has_ready(state_changes=False) == bool(self.model.component_fifo)

    @invariant()
    def terminal_states_are_final(self) -> None:
        if self.terminal_state is not None:
            assert self.queue.state is self.terminal_state
            assert len(self.queue) == 0
            assert not self.queue.awaiting_stop and not self.queue.awaiting_reboot
            for kind in RequestKind:
                if kind is STOP:
                    assert self.queue.disposition(kind) == (Disposition.IGNORE, None)
                else:
                    assert self.queue.disposition(kind) == (Disposition.DENY, DenyReason.TERMINAL)


RequestQueueMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    database=None,  # no .hypothesis/ directory left in the shared tree
)
test_request_queue_against_model = RequestQueueMachine.TestCase
