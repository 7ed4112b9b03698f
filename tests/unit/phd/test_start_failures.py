"""A server or downstairs that dies while starting fails its start at once, with its exit
code and log, instead of after the whole start timeout.

Real child processes (`python -c` stand-ins), no VM; the ledger is a private one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from phd.core import reaper
from phd.core.errors import SutError
from phd.storage.downstairs import DownstairsStartFailure, ProcessDownstairs
from phd.vm.server import ServerProcess, ServerStartFailure


@pytest.fixture(autouse=True)
def private_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    book = reaper.Ledger(tmp_path / "ledger")
    monkeypatch.setattr("phd.core.process.ledger", lambda: book)


def _server(tmp_path: Path, script: str, ready_timeout_s: float) -> ServerProcess:
    # The stand-in ignores the command line ServerProcess appends (run BOOTROM IP:PORT ...).
    return ServerProcess([sys.executable, "-c", script], 1, tmp_path / "data",
                         tmp_path / "server.log", ready_timeout_s=ready_timeout_s)


def test_a_server_that_exits_during_start_fails_at_once_with_its_exit_code(tmp_path: Path) -> None:
    server = _server(tmp_path, "import sys; print('bad option --frobnicate', flush=True); sys.exit(3)",
                     ready_timeout_s=30.0)
    start = time.monotonic()
    with pytest.raises(ServerStartFailure) as info:
        server.start()
    assert time.monotonic() - start < 10.0, "the exit must end the wait, not the 30 s timeout"
    assert info.value.exit_code == 3
    assert "bad option --frobnicate" in info.value.log_tail
    assert "exited while starting" in str(info.value) and "exit code 3" in str(info.value)
    assert not server.alive()


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path: Path) -> None:
    server = _server(tmp_path, "import time; print('thinking', flush=True); time.sleep(60)",
                     ready_timeout_s=1.0)
    with pytest.raises(ServerStartFailure, match="not ready within 1s") as info:
        server.start()
    assert info.value.exit_code is None  # it was still running when the wait gave up
    assert "thinking" in info.value.log_tail
    assert not server.alive(), "a failed start undoes itself"


def test_a_process_downstairs_that_exits_during_start_fails_at_once(tmp_path: Path) -> None:
    # `create` succeeds; `run` dies at once, as a downstairs with a bad region would.
    script = ("import sys; print('cannot open region', file=sys.stderr); "
              "sys.exit(0 if 'create' in sys.argv else 4)")
    ds = ProcessDownstairs([sys.executable, "-c", script], "ds0", 1, tmp_path / "region",
                           tmp_path / "ds0.log")
    ds.create_region("00000000-0000-0000-0000-000000000000", 512, 8, 2)
    start = time.monotonic()
    with pytest.raises(DownstairsStartFailure, match="exited while starting") as info:
        ds.start()
    assert info.value.exit_code == 4 and isinstance(info.value, SutError)
    assert time.monotonic() - start < 10.0, "the exit must end the wait, not the 30 s timeout"
    assert "cannot open region" in str(info.value)
    ds.destroy()
