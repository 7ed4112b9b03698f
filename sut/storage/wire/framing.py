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

import struct

from sut.storage import bincode
from sut.storage.bincode import BincodeError
from sut.storage.wire.messages import DATA_MESSAGES, MAX_FRAME, VARIANTS, Message, decode_record

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
MIN_FRAME = 8
"""A length prefix and a variant index."""

_U32 = struct.Struct("<I")


def extent_versions_frame_len(extent_count: int) -> int:
    """The frame length of the ExtentVersions reply for a region of ``extent_count`` extents."""
    return 4 + 4 + 3 * 8 + extent_count * (8 + 8 + 1)


class FrameSplitter:
    """``splitter(view) -> (head_len, data_len) | None`` for frames of at most ``cap`` bytes.

    None means more bytes are needed to tell; a length prefix below :data:`MIN_FRAME` or above
    ``cap``, an unknown variant, or a malformed data-message head raises BincodeError (a
    ProtocolError) as soon as the bytes that show it have arrived.
    """

    def __init__(self, cap: int = NEGOTIATION_FRAME_CAP) -> None:
        if not MIN_FRAME <= cap <= MAX_FRAME:
            raise ValueError(f"frame cap {cap} is outside {MIN_FRAME}..{MAX_FRAME}")
        self.cap = cap

    def __call__(self, view: memoryview) -> tuple[int, int] | None:
        if len(view) < 4:
            return None
        frame_len: int = _U32.unpack_from(view)[0]
        if frame_len < MIN_FRAME:
            raise BincodeError(f"length prefix {frame_len} is below the minimum frame of {MIN_FRAME}")
        if frame_len > self.cap:
            raise BincodeError(f"length prefix {frame_len} exceeds the frame cap {self.cap}")
        if len(view) < 8:
            return None
        index: int = _U32.unpack_from(view, 4)[0]
        if index >= len(VARIANTS):
            raise BincodeError(f"Message index {index} is not one of the {len(VARIANTS)} variants", offset=4)
        header_codec = DATA_MESSAGES.get(index)
        if header_codec is None:
            return frame_len, 0
        # The head of a data message ends after the data count: find it by decoding the header
        # from what has arrived, with counts bounded by the frame's length.
        have = min(len(view), frame_len)
        r = bincode.Reader(view[8:have], base=8, limit=frame_len - 8)
        r.message = VARIANTS[index].__name__
        try:
            r.push("header")
            header_codec.decode(r)
            r.pop()
            r.push("data")
            count = r.u64()
        except BincodeError as exc:
            if exc.truncated and have < frame_len:
                return None
            raise
        head_len = 8 + r.pos
        if count != frame_len - head_len:
            left = frame_len - head_len
            raise r.error(f"data count {count} is not the {left} bytes left in the frame", at=r.pos - 8)
        return head_len, count


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
