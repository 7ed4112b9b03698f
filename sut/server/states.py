"""Instance states and the generation-numbered state monitor."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass


class InstanceState(enum.StrEnum):
    CREATING = "Creating"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    REBOOTING = "Rebooting"
    MIGRATING = "Migrating"
    REPAIRING = "Repairing"
    FAILED = "Failed"
    DESTROYED = "Destroyed"

    @property
    def final(self) -> bool:
        """No further change will ever be published after this state."""
        return self in (InstanceState.DESTROYED, InstanceState.FAILED)


@dataclass(frozen=True)
class StateSnapshot:
    state: InstanceState
    gen: int


class StateMonitor:
    """Publishes state changes; every change bumps ``gen`` and wakes long-polls."""

    def __init__(self) -> None:
        self._snapshot = StateSnapshot(InstanceState.CREATING, 1)
        # Every published state, for logs and tests; an instance publishes a
        # handful of states per lifecycle, so this stays small.
        self.history: list[StateSnapshot] = [self._snapshot]
        self._changed = asyncio.Condition()
        self._closing = False

    @property
    def current(self) -> StateSnapshot:
        return self._snapshot

    async def publish(self, state: InstanceState) -> StateSnapshot:
        async with self._changed:
            self._snapshot = StateSnapshot(state, self._snapshot.gen + 1)
            self.history.append(self._snapshot)
            self._changed.notify_all()
        return self._snapshot

    async def wait_for_gen(self, gen: int) -> StateSnapshot:
        """Return once ``gen`` is reached, or at once if no change can come anymore."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._snapshot.gen >= gen or self._snapshot.state.final or self._closing
            )
            return self._snapshot

    async def release_waiters(self) -> None:
        """Server shutdown: answer every long-poll with the current state."""
        async with self._changed:
            self._closing = True
            self._changed.notify_all()
