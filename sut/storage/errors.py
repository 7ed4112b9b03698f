"""Exception hierarchy of the storage package.

Stdlib only: the downstairs (which runs in a minimal container) imports this module too.
"""

from __future__ import annotations

__all__ = [
    "ProtocolError",
    "ReplaceRuleError",
    "StorageError",
    "StorageFatalError",
    "TruncatedFrameError",
    "VcrError",
]


class StorageError(Exception):
    """Root of every exception raised by ``sut.storage``."""


class VcrError(StorageError, ValueError):
    """A Volume Construction Request is malformed; the message names the JSON path."""


class ReplaceRuleError(VcrError):
    """A replacement VCR breaks one of the replacement rules.

    ``rule`` is a short stable code (for API clients and tests), ``str(e)`` is for humans.
    """

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{message} (rule: {rule})")
        self.rule = rule


class StorageFatalError(StorageError):
    """Activation can never succeed (e.g. generation too low); retrying will not help."""


class ProtocolError(StorageError):
    """A peer sent a frame that violates the upstairs<->downstairs wire protocol."""


class TruncatedFrameError(ProtocolError):
    """The peer closed the connection in the middle of a frame: a lost connection (a killed
    process), not a malformed frame."""
