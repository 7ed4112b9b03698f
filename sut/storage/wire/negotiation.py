"""Choosing the message version, and a downstairs' answer to HereIAm, as Crucible does it.

Crucible's downstairs (``downstairs/src/lib.rs``, ``on_negotiation_step``) accepts a HereIAm
whose ``version`` is its own, or whose ``alternate_versions`` contain its own; it then answers
YesItsMe with ITS version. Otherwise it answers VersionMismatch with its version and closes.
Only after the version does it compare read-only, then encryption (ReadOnlyMismatch /
EncryptedMismatch with its own setting, then it closes). With ``supported == (13,)`` the
functions below are exactly that rule; with several supported versions the upstairs' own
version wins, else the highest supported one among its alternates.
"""

from __future__ import annotations

from collections.abc import Collection

from sut.storage.bincode import SocketAddr
from sut.storage.wire.messages import (
    MESSAGE_VERSION,
    EncryptedMismatch,
    HereIAm,
    ReadOnlyMismatch,
    VersionMismatch,
    YesItsMe,
)

__all__ = ["REPAIR_PORT_OFFSET", "SUPPORTED_VERSIONS", "answer_here_i_am", "choose_version"]

SUPPORTED_VERSIONS: tuple[int, ...] = (MESSAGE_VERSION,)
REPAIR_PORT_OFFSET = 4000
"""A Crucible downstairs serves repair HTTP on its port + 4000 and says so in YesItsMe."""


def choose_version(hello: HereIAm, supported: Collection[int] = SUPPORTED_VERSIONS) -> int | None:
    """The version to speak with the sender of ``hello``; None if there is none in common."""
    if hello.version in supported:
        return hello.version
    common = [v for v in supported if v in hello.alternate_versions]
    return max(common) if common else None


def answer_here_i_am(
    hello: HereIAm,
    *,
    repair_addr: SocketAddr,
    read_only: bool,
    encrypted: bool,
    supported: Collection[int] = SUPPORTED_VERSIONS,
) -> YesItsMe | VersionMismatch | ReadOnlyMismatch | EncryptedMismatch:
    """A downstairs' reply to ``hello``; anything but YesItsMe is followed by closing."""
    version = choose_version(hello, supported)
    if version is None:
        return VersionMismatch(max(supported))
    if hello.read_only != read_only:
        return ReadOnlyMismatch(read_only)
    if hello.encrypted != encrypted:
        return EncryptedMismatch(encrypted)
    return YesItsMe(version, repair_addr)
