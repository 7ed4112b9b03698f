"""One server-under-test process per VM.

The process is started from an argv list (the configurable `--phd-server-cmd` plus the
CONTRACT flags), in its own session so a Ctrl-C at the terminal reaches only the harness,
which then stops it in order: SIGTERM (graceful: the server stops its VM), then SIGKILL.
`stop()` is idempotent and always leaves the log file for the failure bundle.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import httpx

from phd.errors import HarnessError, WaitTimeout
from phd.reaper import ledger
from phd.wait import wait_until

__all__ = ["ServerProcess", "ServerStartFailure"]


class ServerStartFailure(HarnessError):
    """The server process exited, or never answered, while starting (QEMU's VMLaunchFailure).

    A harness error: the usual cause is the command line (--phd-server-cmd) or the machine;
    a server that starts but then misbehaves is a SutError.
    """

    def __init__(self, reason: str, argv: Sequence[str], exit_code: int | None, log_tail: str) -> None:
        super().__init__(f"{reason}: {shlex.join(argv)}; exit code {exit_code}; last log lines:\n"
                         f"{log_tail}")
        self.argv = list(argv)
        self.exit_code = exit_code
        self.log_tail = log_tail


class ServerProcess:
    def __init__(self, server_cmd: list[str], port: int, data_dir: Path, log_path: Path | None,
                 regressions: tuple[str, ...] = (), ready_timeout_s: float = 30.0,
                 env: dict[str, str] | None = None, allow_paths: Sequence[Path] = ()) -> None:
        self.port = port
        self.data_dir = data_dir
        self.log_path = log_path
        self.argv = [*server_cmd, "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir)]
        # The framework's own directories that specs name (per-test disks under the tmp dir,
        # kernels and images in the artifact cache): the server opens no file outside its
        # allowed roots.
        for allowed in allow_paths:
            self.argv += ["--allow-path", os.path.abspath(allowed)]
        for name in regressions:
            self.argv += ["--regression", name]
        self.ready_timeout_s = ready_timeout_s
        self.env = {**os.environ, **(env or {})}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None
        self._ledger: list[Path] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - closed in stop()
        out = self._log if self._log is not None else subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env,
                start_new_session=True)
        except OSError as exc:
            self._close_log()
            raise HarnessError(f"cannot start server {shlex.join(self.argv)}: {exc}; "
                               "check --phd-server-cmd") from exc
        # Before anything can fail: if this run is SIGKILLed, the next one stops this server
        # (which stops its VM) and removes its run directory.
        self._ledger = [ledger().record_process(self._proc.pid, f"server on port {self.port}"),
                        ledger().record_dir(self.data_dir)]
        try:
            # `fatal`: a server that exits while starting will never answer, so the start
            # fails at once with its exit code rather than after ready_timeout_s.
            wait_until(self._answers, lambda ok: ok, what=f"server on port {self.port} to answer",
                       timeout_s=self.ready_timeout_s, interval_s=0.05, fatal=self._raise_if_exited)
        except WaitTimeout as exc:
            self.stop()  # a failed start undoes itself: process, log handle, ledger entries
            raise ServerStartFailure(
                f"server did not answer within {self.ready_timeout_s:.0f}s (it was running; "
                "phd stopped it)", self.argv, None, self.log_tail()) from exc
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        try:
            httpx.get(self.base_url + "/instance", timeout=1.0)
        except httpx.TransportError:
            return False
        return True

    def _raise_if_exited(self) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            raise ServerStartFailure("server exited while starting", self.argv, code, self.log_tail())

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL; returns the exit code. Safe to call twice."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close_log()
        if proc is not None and proc.returncode is not None:
            for entry in self._ledger:  # the run directory is the VM factory's to remove
                ledger().forget(entry)
            self._ledger = []
        return proc.returncode if proc is not None else None

    def _close_log(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            with contextlib.suppress(OSError):
                log.close()

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "<no server log (output mode null)>"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
