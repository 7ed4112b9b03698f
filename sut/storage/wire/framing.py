"""Cutting a byte stream into Crucible frames, with a frame cap that depends on the phase.

Until a connection is active its peer is unauthenticated: a small cap
(:data:`NEGOTIATION_FRAME_CAP`) bounds what a stranger can make us buffer. Once negotiation
is over the cap rises to Crucible's :data:`MAX_FRAME` (100 MiB). The upstairs side must let
the ExtentVersions reply through before it is active: after RegionInfo it knows the extent
count and can raise its cap to :func:`extent_versions_frame_len`.

:class:`FrameSplitter` is a ``sut.storage.stream.Splitter``: for Write, WriteUnwritten and
ReadResponse the head ends after the data count, so the data can be received in place; every
other message is all head. :class:`FrameAssembler` does the same for code that reads a
blocking socket (tests, tools): its buffer grows as bytes arrive, never to a size a length
prefix merely claims.
"""

from __future__ import annotations

from sut.storage.bincode import BincodeError
from sut.storage.wire.messages import MAX_FRAME, MIN_FRAME, Message, decode_record, split_frame

__all__ = [
    "MAX_FRAME",
    "MIN_FRAME",
    "NEGOTIATION_FRAME_CAP",
    "FrameAssembler",
    "FrameSplitter",
    "extent_versions_frame_len",
]

NEGOTIATION_FRAME_CAP = 64 * 1024
"""Largest frame accepted before a connection is active (HereIAm is 78 bytes + 4 per
alternate version)."""


def extent_versions_frame_len(extent_count: int) -> int:
    """The frame length of the ExtentVersions reply for a region of ``extent_count`` extents."""
    return 4 + 4 + 3 * 8 + extent_count * (8 + 8 + 1)


class FrameSplitter:
    """``splitter(view) -> (head_len, data_len) | None`` for frames of at most ``cap`` bytes
    (see :func:`sut.storage.wire.messages.split_frame`)."""

    def __init__(self, cap: int = NEGOTIATION_FRAME_CAP) -> None:
        if not MIN_FRAME <= cap <= MAX_FRAME:
            raise ValueError(f"frame cap {cap} is outside {MIN_FRAME}..{MAX_FRAME}")
        self.cap = cap

    def __call__(self, view: memoryview) -> tuple[int, int] | None:
        return split_frame(view, self.cap)


class FrameAssembler:
    """Bytes in, messages out: ``feed(data)`` returns the messages completed by ``data``.

    After an error the assembler stays failed (the connection must be closed).
    """

    def __init__(self, cap: int = NEGOTIATION_FRAME_CAP) -> None:
        self._splitter = FrameSplitter(cap)
        self._buf = bytearray()
        self._error: BincodeError | None = None

    @property
    def cap(self) -> int:
        return self._splitter.cap

    @cap.setter
    def cap(self, cap: int) -> None:
        """Raise (or lower) the cap, e.g. to MAX_FRAME once the connection is active."""
        self._splitter = FrameSplitter(cap)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned message."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        if self._error is not None:
            raise self._error
        self._buf += data
        out: list[Message] = []
        try:
            while True:
                with memoryview(self._buf) as view:
                    known = self._splitter(view)
                    if known is None or len(view) < known[0] + known[1]:
                        return out
                    head_len, data_len = known
                    out.append(decode_record(view[:head_len], bytes(view[head_len : head_len + data_len])))
                del self._buf[: head_len + data_len]
        except BincodeError as exc:
            self._error = exc
            raise
