"""Regression switches: known historical bugs the server can re-create on purpose.

The suite proves it catches each bug by running against a server started with
``--regression NAME``. Server-side switches are implemented here and in the
driver/queue as small isolated branches; storage-side switches are handed to
the storage backend unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

# Server-side switches (implemented in sut.server).
BLOCKING_START = "blocking-start"
VCR_DENIED_WHILE_STARTING = "vcr-denied-while-starting"
VCR_DENIED_AFTER_STOP = "vcr-denied-after-stop"
STOP_IGNORED_WHILE_STARTING = "stop-ignored-while-starting"
# Storage-side switches (implemented in sut.storage, passed through).
MULTI_TARGET_REPLACE = "multi-target-replace"
NO_GENERATION_FENCE = "no-generation-fence"
NO_READ_HASH_CHECK = "no-read-hash-check"
NO_REPLAY = "no-replay"

SERVER_REGRESSIONS = frozenset(
    {BLOCKING_START, VCR_DENIED_WHILE_STARTING, VCR_DENIED_AFTER_STOP, STOP_IGNORED_WHILE_STARTING}
)
STORAGE_REGRESSIONS = frozenset({MULTI_TARGET_REPLACE, NO_GENERATION_FENCE, NO_READ_HASH_CHECK, NO_REPLAY})
ALL_REGRESSIONS = SERVER_REGRESSIONS | STORAGE_REGRESSIONS


class UnknownRegressionError(ValueError):
    """A ``--regression`` name that this server does not know."""

    def __init__(self, name: str) -> None:
        self.name = name
        valid = ", ".join(sorted(ALL_REGRESSIONS))
        super().__init__(f"unknown regression {name!r}; valid names: {valid}")


@dataclass(frozen=True)
class Regressions:
    """The set of enabled switches, validated at construction."""

    names: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in sorted(self.names):
            if name not in ALL_REGRESSIONS:
                raise UnknownRegressionError(name)

    @classmethod
    def parse(cls, names: list[str] | tuple[str, ...] | None) -> Regressions:
        return cls(frozenset(names or ()))

    def enabled(self, name: str) -> bool:
        return name in self.names

    @property
    def storage(self) -> frozenset[str]:
        """The switches the storage backend must implement."""
        return self.names & STORAGE_REGRESSIONS


NO_REGRESSIONS = Regressions()
