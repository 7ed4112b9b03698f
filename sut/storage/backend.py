"""THE FACADE the VMM server uses: one Crucible-style disk backend exported over NBD.

All coroutines run on the caller's event loop. ``replace`` may be called while ``activate``
is pending in another task (the seed case) and makes that activation complete.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from pathlib import Path

from sut.regressions import (
    MULTI_TARGET_REPLACE,
    NO_GENERATION_FENCE,
    NO_READ_HASH_CHECK,
    NO_REPLAY,
    STORAGE_REGRESSIONS,
)
from sut.storage.client import Flaws, RetryPolicy
from sut.storage.errors import ReplaceRuleError, StorageError, StorageFatalError, VcrError
from sut.storage.nbd import NbdServer
from sut.storage.upstairs import Activation, Upstairs
from sut.storage.vcr import TargetChange, VolumeVcr, compare, parse_volume
from sut.storage.volume import Volume

__all__ = [
    "CrucibleBackend",
    "ReplaceRuleError",
    "RetryPolicy",
    "StorageError",
    "StorageFatalError",
    "VcrError",
]


def flaws_for(regressions: frozenset[str]) -> Flaws:
    """The upstairs' share of the storage switches (sut.regressions); multi-target-replace is
    the backend's own (``replace``). A name that is no storage switch is a caller's mistake."""
    unknown = regressions - STORAGE_REGRESSIONS
    if unknown:
        raise ValueError(f"not storage regression switches: {sorted(unknown)}; "
                         f"storage implements {sorted(STORAGE_REGRESSIONS)}")
    return Flaws(
        no_generation_fence=NO_GENERATION_FENCE in regressions,
        no_read_hash_check=NO_READ_HASH_CHECK in regressions,
        no_replay=NO_REPLAY in regressions,
    )


class _Lifecycle(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class CrucibleBackend:
    def __init__(
        self,
        backend_id: str,
        vcr_json: str,
        socket_path: Path,
        *,
        read_only: bool = False,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen dataclass, safe default
        regressions: frozenset[str] = frozenset(),
        logger: logging.Logger | None = None,
    ) -> None:
        self.backend_id = backend_id
        self._vcr: VolumeVcr = parse_volume(vcr_json)
        self._socket_path = Path(socket_path)
        self._regressions = regressions
        self._log = logger or logging.getLogger(f"sut.storage.backend.{backend_id}")
        self._volume = Volume(
            self._vcr,
            read_only=read_only,
            retry=retry,
            flaws=flaws_for(regressions),
            logger=self._log,
        )
        self._nbd = NbdServer(self._volume, self._socket_path, self._log)
        self._lifecycle = _Lifecycle.NEW
        self._last_replacement: tuple[VolumeVcr, tuple[TargetChange, ...]] | None = None
        self._replace_lock = asyncio.Lock()

    @property
    def size_bytes(self) -> int:
        return self._volume.size_bytes

    @property
    def block_size(self) -> int:
        return self._volume.block_size

    @property
    def socket_path(self) -> Path:
        return self._socket_path

    @property
    def vcr(self) -> VolumeVcr:
        """The VCR currently in force (after any accepted replacement)."""
        return self._vcr

    def _check_open(self, what: str) -> None:
        if self._lifecycle is _Lifecycle.CLOSED:
            raise StorageError(f"backend {self.backend_id} is closed; cannot {what}")

    async def start_export(self) -> None:
        """Listen on the socket; handshakes are answered at once, I/O waits for activation."""
        self._check_open("start the export")
        if self._lifecycle is _Lifecycle.NEW:
            await self._nbd.start()
            self._lifecycle = _Lifecycle.OPEN

    async def activate(self, *, handover: bool = False) -> None:
        """Return once every region is active; retries forever; cancellable. ``handover``: a
        migration target taking the disk over; a promote the downstairs keeps refusing is
        fatal then (StorageFatalError), see Upstairs.activate."""
        self._check_open("activate")
        await self._volume.activate(handover=handover)

    async def replace(self, new_vcr_json: str) -> str:
        """Apply a replacement VCR; returns Started/StartedAlready/CompletedAlready/VcrMatches/
        Missing. Raises ReplaceRuleError for a rule violation, VcrError for bad JSON."""
        self._check_open("replace the VCR")
        new = parse_volume(new_vcr_json)
        async with self._replace_lock:
            try:
                outcome = compare(
                    self._vcr, new, allow_multiple_targets=MULTI_TARGET_REPLACE in self._regressions
                )
            except ReplaceRuleError as exc:
                last = self._last_replacement
                if exc.rule != "no-change" or last is None or last[0] != new:
                    raise
                # an identical retry of the replacement we already applied: idempotent
                change = last[1][0]
                return await self._upstairs(change).replace_downstairs(change.old, change.new)
            if not outcome.changes:
                self._vcr = new
                self._log.info("backend %s: generation-only VCR change accepted", self.backend_id)
                return "VcrMatches"
            result = "Started"
            for i, change in enumerate(outcome.changes):
                # under multi-target-replace the later changes of one request skip the
                # one-in-flux guard: that is the historical bug (several copies in flux)
                result = await self._upstairs(change).replace_downstairs(
                    change.old, change.new, guard_in_flux=i == 0
                )
                if result == "Missing":
                    return result
            self._vcr = new
            self._last_replacement = (new, outcome.changes)
            return result

    def _upstairs(self, change: TargetChange) -> Upstairs:
        return self._volume.upstairs[change.sub_volume]

    def status(self) -> dict[str, object]:
        activation = Activation.CLOSED if self._lifecycle is _Lifecycle.CLOSED else self._volume.activation()
        downstairs: list[dict[str, object]] = []
        errors = []
        for up in self._volume.upstairs:
            downstairs.extend(up.status())
            if up.failure is not None:
                errors.append(str(up.failure))
        gens = [r.gen for r in self._vcr.regions]
        return {
            "backend_id": self.backend_id,
            "activation": activation.value,
            "generation": max(gens, default=0),
            "size_bytes": self.size_bytes,
            "block_size": self.block_size,
            "socket_path": str(self._socket_path),
            "error": "; ".join(errors) or None,
            "downstairs": downstairs,
            "regions": [up.info() for up in self._volume.upstairs],
            "read_only_parent": self._vcr.read_only_parent is not None,
        }

    async def close(self) -> None:
        """Flush if active, close everything, remove the socket file; idempotent."""
        if self._lifecycle is _Lifecycle.CLOSED:
            return
        self._lifecycle = _Lifecycle.CLOSED
        try:
            await self._nbd.close()
        finally:
            await self._volume.close()
