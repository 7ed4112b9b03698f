"""The instance's external request queue: pure bookkeeping, no I/O.

Modelled on Propolis's request queue after PR 880 / PR 873. The queue decides,
for every incoming request, whether it is queued, ignored (a harmless
duplicate) or denied (with a reason the API returns as 403). The state driver
pops requests and reports progress back with the ``notify_*`` methods, which
move the queue's own view of the instance along.

Two FIFOs: state changes (start / stop / reboot) are always served before
component changes (VCR replacements), so a stop cannot starve behind a burst
of replacements.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueState(enum.Enum):
    NOT_STARTED = "NotStarted"
    START_PENDING = "StartPending"
    RUNNING = "Running"
    STOPPED = "Stopped"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        return self in (QueueState.STOPPED, QueueState.FAILED)


class RequestKind(enum.Enum):
    START = "Start"
    STOP = "Stop"
    REBOOT = "Reboot"
    REPLACE = "ReplaceVcr"
    # A target asked to migrate this instance away (GET /instance/migrate/{id}/start).
    MIGRATE_OUT = "MigrateAsSource"

    @property
    def is_state_change(self) -> bool:
        return self is not RequestKind.REPLACE


class Disposition(enum.Enum):
    ENQUEUE = "Enqueue"
    IGNORE = "Ignore"
    DENY = "Deny"


class DenyReason(enum.Enum):
    """Why a request was denied; the value is the human-readable 403 reason."""

    TERMINAL = "the instance has already stopped or failed"
    STOP_PENDING = "a stop request is already queued"
    NOT_STARTED = "the instance has not been started"
    STARTING = "the instance is still starting"
    MIGRATION_PENDING = "a migration out is already queued or running"
    # Regression switches only:
    NOT_RUNNING = "VCR replacement is only accepted while Running (regression switch)"


class RequestDeniedError(Exception):
    """Raised by :meth:`RequestQueue.try_queue` for a denied request."""

    def __init__(self, kind: RequestKind, reason: DenyReason) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(f"{kind.value} denied: {reason.value}")


@dataclass(frozen=True)
class QueueRegressions:
    """Historical queue bugs, re-created only when a regression switch is on."""

    # Before PR 873 a VCR replacement was refused until the VM was Running.
    vcr_denied_while_starting: bool = False
    # Issue 879: a replacement arriving after a queued stop was refused.
    vcr_denied_after_stop: bool = False


@dataclass
class QueuedRequest(Generic[T]):
    kind: RequestKind
    payload: T | None = None


@dataclass
class RequestQueue(Generic[T]):
    """Decides dispositions and holds queued requests in two FIFOs.

    ``T`` is the payload a caller attaches (the driver attaches a future that
    the HTTP handler awaits for VCR replacements).
    """

    regressions: QueueRegressions = field(default_factory=QueueRegressions)
    state: QueueState = QueueState.NOT_STARTED
    awaiting_stop: bool = False
    awaiting_reboot: bool = False
    awaiting_migration_out: bool = False
    _state_changes: deque[QueuedRequest[T]] = field(default_factory=deque)
    _component_changes: deque[QueuedRequest[T]] = field(default_factory=deque)

    def disposition(self, kind: RequestKind) -> tuple[Disposition, DenyReason | None]:
        """The disposition ``kind`` would get now (the table of phd.md)."""
        if self.state.terminal:
            if kind is RequestKind.STOP:
                return Disposition.IGNORE, None
            return Disposition.DENY, DenyReason.TERMINAL
        if kind is RequestKind.START:
            if self.awaiting_stop:
                return Disposition.DENY, DenyReason.STOP_PENDING
            if self.state is QueueState.NOT_STARTED:
                return Disposition.ENQUEUE, None
            return Disposition.IGNORE, None
        if kind is RequestKind.REBOOT:
            if self.state is QueueState.NOT_STARTED:
                return Disposition.DENY, DenyReason.NOT_STARTED
            if self.state is QueueState.START_PENDING:
                return Disposition.DENY, DenyReason.STARTING
            if self.awaiting_stop:
                return Disposition.DENY, DenyReason.STOP_PENDING
            if self.awaiting_reboot:
                return Disposition.IGNORE, None
            return Disposition.ENQUEUE, None
        if kind is RequestKind.STOP:
            if self.awaiting_stop:
                return Disposition.IGNORE, None
            return Disposition.ENQUEUE, None
        if kind is RequestKind.MIGRATE_OUT:
            # Only a running guest can be migrated away, and one migration at a time.
            if self.state is QueueState.NOT_STARTED:
                return Disposition.DENY, DenyReason.NOT_STARTED
            if self.state is QueueState.START_PENDING:
                return Disposition.DENY, DenyReason.STARTING
            if self.awaiting_stop:
                return Disposition.DENY, DenyReason.STOP_PENDING
            if self.awaiting_migration_out:
                return Disposition.DENY, DenyReason.MIGRATION_PENDING
            return Disposition.ENQUEUE, None
        # VCR replacement: queued in every live state, even behind a stop.
        if self.regressions.vcr_denied_while_starting and self.state is not QueueState.RUNNING:
            return Disposition.DENY, DenyReason.NOT_RUNNING
        if self.regressions.vcr_denied_after_stop and self.awaiting_stop:
            return Disposition.DENY, DenyReason.STOP_PENDING
        return Disposition.ENQUEUE, None

    def try_queue(self, kind: RequestKind, payload: T | None = None) -> Disposition:
        """Queue ``kind`` if its disposition allows; raise if denied.

        Returns ENQUEUE or IGNORE; an ignored request is a successful no-op.
        """
        disposition, reason = self.disposition(kind)
        if disposition is Disposition.DENY:
            assert reason is not None  # the table always names a reason for DENY
            raise RequestDeniedError(kind, reason)
        if disposition is Disposition.IGNORE:
            return disposition
        request = QueuedRequest(kind, payload)
        if kind is RequestKind.START:
            self.state = QueueState.START_PENDING
        elif kind is RequestKind.STOP:
            self.awaiting_stop = True
        elif kind is RequestKind.REBOOT:
            self.awaiting_reboot = True
        elif kind is RequestKind.MIGRATE_OUT:
            self.awaiting_migration_out = True
        if kind.is_state_change:
            self._state_changes.append(request)
        else:
            self._component_changes.append(request)
        return disposition

    def pop(self, *, state_changes: bool = True) -> QueuedRequest[T] | None:
        """The next request: state changes first, then component changes.

        ``state_changes=False`` leaves state changes queued (used only by the
        ``stop-ignored-while-starting`` regression).
        """
        if state_changes and self._state_changes:
            return self._state_changes.popleft()
        if self._component_changes:
            return self._component_changes.popleft()
        return None

    def __len__(self) -> int:
        return len(self._state_changes) + len(self._component_changes)

    def has_ready(self, *, state_changes: bool = True) -> bool:
        return bool(self._component_changes) or (state_changes and bool(self._state_changes))

    # -- notifications from the state driver --------------------------------

    def notify_running(self) -> None:
        """Startup finished (or a reboot did): vCPUs are running."""
        if not self.state.terminal:
            self.state = QueueState.RUNNING
        self.awaiting_reboot = False

    def notify_migration_failed(self) -> None:
        """A migration out failed: the instance runs on here, and may migrate again."""
        self.awaiting_migration_out = False

    def notify_stopped(self) -> list[QueuedRequest[T]]:
        """The instance is gone; returns what was still queued (answer 410)."""
        return self._terminate(QueueState.STOPPED)

    def notify_failed(self) -> list[QueuedRequest[T]]:
        return self._terminate(QueueState.FAILED)

    def _terminate(self, state: QueueState) -> list[QueuedRequest[T]]:
        # Terminal states are final: the first one wins. The driver notifies
        # again from its teardown (notify_stopped after a served stop, or
        # notify_failed when a step after the stop raised); that second call
        # must not turn a Stopped queue into a Failed one or back.
        if not self.state.terminal:
            self.state = state
        self.awaiting_stop = False
        self.awaiting_reboot = False
        self.awaiting_migration_out = False
        leftovers = list(self._state_changes) + list(self._component_changes)
        self._state_changes.clear()
        self._component_changes.clear()
        return leftovers
