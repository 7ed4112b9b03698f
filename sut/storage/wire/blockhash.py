"""Crucible's block integrity hash: xxHash64 with seed 0.

Kept apart from the codec because it needs the third-party ``xxhash`` package (Debian:
``python3-xxhash``); the rest of ``sut.storage.wire`` is stdlib only.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

from sut.storage.wire.fields import (
    PlainContexts,
    PlainReadContexts,
    ReadBlockContext,
    ReadBlockEmpty,
    ReadBlockUnencrypted,
)

__all__ = ["block_hash", "block_hashes", "encrypted_block_hash", "unencrypted_contexts", "verify_unencrypted"]

_xxh64 = xxhash.xxh64_intdigest


def block_hash(data: bytes | bytearray | memoryview) -> int:
    """The hash of one unencrypted block."""
    return xxhash.xxh64_intdigest(data)


def encrypted_block_hash(nonce: bytes, tag: bytes, ciphertext: bytes | bytearray | memoryview) -> int:
    """The hash of one encrypted block: over nonce, then tag, then the ciphertext."""
    h = xxhash.xxh64()
    h.update(nonce)
    h.update(tag)
    h.update(ciphertext)
    return h.intdigest()


def block_hashes(data: bytes | bytearray | memoryview, block_size: int) -> array[int]:
    """The hash of every block of ``data`` (whole blocks), in one array."""
    view = memoryview(data)
    if len(view) % block_size:
        raise ValueError(f"{len(view)} bytes is not a whole number of {block_size}-byte blocks")
    # a list comprehension over memoryview slices is the fastest way to hash many small
    # blocks with the xxhash module (measured against map() chains); no object per block
    return array("Q", [_xxh64(view[i : i + block_size]) for i in range(0, len(view), block_size)])


def unencrypted_contexts(data: bytes | bytearray | memoryview, block_size: int) -> PlainContexts:
    """The contexts of a Write of ``data`` (whole blocks) to an unencrypted region."""
    return PlainContexts(block_hashes(data, block_size))


def verify_unencrypted(
    blocks: Sequence[ReadBlockContext], data: bytes | bytearray | memoryview, block_size: int
) -> list[int]:
    """Indices of the blocks of a ReadResponse whose data does not match their context
    (an Empty block must read as zeros)."""
    view = memoryview(data)
    bad = []
    if len(view) != len(blocks) * block_size:
        raise ValueError(f"{len(view)} bytes of data for {len(blocks)} blocks of {block_size}")
    if type(blocks) is PlainReadContexts:
        got = block_hashes(view, block_size)
        if got == blocks.hashes:  # the common case: one comparison of two arrays
            return []
        return [i for i, (a, b) in enumerate(zip(got, blocks.hashes, strict=True)) if a != b]
    for i, ctx in enumerate(blocks):
        block = view[i * block_size : (i + 1) * block_size]
        if isinstance(ctx, ReadBlockEmpty):
            ok = not any(block)
        elif isinstance(ctx, ReadBlockUnencrypted):
            ok = block_hash(block) == ctx.hash
        else:
            raise ValueError(f"block {i} is encrypted: its tag is checked by decryption, not here")
        if not ok:
            bad.append(i)
    return bad
