"""Fakes at the driver's seams (unit tests only): a VM and a block backend."""

from __future__ import annotations

import asyncio

from sut.server.backends import ActivationFatalError, ReplacementRejectedError


class FakeVm:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.exit = asyncio.get_running_loop().create_future()

    async def launch(self) -> None:
        self.calls.append("launch")

    async def cont(self) -> None:
        self.calls.append("cont")

    async def reset(self) -> None:
        self.calls.append("reset")

    async def wait_exit(self) -> int:
        return int(await asyncio.shield(self.exit))

    async def shutdown(self) -> None:
        self.calls.append("shutdown")
        if not self.exit.done():
            self.exit.set_result(0)

    def crash(self, code: int = 139) -> None:
        self.exit.set_result(code)


class FakeBackend:
    """Activation waits until ``good_target`` is among the targets (like a dead downstairs)."""

    def __init__(self, backend_id: str, targets: list[str], good_target: str) -> None:
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

    async def activate(self) -> None:
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
        # The "VCR" is "old->new" to keep the fake tiny.
        self.calls.append(f"replace:{new_vcr_json}")
        old, _, new = new_vcr_json.partition("->")
        if old == new:
            raise ReplacementRejectedError("no difference", rule="no-change")
        if old not in self.targets:
            return "Missing"
        self.targets[self.targets.index(old)] = new
        self.changed.set()
        return "Started"

    def fail(self, message: str) -> None:
        self.fatal = message
        self.changed.set()

    def status(self) -> dict[str, object]:
        return {"targets": list(self.targets)}

    async def close(self) -> None:
        self.calls.append("close")
