"""Crucible disks: three downstairs of a `phd.storage.dsc.DownstairsSet`, the VCR that names them,
and fault injection.

Faults on the disk's own downstairs are verbs on them: `disk.downstairs[1].kill()` (also
stop, pause, resume, restart); `replace_downstairs` swaps a fresh one in for a dead one.

The disk owns its downstairs (all of them, through its set) and the black holes; the VCR is
generated on demand from the current generation and black-hole switch, exactly as PHD does, so
a test reads as `disk.set_generation(2); vm.replace_crucible_vcr(disk)`.

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

from phd.core.errors import HarnessError
from phd.core.ports import BlackHole, BlackHoleKind
from phd.core.teardown import Teardown
from phd.storage.downstairs import Downstairs
from phd.storage.dsc import DownstairsSet, RegionGeometry

__all__ = ["REDACTED", "CrucibleDisk", "redacted_vcr"]

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
    """What a disk needs of a VM that uses it (TestVm, without importing phd.vm.testvm)."""

    def close(self) -> None: ...


class CrucibleDisk:
    """A disk on three downstairs of one `DownstairsSet`, which owns every downstairs the disk
    ever had: the three its VCR names, the spares `add_downstairs` makes and the ones a
    replacement swapped out. The set's `RegionGeometry` is the disk's geometry."""

    def __init__(self, name: str, downstairs: DownstairsSet, black_holes: Sequence[BlackHole],
                 disk_id: str | None = None, read_only_parent: Path | None = None) -> None:
        if len(downstairs) != 3:
            raise HarnessError(f"a Crucible region needs exactly 3 downstairs, got {len(downstairs)}")
        self.name = name
        self.id = disk_id or str(uuidlib.uuid4())
        self.geometry: RegionGeometry = downstairs.geometry
        self.downstairs_set = downstairs
        # The three the VCR names, in target order (member i of the set, until a replacement).
        self.downstairs: list[Downstairs] = [downstairs.member(i) for i in range(3)]
        # Never logged: `redacted_vcr` hides it wherever the framework writes a VCR down.
        self._key = base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() if self.encrypted else None
        # A raw image whose blocks show through until written (a guest image for boot disks).
        self.read_only_parent = read_only_parent
        self._parent_id = str(uuidlib.uuid4())
        self._black_holes = {hole.kind: hole for hole in black_holes}
        self._black_hole: BlackHole | None = None  # the one the VCR names now, if any
        self.generation = 1
        # The VMs that attached this disk, in attachment order: DiskFactory.close stops them
        # before their downstairs go (a stopping VM flushes to them).
        self._users: list[_Closeable] = []

    # --- geometry (the set's) -------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        return self.geometry.size_bytes

    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    @property
    def blocks_per_extent(self) -> int:
        return self.geometry.extent_size

    @property
    def extent_count(self) -> int:
        return self.geometry.extent_count

    @property
    def encrypted(self) -> bool:
        """Regions created `--encrypted` and a key of the disk's own in every VCR."""
        return self.geometry.encrypted

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
        if all(user is not vm for user in self._users):  # identity, not equality
            self._users.append(vm)

    @property
    def users(self) -> tuple[_Closeable, ...]:
        """The VMs that attached this disk (successors included), oldest first."""
        return tuple(self._users)

    def add_spare(self, port: int) -> Downstairs:
        """A new downstairs of the disk's set on `port` (a pair: + 4000 too): a fresh, empty
        region of the disk's geometry, started; `replace_downstairs` swaps it in."""
        return self.downstairs_set.member(self.downstairs_set.add(port=port))

    def __repr__(self) -> str:  # no key in it, ever
        return (f"CrucibleDisk({self.name!r}, id={self.id}, gen={self.generation}, "
                f"encrypted={self.encrypted}, targets={self.targets()})")

    def replace_downstairs(self, index: int, new: Downstairs) -> Downstairs:
        """Name `new` instead of downstairs `index` in the next VCRs (send one with
        `vm.replace_crucible_vcr(disk)` at a higher generation); returns the old one, which
        stays in the disk's set and is torn down with it."""
        if not 0 <= index < len(self.downstairs):
            raise HarnessError(f"disk {self.name} has downstairs 0..{len(self.downstairs) - 1}, not {index}")
        if new in self.downstairs:
            raise HarnessError(f"{new.address} already serves disk {self.name}")
        if all(new is not self.downstairs_set.member(i) for i in range(len(self.downstairs_set))):
            raise HarnessError(f"{new.name} is not one of disk {self.name}'s downstairs (a region of "
                               "another geometry, or another disk's): make spares with "
                               "disk_factory.add_downstairs(disk)")
        old = self.downstairs[index]
        self.downstairs[index] = new
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
        with teardown.step():
            self.downstairs_set.close()  # every member, in every state; idempotent
        for hole in self._black_holes.values():
            with teardown.step():
                hole.close()
        teardown.finish()
