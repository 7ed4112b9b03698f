"""Fakes at the driver's seams (unit tests only): a VM and a block backend."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sut.server.backends import ActivationFatalError, ReplacementRejectedError
from sut.server.qemu import GuestEvent


async def scheduling_points(count: int) -> None:
    """Let other tasks run ``count`` times, as a real QMP or network round trip would.

    Not a wait for anything: fakes that finish without ever suspending hide
    interleavings (a request arriving mid-reboot) that the real server has.
    """
    for _ in range(count):
        await asyncio.sleep(0)


class FakeVm:
    """``steps`` scheduling points per QMP call; ``on_call`` sees each call as it starts."""

    def __init__(self, *, steps: int = 0, on_call: Callable[[str], None] | None = None) -> None:
        self.calls: list[str] = []
        self.steps = steps
        self.on_call = on_call
        self.exit = asyncio.get_running_loop().create_future()
        self.guest_events: asyncio.Queue[GuestEvent] = asyncio.Queue()
        # A guest stuck in a reset loop (a kernel that triple-faults at once):
        # every wait for a guest event sees another reset.
        self.guest_reset_loop = False

    async def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.on_call is not None:
            self.on_call(name)
        await scheduling_points(self.steps)

    async def launch(self) -> None:
        await self._call("launch")

    async def cont(self) -> None:
        await self._call("cont")

    async def reset(self) -> None:
        await self._call("reset")

    async def nmi(self) -> None:
        await self._call("nmi")

    async def wait_exit(self) -> int:
        return int(await asyncio.shield(self.exit))

    async def shutdown(self) -> None:
        await self._call("shutdown")
        if not self.exit.done():
            self.exit.set_result(0)

    def crash(self, code: int = 139) -> None:
        self.exit.set_result(code)

    async def guest_event(self) -> GuestEvent:
        if self.guest_reset_loop:
            await scheduling_points(1)
            return GuestEvent.RESET
        return await self.guest_events.get()

    def guest_poweroff(self) -> None:
        """The guest powers itself off (QEMU's SHUTDOWN event with guest=true)."""
        self.guest_events.put_nowait(GuestEvent.POWEROFF)

    def guest_reset(self) -> None:
        """The guest reboots itself (QEMU's RESET event with guest=true)."""
        self.guest_events.put_nowait(GuestEvent.RESET)


class FakeBackend:
    """Activation waits until ``good_target`` is among the targets (like a dead downstairs).

    ``steps`` scheduling points inside each replacement; ``replace_gate``, when
    set to an Event, holds every replacement until the test sets it.
    ``replaced`` records each applied replacement with its outcome, so a test
    can check that every request was applied at most once.
    """

    def __init__(
        self,
        backend_id: str,
        targets: list[str],
        good_target: str,
        *,
        steps: int = 0,
        replace_gate: asyncio.Event | None = None,
    ) -> None:
        self.steps = steps
        self.replace_gate = replace_gate
        self.replaced: list[tuple[str, str]] = []
        self._backend_id = backend_id
        self.targets = list(targets)
        self.good_target = good_target
        self.changed = asyncio.Event()
        self.calls: list[str] = []
        self.activation_cancelled = False
        self.fatal: str | None = None

    @property
    def backend_id(self) -> str:
        return self._backend_id

    @property
    def size_bytes(self) -> int:
        return 1 << 30

    async def start_export(self) -> None:
        self.calls.append("start_export")

    async def activate(self, *, handover: bool = False) -> None:
        self.calls.append("activate")
        try:
            while self.good_target not in self.targets:
                if self.fatal is not None:
                    raise ActivationFatalError(self.fatal)
                self.changed.clear()
                await self.changed.wait()
        except asyncio.CancelledError:
            self.activation_cancelled = True
            raise

    async def replace(self, new_vcr_json: str) -> str:
        # The "VCR" is "old->new" to keep the fake tiny; an optional "#tag"
        # suffix lets a test tell identical requests apart.
        self.calls.append(f"replace:{new_vcr_json}")
        if self.replace_gate is not None:
            await self.replace_gate.wait()
        await scheduling_points(self.steps)
        old, _, new = new_vcr_json.partition("#")[0].partition("->")
        if old == new:
            self.replaced.append((new_vcr_json, "rejected"))
            raise ReplacementRejectedError("no difference", rule="no-change")
        if old not in self.targets:
            self.replaced.append((new_vcr_json, "Missing"))
            return "Missing"
        self.targets[self.targets.index(old)] = new
        self.changed.set()
        self.replaced.append((new_vcr_json, "started"))
        return "started"

    def heal(self) -> None:
        """The dead downstairs comes back: activation can complete."""
        if self.good_target not in self.targets:
            self.targets[0] = self.good_target
            self.changed.set()

    def fail(self, message: str) -> None:
        self.fatal = message
        self.changed.set()

    def status(self) -> dict[str, object]:
        return {"targets": list(self.targets)}

    async def close(self) -> None:
        self.calls.append("close")
