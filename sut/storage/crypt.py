"""Crucible's block encryption, done in the upstairs: the downstairs never sees the key.

Each block is sealed on its own with AES-256-GCM-SIV (RFC 8452) under the VCR's key (base64
of 32 bytes), a fresh random 12-byte nonce and no associated data; the 16-byte tag travels
detached, in the block's context, and the block hash the downstairs checks is xxHash64 over
nonce, then tag, then ciphertext. A read is checked by opening each block with its nonce and
tag: a copy whose block does not open was altered, exactly like a hash mismatch.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from sut.storage.wire.blockhash import encrypted_block_hash
from sut.storage.wire.fields import (
    BlockContext,
    EncryptionContext,
    ReadBlockContext,
    ReadBlockEmpty,
    ReadBlockEncrypted,
)

__all__ = ["BlockCipher"]

NONCE_BYTES = 12
TAG_BYTES = 16


class BlockCipher:
    def __init__(self, key_b64: str) -> None:
        key = base64.b64decode(key_b64, validate=True)
        if len(key) != 32:
            raise ValueError(f"an encryption key is 32 bytes, this one is {len(key)}")
        self._aead = AESGCMSIV(key)

    def seal(
        self, data: bytes | bytearray | memoryview, block_size: int
    ) -> tuple[bytes, tuple[BlockContext, ...]]:
        """Ciphertext of whole blocks and their contexts (nonce, tag, hash) for a Write."""
        view = memoryview(data)
        if len(view) % block_size:
            raise ValueError(f"{len(view)} bytes is not a whole number of {block_size}-byte blocks")
        out = bytearray(len(view))
        contexts = []
        for at in range(0, len(view), block_size):
            nonce = os.urandom(NONCE_BYTES)
            sealed = self._aead.encrypt(nonce, bytes(view[at : at + block_size]), None)
            cipher, tag = sealed[:-TAG_BYTES], sealed[-TAG_BYTES:]
            out[at : at + block_size] = cipher
            contexts.append(
                BlockContext(encrypted_block_hash(nonce, tag, cipher), EncryptionContext(nonce, tag))
            )
        return bytes(out), tuple(contexts)

    def open(
        self, blocks: Sequence[ReadBlockContext], data: bytes | bytearray | memoryview, block_size: int
    ) -> tuple[bytes, list[int]]:
        """Plaintext of a ReadResponse and the indices of blocks that do not open (an Empty
        block must be zeros and reads as zeros; an unencrypted context is wrong here)."""
        view = memoryview(data)
        out = bytearray(len(view))
        zero = bytes(block_size)
        bad = []
        for i, ctx in enumerate(blocks):
            block = view[i * block_size : (i + 1) * block_size]
            if isinstance(ctx, ReadBlockEmpty):
                if block != zero:
                    bad.append(i)
                continue
            if not isinstance(ctx, ReadBlockEncrypted):
                bad.append(i)
                continue
            try:
                plain = self._aead.decrypt(ctx.ctx.nonce, bytes(block) + ctx.ctx.tag, None)
            except InvalidTag:
                bad.append(i)
                continue
            out[i * block_size : (i + 1) * block_size] = plain
        return bytes(out), bad
