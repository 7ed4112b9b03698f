"""The framework's exception hierarchy.

One root (`PhdError`). Two branches keep "the system under test misbehaved" apart from
"the harness broke", because a CI dashboard must never blame the server for a missing
Docker daemon, nor blame the harness for a VM that never reached `Running`.

A deadline passing says nothing by itself about whose fault it is, so `WaitTimeout` sits on
neither branch: `wait_until` raises it as is (it cannot know what its predicate waits on),
and the framework's own waits on the system under test (a state, console text, sshd) raise
`SutTimeout`, which is both. `except WaitTimeout` catches every timeout; `except SutError`
no longer catches a harness-side wait (a container that will not die, a lock).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

__all__ = [
    "ArtifactUnavailable",
    "HarnessError",
    "PhdError",
    "ProcessStartFailure",
    "ServerError",
    "SutError",
    "SutTimeout",
    "WaitTimeout",
]


class PhdError(Exception):
    """Root of every exception the framework raises."""


class ProcessStartFailure(PhdError):
    """A process the framework started exited, or never became ready, while starting (QEMU's
    VMLaunchFailure): carries the argv, the exit code (None: it was still running and phd
    stopped it) and the last lines of its log.

    Like WaitTimeout it sits on neither branch by itself, since whose fault it is depends on
    the process: `ServerStartFailure` is a HarnessError (the command line, the machine),
    `DownstairsStartFailure` a SutError (the storage under test).
    """

    def __init__(self, reason: str, argv: Sequence[str], exit_code: int | None, log_tail: str) -> None:
        super().__init__(f"{reason}: {shlex.join(argv)}; exit code {exit_code}; last log lines:\n"
                         f"{log_tail}")
        self.reason = reason
        self.argv = list(argv)
        self.exit_code = exit_code
        self.log_tail = log_tail


class HarnessError(PhdError):
    """The framework or its environment failed (Docker, QEMU binary, a build step)."""


class ArtifactUnavailable(HarnessError):
    """An artifact (guest image, container image) cannot be had here; tests SKIP with `how_to`."""

    def __init__(self, what: str, how_to: str) -> None:
        super().__init__(f"{what} is unavailable: {how_to}")
        self.what = what
        self.how_to = how_to


class SutError(PhdError):
    """The system under test (server, storage, guest) did not behave as required."""


class ServerError(SutError):
    """The server answered an API call with an unexpected status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:500]}")
        self.method = method
        self.path = path
        self.status = status
        self.body = body


class WaitTimeout(PhdError):
    """A condition did not hold before its deadline; carries what was awaited and last seen."""

    def __init__(self, what: str, timeout_s: float, last_seen: object) -> None:
        super().__init__(f"timed out after {timeout_s:.1f}s waiting for {what}; last seen: {last_seen!r}")
        self.what = what
        self.timeout_s = timeout_s
        self.last_seen = last_seen


class SutTimeout(WaitTimeout, SutError):
    """The system under test did not get where it should before the deadline (a VM state,
    a login prompt, sshd accepting the key)."""
