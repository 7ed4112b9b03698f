"""A volume: regions laid end to end, plus an optional read-only parent.

Reads of blocks that were never written in the region come from the read-only parent (a
``file`` VCR), which is how a guest image backs a fresh Crucible disk. What a read fetched from
the parent is then written into the region with WriteUnwritten (as Crucible fills a region
from its parent): it lands only on blocks still never written, so it can never overwrite a
guest write, whichever order the two reach the downstairs in, and the next read of those
blocks is served by the region. Offsets here are in bytes and must be block aligned; the NBD
layer advertises the block size so QEMU aligns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass

from sut.path_policy import PathPolicyError, open_for_storage
from sut.storage.client import Flaws, RetryPolicy
from sut.storage.errors import StorageError, VcrError
from sut.storage.upstairs import Activation, Upstairs
from sut.storage.vcr import FileVcr, RegionVcr, VolumeVcr

_UNWRITTEN_RUN = re.compile("0+")  # in a read's written map: blocks the parent supplies
_MAX_FILLS = 64  # background WriteUnwritten fills from the parent in flight

__all__ = ["Volume"]


@dataclass
class _Extent:
    start: int  # byte offset of the region in the volume
    size: int
    upstairs: Upstairs


class _Parent:
    """A read-only parent backed by a local file; bytes beyond its end read as zeros.

    Opened through the path policy (sut.path_policy): an absolute path to a regular file
    under the server's allowed roots, and the descriptor that was checked is the one read.
    """

    def __init__(self, vcr: FileVcr) -> None:
        self.path = vcr.path
        try:
            opened = open_for_storage(vcr.path, "read_only_parent.path")
        except PathPolicyError as exc:
            raise VcrError(f"{exc.what}: cannot open the parent: {exc.reason}") from None
        self._fd = opened.fd
        self.size = opened.size

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size:
            return bytes(length)
        return os.pread(self._fd, length, offset).ljust(length, b"\0")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Volume:
    def __init__(
        self,
        vcr: VolumeVcr,
        *,
        read_only: bool,
        retry: RetryPolicy,
        flaws: Flaws,
        logger: logging.Logger,
    ) -> None:
        self.vcr = vcr
        self.block_size = vcr.block_size
        self.read_only = read_only
        self.log = logger
        self._parts: list[_Extent] = []
        offset = 0
        for sub in vcr.sub_volumes:
            if not isinstance(sub, RegionVcr):  # parse_volume guarantees regions only
                raise VcrError("sub_volumes: only regions are supported")
            up = Upstairs(sub, read_only=read_only, retry=retry, flaws=flaws, logger=logger)
            self._parts.append(_Extent(offset, sub.size_bytes, up))
            offset += sub.size_bytes
        self.size_bytes = offset
        self._fills: set[asyncio.Task[None]] = set()  # parent data on its way into the region
        self._parent: _Parent | None = None
        parent = vcr.read_only_parent
        if isinstance(parent, FileVcr):
            self._parent = _Parent(parent)
        elif parent is not None:
            raise VcrError(
                f'read_only_parent.type: "{parent.type}" parents are not supported '
                'by the reference storage; use a "file" parent'
            )

    @property
    def upstairs(self) -> list[Upstairs]:
        return [p.upstairs for p in self._parts]

    # -- lifecycle -------------------------------------------------------------------------
    async def activate(self, *, handover: bool = False) -> None:
        # ``handover``: see Upstairs.activate. Regions activate concurrently; if one fails or
        # we are cancelled, the others are cancelled too so nothing keeps retrying in the
        # background. The first error is raised as is (not wrapped in an ExceptionGroup) so
        # callers can catch it by type.
        tasks = [
            asyncio.create_task(p.upstairs.activate(handover=handover), name=f"activate region {i}")
            for i, p in enumerate(self._parts)
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def activation(self) -> Activation:
        states = {p.upstairs.state for p in self._parts}
        for state in (Activation.CLOSED, Activation.FAILED, Activation.ACTIVATING, Activation.INACTIVE):
            if state in states:
                return state
        return Activation.ACTIVE

    async def close(self) -> None:
        fills, self._fills = self._fills, set()
        for task in fills:
            task.cancel()
        await asyncio.gather(*fills, return_exceptions=True)
        errors: list[BaseException] = []
        for part in self._parts:
            try:
                await part.upstairs.close()
            except Exception as exc:  # noqa: BLE001 - close every region even if one fails
                errors.append(exc)
        if self._parent is not None:
            self._parent.close()
        if errors:
            raise StorageError(f"closing the volume failed: {errors!r}") from errors[0]

    # -- I/O -------------------------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        bs = self.block_size
        if offset % bs or length % bs:
            raise StorageError(f"unaligned I/O: offset {offset}, length {length}, block {bs}")
        if offset < 0 or offset + length > self.size_bytes:
            raise StorageError(f"I/O beyond the end of the volume ({self.size_bytes} bytes)")

    def _pieces(self, offset: int, length: int) -> list[tuple[_Extent, int, int, int]]:
        """(part, offset inside part, length, offset inside the request) per region touched."""
        out = []
        for part in self._parts:
            lo, hi = max(offset, part.start), min(offset + length, part.start + part.size)
            if lo < hi:
                out.append((part, lo - part.start, hi - lo, lo - offset))
        return out

    async def wait_ready(self) -> None:
        for part in self._parts:
            await part.upstairs.wait_io_ready()

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        bs = self.block_size
        pieces = self._pieces(offset, length)
        if len(pieces) == 1:
            # One region (the usual case): hand its reply payload through untouched instead
            # of copying it into a bytearray and then into bytes again.
            part, local, n, _pos = pieces[0]
            data, written = await part.upstairs.read(local // bs, n // bs)
            if self._parent is None or "0" not in written:
                return data
            out = bytearray(data)
            self._fill_from_parent(out, part, local, 0, written)
            return bytes(out)
        out = bytearray(length)
        for part, local, n, pos in pieces:
            data, written = await part.upstairs.read(local // bs, n // bs)
            out[pos : pos + n] = data
            if self._parent is not None and "0" in written:
                self._fill_from_parent(out, part, local, pos, written)
        return bytes(out)

    def _fill_from_parent(self, out: bytearray, part: _Extent, local: int, pos: int, written: str) -> None:
        """Replace the never-written blocks of one region's piece of ``out`` by parent data."""
        assert self._parent is not None
        bs = self.block_size
        # One pread per run of unwritten blocks: a guest booting from a parent reads it in
        # runs of hundreds of blocks, and a pread per block dominated the read path.
        for run in _UNWRITTEN_RUN.finditer(written):
            lo, hi = run.start() * bs, run.end() * bs
            data = self._parent.read(part.start + local + lo, hi - lo)
            out[pos + lo : pos + hi] = data
            self._fill(part, (local + lo) // bs, data)

    def _fill(self, part: _Extent, block: int, data: bytes) -> None:
        """Write parent data into the region's never-written blocks, in the background (the
        read does not wait for two acknowledgements); at most _MAX_FILLS at a time - beyond,
        the blocks just keep coming from the parent until a later read fills them."""
        if self.read_only or len(self._fills) >= _MAX_FILLS:
            return
        task = asyncio.get_running_loop().create_task(self._fill_one(part, block, data))
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    async def _fill_one(self, part: _Extent, block: int, data: bytes) -> None:
        try:
            await part.upstairs.write(block, data, only_unwritten=True)
        except StorageError as exc:
            self.log.info("filling %s blocks at %s from the parent failed: %s", len(data) // self.block_size,
                          block, exc)

    async def write(self, offset: int, data: bytes) -> None:
        if self.read_only:
            raise StorageError("volume is read-only")
        self._check(offset, len(data))
        bs = self.block_size
        for part, local, n, pos in self._pieces(offset, len(data)):
            # a request inside one region is passed on as is (slicing would copy it)
            piece = data if n == len(data) else data[pos : pos + n]
            await part.upstairs.write(local // bs, piece)

    async def flush(self) -> None:
        for part in self._parts:
            await part.upstairs.flush()
