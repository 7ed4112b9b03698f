"""QemuVm.shutdown's escalation (quit -> SIGTERM -> SIGKILL) against a process that ignores
all but SIGKILL, standing in for a QEMU stuck flushing to an export that never answers."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import pytest

from sut.server import qemu
from sut.server.qemu import QemuVm, RunDir
from sut.server.serial import SerialConsole

# ignores SIGTERM, says so, then waits to be killed
STUBBORN = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(600)")


def test_a_shutdown_cancelled_part_way_goes_on_from_where_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's stop deadline can cancel a shutdown in its SIGTERM grace; the teardown's
    shutdown after it kills at once instead of granting quit and SIGTERM their grace again."""
    monkeypatch.setattr(qemu, "QUIT_GRACE_S", 1.0)
    monkeypatch.setattr(qemu, "TERM_GRACE_S", 1.0)

    async def body() -> None:
        vm = QemuVm(["unused"], RunDir(tmp_path / "vm"), SerialConsole(), logging.getLogger("test"))
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", STUBBORN,
                                                    stdout=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 30.0) == b"ready\n"
            vm._proc = proc  # the process shutdown() escalates against
            # quit fails (no QMP connection), its 1 s grace runs, then SIGTERM's: cancel in it
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(vm.shutdown(), 1.5)
            assert proc.returncode is None
            t0 = time.monotonic()
            await asyncio.wait_for(vm.shutdown(), 10.0)
            # what was left of SIGTERM's grace (about 0.5 s), not 2 s of graces anew
            assert time.monotonic() - t0 < 1.5
            assert proc.returncode == -9
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    asyncio.run(body())
