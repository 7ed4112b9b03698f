"""The framework's exception hierarchy.

One root (`PhdError`). Two branches keep "the system under test misbehaved" apart from
"the harness broke", because a CI dashboard must never blame the server for a missing
Docker daemon, nor blame the harness for a VM that never reached `Running`.
"""

from __future__ import annotations

__all__ = [
    "ArtifactUnavailable",
    "HarnessError",
    "PhdError",
    "ServerError",
    "SutError",
    "WaitTimeout",
]


class PhdError(Exception):
    """Root of every exception the framework raises."""


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


class WaitTimeout(SutError):
    """A condition did not hold before its deadline; carries what was last observed."""

    def __init__(self, what: str, timeout_s: float, last_seen: object) -> None:
        super().__init__(f"timed out after {timeout_s:.1f}s waiting for {what}; last seen: {last_seen!r}")
        self.what = what
        self.timeout_s = timeout_s
        self.last_seen = last_seen
