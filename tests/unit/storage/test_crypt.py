"""Block encryption as Crucible does it (sut.storage.crypt); the real downstairs checks the
hashes of what we seal in tests/integration/storage/test_upstairs_interop.py."""

from __future__ import annotations

import base64

import pytest

from sut.storage.crypt import BlockCipher
from sut.storage.wire.blockhash import encrypted_block_hash
from sut.storage.wire.fields import ReadBlockEmpty, ReadBlockEncrypted, ReadBlockUnencrypted

KEY = base64.b64encode(bytes(range(32))).decode()
BS = 512


def test_seal_then_open_round_trips_with_fresh_nonces() -> None:
    c = BlockCipher(KEY)
    data = bytes(range(256)) * 4  # two blocks
    sealed, contexts = c.seal(data, BS)
    assert len(sealed) == len(data) and sealed != data
    nonces = [ctx.encryption_context.nonce for ctx in contexts if ctx.encryption_context]
    assert len(set(nonces)) == 2  # each block its own nonce
    for i, ctx in enumerate(contexts):
        enc = ctx.encryption_context
        assert enc is not None and len(enc.nonce) == 12 and len(enc.tag) == 16
        assert ctx.hash == encrypted_block_hash(enc.nonce, enc.tag, sealed[i * BS : (i + 1) * BS])
    blocks = tuple(ReadBlockEncrypted(ctx.encryption_context) for ctx in contexts)  # type: ignore[arg-type]
    assert c.open(blocks, sealed, BS) == (data, [])
    again, _ = c.seal(data, BS)
    assert again != sealed  # random nonces: the same plaintext never seals the same


def test_a_flipped_bit_or_another_key_does_not_open() -> None:
    c = BlockCipher(KEY)
    sealed, contexts = c.seal(b"\x11" * (3 * BS), BS)
    blocks = tuple(ReadBlockEncrypted(ctx.encryption_context) for ctx in contexts)  # type: ignore[arg-type]
    tampered = bytearray(sealed)
    tampered[BS + 9] ^= 0x80
    assert c.open(blocks, tampered, BS)[1] == [1]
    other = BlockCipher(base64.b64encode(b"\x07" * 32).decode())
    assert other.open(blocks, sealed, BS)[1] == [0, 1, 2]


def test_empty_blocks_read_as_zeros_and_unencrypted_contexts_are_refused() -> None:
    c = BlockCipher(KEY)
    plain, bad = c.open((ReadBlockEmpty(), ReadBlockEmpty()), bytes(2 * BS), BS)
    assert plain == bytes(2 * BS) and bad == []
    assert c.open((ReadBlockEmpty(),), b"\x01" + bytes(BS - 1), BS)[1] == [0]
    assert c.open((ReadBlockUnencrypted(5),), bytes(BS), BS)[1] == [0]


@pytest.mark.parametrize("key", ["", "not base64!", base64.b64encode(b"short").decode()])
def test_bad_keys_are_refused(key: str) -> None:
    with pytest.raises(ValueError):
        BlockCipher(key)
