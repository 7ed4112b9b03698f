"""Crucible disks: three downstairs, the VCR that names them, and fault injection.

Faults on the disk's own downstairs are verbs on them: `disk.downstairs[1].kill()` (also
stop, pause, resume, restart); `replace_downstairs` swaps a fresh one in for a dead one.

The disk owns its downstairs and the black hole; the VCR is generated on demand from the
current generation and black-hole switch, exactly as PHD does, so a test reads as
`disk.set_generation(2); vm.replace_crucible_vcr(disk)`.

An encrypted disk (`encrypted=True`) has regions created `--encrypted` and a key of its own
(32 random bytes, base64 in the VCR's `opts.key`, as Crucible takes it), fixed for the disk's
life so every VCR - a successor's, a replacement at a higher generation - opens the same data.
The key is secret: `redacted_vcr` is what the framework writes to results files.
"""

from __future__ import annotations

import base64
import copy
import secrets
import uuid as uuidlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from phd.downstairs import Downstairs
from phd.errors import HarnessError
from phd.ports import BlackHole, BlackHoleKind
from phd.teardown import Teardown

__all__ = ["REDACTED", "CrucibleDisk", "redacted_vcr"]

MIB = 1 << 20
KEY_BYTES = 32  # AES-256-GCM-SIV, Crucible's block cipher
REDACTED = "<redacted>"


def redacted_vcr(vcr: dict[str, Any]) -> dict[str, Any]:
    """A copy of a volume VCR with every region's secrets (`key`, `key_pem`) replaced by
    REDACTED, fit for logs and results files; the original is left alone."""
    out = copy.deepcopy(vcr)
    stack: list[Any] = [out]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            opts = node.get("opts")
            if node.get("type") == "region" and isinstance(opts, dict):
                for secret in ("key", "key_pem"):
                    if opts.get(secret) is not None:
                        opts[secret] = REDACTED
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


class _Closeable(Protocol):
    """What a disk needs of a VM that uses it (TestVm, without importing phd.vm)."""

    def close(self) -> None: ...


class CrucibleDisk:
    def __init__(self, name: str, size_bytes: int, block_size: int, extent_bytes: int,
                 downstairs: Sequence[Downstairs], black_holes: Sequence[BlackHole],
                 disk_id: str | None = None, read_only_parent: Path | None = None,
                 encrypted: bool = False) -> None:
        if len(downstairs) != 3:
            raise HarnessError(f"a Crucible region needs exactly 3 downstairs, got {len(downstairs)}")
        if extent_bytes % block_size or size_bytes % extent_bytes:
            raise HarnessError(f"disk {name}: size {size_bytes} must be a multiple of the extent "
                               f"size {extent_bytes}, itself a multiple of the block size {block_size}")
        self.name = name
        self.id = disk_id or str(uuidlib.uuid4())
        self.size_bytes = size_bytes
        self.block_size = block_size
        self.blocks_per_extent = extent_bytes // block_size
        self.extent_count = size_bytes // extent_bytes
        wrong = [ds.name for ds in downstairs if ds.encrypted != encrypted]
        if wrong:
            raise HarnessError(f"disk {name} is {'' if encrypted else 'not '}encrypted but the "
                               f"regions of {wrong} are {'not ' if encrypted else ''}encrypted")
        self.downstairs = list(downstairs)
        self.encrypted = encrypted
        # Never logged: `redacted_vcr` hides it wherever the framework writes a VCR down.
        self._key = base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() if encrypted else None
        # Downstairs this disk owns but its VCR no longer (or not yet) names: spares made by
        # DiskFactory.add_downstairs and the ones replace_downstairs swapped out.
        self._others: list[Downstairs] = []
        # A raw image whose blocks show through until written (a guest image for boot disks).
        self.read_only_parent = read_only_parent
        self._parent_id = str(uuidlib.uuid4())
        self._black_holes = {hole.kind: hole for hole in black_holes}
        self._black_hole: BlackHole | None = None  # the one the VCR names now, if any
        self.generation = 1
        # The VMs that attached this disk, in attachment order: DiskFactory.close stops them
        # before their downstairs go (a stopping VM flushes to them).
        self._users: list[_Closeable] = []

    # --- generation and faults ------------------------------------------------------
    def set_generation(self, gen: int) -> None:
        if gen < 1:
            raise HarnessError(f"generation must be >= 1, got {gen}")
        self.generation = gen

    def enable_vcr_black_hole(self, kind: BlackHoleKind = "refused") -> None:
        """The next VCRs name a loopback address where nothing answers for the FIRST downstairs
        only (a replacement may change only one target, so the corrected VCR stays valid).
        kind: "refused" (connects are refused at once) or "silent" (connects succeed, then
        nothing ever answers)."""
        hole = self._black_holes.get(kind)
        if hole is None:
            raise HarnessError(f"disk {self.name} has no {kind!r} black hole; "
                               f"it has {sorted(self._black_holes)}")
        self._black_hole = hole

    def disable_vcr_black_hole(self) -> None:
        self._black_hole = None

    @property
    def black_hole_address(self) -> str:
        """The address of the black hole in use (the "refused" one when none is enabled)."""
        hole = self._black_hole or self._black_holes.get("refused") or next(iter(self._black_holes.values()))
        return hole.address

    def targets(self) -> list[str]:
        targets = [ds.address for ds in self.downstairs]
        if self._black_hole is not None:
            targets[0] = self._black_hole.address
        return targets

    def attached_to(self, vm: _Closeable) -> None:
        """Record a VM that uses this disk (TestVm.attach calls it)."""
        if all(user is not vm for user in self._users):  # identity: TestVm compares by fields
            self._users.append(vm)

    @property
    def users(self) -> tuple[_Closeable, ...]:
        """The VMs that attached this disk (successors included), oldest first."""
        return tuple(self._users)

    def own(self, ds: Downstairs) -> None:
        """Take a spare downstairs into this disk's care (torn down with the disk)."""
        self._others.append(ds)

    def __repr__(self) -> str:  # no key in it, ever
        return (f"CrucibleDisk({self.name!r}, id={self.id}, gen={self.generation}, "
                f"encrypted={self.encrypted}, targets={self.targets()})")

    def replace_downstairs(self, index: int, new: Downstairs) -> Downstairs:
        """Name `new` instead of downstairs `index` in the next VCRs (send one with
        `vm.replace_crucible_vcr(disk)` at a higher generation); returns the old one, which
        the disk keeps and tears down."""
        if not 0 <= index < len(self.downstairs):
            raise HarnessError(f"disk {self.name} has downstairs 0..{len(self.downstairs) - 1}, not {index}")
        if new in self.downstairs:
            raise HarnessError(f"{new.address} already serves disk {self.name}")
        if new.encrypted != self.encrypted:
            raise HarnessError(f"{new.name}'s region is {'' if new.encrypted else 'not '}encrypted, "
                               f"disk {self.name} is {'' if self.encrypted else 'not '}encrypted: "
                               "make spares with disk_factory.add_downstairs(disk)")
        old = self.downstairs[index]
        self.downstairs[index] = new
        if new in self._others:
            self._others.remove(new)
        self._others.append(old)
        return old

    # --- the VCR ----------------------------------------------------------------------
    def vcr(self) -> dict[str, Any]:
        region = {
            "type": "region",
            "block_size": self.block_size,
            "blocks_per_extent": self.blocks_per_extent,
            "extent_count": self.extent_count,
            "gen": self.generation,
            "opts": {
                "id": self.id, "target": self.targets(), "lossy": False, "flush_timeout": None,
                "key": self._key, "cert_pem": None, "key_pem": None, "root_cert_pem": None,
                "control": None, "read_only": False,
            },
        }
        parent = None
        if self.read_only_parent is not None:
            parent = {"type": "file", "id": self._parent_id, "block_size": self.block_size,
                      "path": str(self.read_only_parent)}
        return {"type": "volume", "id": self.id, "block_size": self.block_size,
                "sub_volumes": [region], "read_only_parent": parent}

    def destroy(self) -> None:
        teardown = Teardown(f"tearing down disk {self.name}")
        for ds in [*self.downstairs, *self._others]:
            with teardown.step():
                ds.destroy()
        for hole in self._black_holes.values():
            with teardown.step():
                hole.close()
        teardown.finish()
