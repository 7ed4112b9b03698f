"""The server's view of the regression switches: which ones a run enabled.

The names and what each re-creates are the one table in ``sut.regressions`` (importers take
the names from there). Server-side switches are implemented in the driver/queue as
small isolated branches; storage-side switches are handed to the storage backend unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from sut.regressions import ALL_REGRESSIONS, STORAGE_REGRESSIONS

__all__ = ["NO_REGRESSIONS", "Regressions", "UnknownRegressionError"]


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
