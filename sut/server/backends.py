"""Block backends as the state driver sees them.

Only Crucible disks have a live backend object (an upstairs that must activate
before vCPUs run); file disks are plain QEMU ``raw`` blockdevs. The storage
facade ``sut.storage.backend.CrucibleBackend`` is wrapped here, and its exceptions
are translated into the server's own two error types.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sut.path_policy import PathPolicy, installed
from sut.server.policy import TargetNotAllowedError, TargetPolicy, check_vcr_targets
from sut.storage.errors import ReplaceRuleError, StorageError, StorageFatalError, VcrError

if TYPE_CHECKING:
    from sut.storage.backend import CrucibleBackend

# The storage's replacement results (Crucible's ReplaceResult variants) as propolis-server
# 5.0.0's document spells them.
REPLACE_RESULTS = {"Started": "started", "StartedAlready": "started_already",
                   "CompletedAlready": "completed_already", "VcrMatches": "vcr_matches", "Missing": "missing"}


class BackendError(Exception):
    """Root of the server-side block backend errors."""


class ReplacementRejectedError(BackendError):
    """The new VCR breaks a replacement rule (answered 400 with the rule)."""

    def __init__(self, message: str, rule: str | None = None) -> None:
        self.rule = rule
        super().__init__(message)


class ActivationFatalError(BackendError):
    """The backend can never activate (the instance goes to Failed)."""


class BlockBackend(Protocol):
    """What the driver needs from a replicated block backend (the storage facade)."""

    @property
    def backend_id(self) -> str: ...

    @property
    def size_bytes(self) -> int: ...

    async def start_export(self) -> None: ...

    async def activate(self, *, handover: bool = False) -> None:
        """``handover``: a migration target takes the disk over from its stopped source, so
        a refusal to activate that cannot clear on its own is fatal at once."""

    async def replace(self, new_vcr_json: str) -> str: ...

    def status(self) -> dict[str, object]: ...

    async def close(self) -> None: ...


class CrucibleDisk:
    """Adapter over ``sut.storage.backend.CrucibleBackend`` that owns error translation."""

    def __init__(
        self,
        backend_id: str,
        vcr_json: str,
        socket_path: Path,
        *,
        read_only: bool,
        regressions: frozenset[str],
        logger: logging.Logger,
        targets: TargetPolicy | None = None,
        paths: PathPolicy | None = None,
    ) -> None:
        self._targets = targets or TargetPolicy.default()
        self._backend_id = backend_id
        try:
            self._check_targets(vcr_json)
            # The storage opens a read_only_parent through the path policy installed here.
            # Imported here, not at the top: the upstairs, the wire codec and the cipher are a
            # sixth of the server's start-up, and a VM without a Crucible disk needs none of it.
            from sut.storage.backend import CrucibleBackend

            with installed(paths or PathPolicy([socket_path.parent])):
                self._inner: CrucibleBackend = CrucibleBackend(
                    backend_id,
                    vcr_json,
                    socket_path,
                    read_only=read_only,
                    regressions=regressions,
                    logger=logger,
                )
        except VcrError as exc:
            raise ReplacementRejectedError(f"invalid VCR for {backend_id}: {exc}") from exc

    def _check_targets(self, vcr_json: str) -> None:
        """The target policy, for a new VCR and for every replacement alike."""
        try:
            check_vcr_targets(vcr_json, self._targets)
        except TargetNotAllowedError as exc:
            raise ReplacementRejectedError(
                f"VCR for {self._backend_id}: {exc}", TargetNotAllowedError.rule) from exc

    @property
    def backend_id(self) -> str:
        return self._backend_id

    @property
    def size_bytes(self) -> int:
        return self._inner.size_bytes

    async def start_export(self) -> None:
        await self._inner.start_export()

    async def activate(self, *, handover: bool = False) -> None:
        try:
            await self._inner.activate(handover=handover)
        except StorageFatalError as exc:
            raise ActivationFatalError(f"{self._backend_id}: {exc}") from exc

    async def replace(self, new_vcr_json: str) -> str:
        try:
            self._check_targets(new_vcr_json)
            result = await self._inner.replace(new_vcr_json)
        except VcrError as exc:
            rule = exc.rule if isinstance(exc, ReplaceRuleError) else None
            raise ReplacementRejectedError(str(exc), rule) from exc
        except StorageError as exc:
            raise ReplacementRejectedError(str(exc)) from exc
        return REPLACE_RESULTS[result]

    def status(self) -> dict[str, object]:
        return self._inner.status()

    async def close(self) -> None:
        await self._inner.close()

