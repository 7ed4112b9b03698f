"""Crucible's block integrity hash: xxHash64 with seed 0.

Kept apart from the codec because it needs the third-party ``xxhash`` package (Debian:
``python3-xxhash``); the rest of ``sut.storage.wire`` is stdlib only.
"""

from __future__ import annotations

import xxhash

from sut.storage.wire.fields import BlockContext, ReadBlockContext, ReadBlockEmpty, ReadBlockUnencrypted

__all__ = ["block_hash", "encrypted_block_hash", "unencrypted_contexts", "verify_unencrypted"]


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


def unencrypted_contexts(data: bytes | bytearray | memoryview, block_size: int) -> tuple[BlockContext, ...]:
    """The contexts of a Write of ``data`` (whole blocks) to an unencrypted region."""
    view = memoryview(data)
    if len(view) % block_size:
        raise ValueError(f"{len(view)} bytes is not a whole number of {block_size}-byte blocks")
    return tuple(BlockContext(block_hash(view[i : i + block_size])) for i in range(0, len(view), block_size))


def verify_unencrypted(
    blocks: tuple[ReadBlockContext, ...], data: bytes | bytearray | memoryview, block_size: int
) -> list[int]:
    """Indices of the blocks of a ReadResponse whose data does not match their context
    (an Empty block must read as zeros)."""
    view = memoryview(data)
    bad = []
    if len(view) != len(blocks) * block_size:
        raise ValueError(f"{len(view)} bytes of data for {len(blocks)} blocks of {block_size}")
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
