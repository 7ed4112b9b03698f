"""Volume Construction Request (VCR) model: parse, serialise, and replacement comparison.

The JSON is Crucible's (internally tagged by ``"type"``), so real VCRs parse unchanged.
Unknown fields are kept (``extra="allow"``) so a round trip never silently drops data.
pydantic is fine here: only the server-side upstairs imports this module, never the downstairs.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sut import bounded_json
from sut.storage.errors import ReplaceRuleError, VcrError

__all__ = [
    "FileVcr",
    "RegionOpts",
    "RegionVcr",
    "ReplaceOutcome",
    "TargetChange",
    "UrlVcr",
    "Vcr",
    "VolumeVcr",
    "compare",
    "dump_vcr",
    "iter_targets",
    "parse_target",
    "parse_vcr",
    "parse_volume",
]

_TAGS = frozenset({"volume", "region", "file", "url"})

# Value bounds: every integer of a VCR is a u64 in Crucible, and QEMU refuses a disk larger
# than the largest signed 64-bit offset, so a volume is at most that many bytes. Checked at
# parse time so a bad value is a 400 naming the field, not a struct.error in the NBD handshake.
U64_MAX = 2**64 - 1
MAX_VOLUME_BYTES = 2**63 - 1
BLOCK_SIZES = (512, 4096)
U64 = Annotated[int, Field(ge=1, le=U64_MAX)]


def parse_target(text: str) -> tuple[str, int]:
    """Split ``"ip:port"`` into (host, port); raises ValueError naming the problem.

    As Rust's ``SocketAddr`` reads it (Crucible's targets are SocketAddrs): an IPv6 address
    in brackets (``[::1]:3810``), an IPv4 one without, the port in ASCII digits.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f'target {text!r} is not "ip:port"')
    bracketed = host.startswith("[") and host.endswith("]")
    address = host[1:-1] if bracketed else host
    try:
        version = ipaddress.ip_address(address).version
    except ValueError:
        raise ValueError(f"target {text!r}: {host!r} is not an IP address") from None
    if bracketed != (version == 6):
        raise ValueError(f"target {text!r}: an IPv6 address goes in brackets, an IPv4 address does not")
    # isdigit() alone admits other scripts' digits ("٨٠" is 80 to int()); five digits at most
    # keeps int() off a string of thousands.
    digits = port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
    if not digits or not 0 < int(port_text) < 65536:
        raise ValueError(f"target {text!r}: port must be 1..65535")
    return address, int(port_text)


def _check_block_size(value: int) -> int:
    if value not in BLOCK_SIZES:
        raise ValueError(f"must be 512 or 4096 (the block sizes Crucible supports), got {value}")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class _Sized(_Model):
    block_size: int

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        return _check_block_size(value)


class RegionOpts(_Model):
    id: str
    target: list[str]
    lossy: bool
    read_only: bool
    flush_timeout: float | None = None
    key: str | None = None
    cert_pem: str | None = None
    key_pem: str | None = None
    root_cert_pem: str | None = None
    control: str | None = None

    @field_validator("target")
    @classmethod
    def _three_targets(cls, value: list[str]) -> list[str]:
        if len(value) != 3:
            raise ValueError(f'expected exactly 3 "ip:port" targets, got {len(value)}')
        for item in value:
            parse_target(item)
        if len(set(value)) != 3:
            raise ValueError("targets must be distinct (a region needs three separate copies)")
        return value

    @field_validator("key")
    @classmethod
    def _key_is_32_bytes(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("key must be base64") from None
        if len(raw) != 32:
            raise ValueError(f"key must be base64 of 32 bytes, got {len(raw)} bytes")
        return value


class RegionVcr(_Sized):
    type: Literal["region"] = "region"
    blocks_per_extent: U64
    extent_count: U64
    gen: U64
    opts: RegionOpts

    @property
    def size_bytes(self) -> int:
        return self.block_size * self.blocks_per_extent * self.extent_count

    @model_validator(mode="after")
    def _size_fits(self) -> RegionVcr:
        if self.size_bytes > MAX_VOLUME_BYTES:
            raise ValueError(
                f"size of {self.block_size} * {self.blocks_per_extent} * {self.extent_count} bytes is "
                f"over the limit of {MAX_VOLUME_BYTES} bytes (the largest disk QEMU accepts)"
            )
        return self


class FileVcr(_Sized):
    type: Literal["file"] = "file"
    id: str
    path: str


class UrlVcr(_Sized):
    type: Literal["url"] = "url"
    id: str
    url: str


class VolumeVcr(_Sized):
    type: Literal["volume"] = "volume"
    id: str
    sub_volumes: list[Vcr]
    read_only_parent: Vcr | None = None

    @model_validator(mode="after")
    def _size_fits(self) -> VolumeVcr:
        total = sum(sv.size_bytes for sv in self.sub_volumes if isinstance(sv, RegionVcr | VolumeVcr))
        if total > MAX_VOLUME_BYTES:
            raise ValueError(
                f"volume size of {total} bytes (the sum of its sub_volumes) is over the limit of "
                f"{MAX_VOLUME_BYTES} bytes (the largest disk QEMU accepts)"
            )
        return self

    @property
    def size_bytes(self) -> int:
        return sum(sv.size_bytes for sv in self.sub_volumes if isinstance(sv, RegionVcr | VolumeVcr))

    @property
    def regions(self) -> list[RegionVcr]:
        """Sub-volumes that are regions, in LBA order."""
        return [sv for sv in self.sub_volumes if isinstance(sv, RegionVcr)]


Vcr = Annotated[VolumeVcr | RegionVcr | FileVcr | UrlVcr, Field(discriminator="type")]


class _Root(BaseModel):
    vcr: Vcr


def _path(loc: tuple[int | str, ...]) -> str:
    # pydantic puts the union tag into the location ("sub_volumes", 0, "region", ...);
    # users think in JSON paths, so the tag is dropped.
    out = ""
    previous: int | str | None = None
    for part in loc:
        if (
            isinstance(part, str)
            and part in _TAGS
            and (previous is None or isinstance(previous, int) or previous == "read_only_parent")
        ):
            previous = part
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
        previous = part
    return out or "$"


def _vcr_error(exc: ValidationError) -> VcrError:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])[1:]  # drop the "vcr" wrapper field
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "union_tag_invalid":
            msg = f'unknown "type"; expected one of {sorted(_TAGS)}'
        elif err["type"] == "union_tag_not_found":
            msg = 'missing "type" (one of volume, region, file, url)'
        lines.append(f"{_path(loc)}: {msg}")
    return VcrError("invalid VCR: " + "; ".join(lines))


def parse_vcr(text: str | bytes) -> VolumeVcr | RegionVcr | FileVcr | UrlVcr:
    """Parse VCR JSON of any variant; raises VcrError naming the JSON path and problem.

    The JSON goes through the one bounded parser (size, depth, integer digits, finite
    floats), so no VCR can cost a recursion error, a quadratic integer or a 500.
    """
    try:
        data = bounded_json.loads(text)
    except bounded_json.JsonLimitError as exc:
        raise VcrError(f"VCR is not acceptable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise VcrError(f"VCR must be a JSON object, got {type(data).__name__}")
    try:
        return _Root.model_validate({"vcr": data}).vcr
    except ValidationError as exc:
        raise _vcr_error(exc) from None


def parse_volume(text: str | bytes) -> VolumeVcr:
    """Parse a VCR that a block backend can serve: a volume of regions."""
    vcr = parse_vcr(text)
    if not isinstance(vcr, VolumeVcr):
        raise VcrError(f'$.type: a disk backend needs a "volume" VCR, got "{vcr.type}"')
    if not vcr.sub_volumes:
        raise VcrError("sub_volumes: a volume needs at least one region")
    for i, sub in enumerate(vcr.sub_volumes):
        if not isinstance(sub, RegionVcr):
            raise VcrError(f'sub_volumes[{i}].type: expected "region", got "{sub.type}"')
        if sub.block_size != vcr.block_size:
            raise VcrError(
                f"sub_volumes[{i}].block_size: {sub.block_size} differs from the volume's "
                f"block_size {vcr.block_size}"
            )
    parent = vcr.read_only_parent
    if parent is not None and parent.block_size != vcr.block_size:
        raise VcrError(
            f"read_only_parent.block_size: {parent.block_size} differs from the volume's "
            f"block_size {vcr.block_size}"
        )
    return vcr


def region_volume(volume_id: str, targets: list[str], *, gen: int = 1, block_size: int = 512,
                  blocks_per_extent: int, extent_count: int,
                  read_only_parent: FileVcr | None = None) -> VolumeVcr:
    """The common shape: a volume holding one three-way region (upstairs id = volume id)."""
    opts = RegionOpts(id=volume_id, target=targets, lossy=False, read_only=False)
    region = RegionVcr(block_size=block_size, blocks_per_extent=blocks_per_extent,
                       extent_count=extent_count, gen=gen, opts=opts)
    return VolumeVcr(id=volume_id, block_size=block_size, sub_volumes=[region],
                     read_only_parent=read_only_parent)


def iter_targets(vcr: VolumeVcr | RegionVcr | FileVcr | UrlVcr, where: str = "") -> Iterator[tuple[str, str]]:
    """Every downstairs ``target`` of ``vcr``, with its JSON path: regions, sub-volumes, parents."""
    if isinstance(vcr, RegionVcr):
        for i, target in enumerate(vcr.opts.target):
            yield f"{where}opts.target[{i}]", target
    elif isinstance(vcr, VolumeVcr):
        for i, sub in enumerate(vcr.sub_volumes):
            yield from iter_targets(sub, f"{where}sub_volumes[{i}].")
        if vcr.read_only_parent is not None:
            yield from iter_targets(vcr.read_only_parent, f"{where}read_only_parent.")


def dump_vcr(vcr: VolumeVcr | RegionVcr | FileVcr | UrlVcr) -> str:
    """Serialise to compact JSON that :func:`parse_vcr` turns back into an equal model."""
    return json.dumps(vcr.model_dump(mode="json"), separators=(",", ":"))


@dataclass(frozen=True)
class TargetChange:
    """One downstairs address swapped: ``sub_volume`` indexes the volume's regions."""

    sub_volume: int
    index: int
    old: str
    new: str


@dataclass(frozen=True)
class ReplaceOutcome:
    """Result of :func:`compare`: no change means a generation-only update ("VcrMatches")."""

    changes: tuple[TargetChange, ...]

    @property
    def target(self) -> TargetChange | None:
        return self.changes[0] if self.changes else None


def _opts_without_target(opts: RegionOpts) -> dict[str, Any]:
    data = opts.model_dump(mode="json")
    data.pop("target")
    return data


def compare(old: VolumeVcr, new: VolumeVcr, *, allow_multiple_targets: bool = False) -> ReplaceOutcome:
    """Check that ``new`` is a valid replacement for ``old`` (Crucible's rules).

    ``allow_multiple_targets`` exists only for the ``multi-target-replace`` regression.
    """
    if new.id != old.id:
        raise ReplaceRuleError("volume-id-changed", f"volume id changed {old.id} -> {new.id}")
    if new.block_size != old.block_size:
        raise ReplaceRuleError(
            "block-size-changed", f"volume block_size changed {old.block_size} -> {new.block_size}"
        )
    if len(new.sub_volumes) != len(old.sub_volumes):
        raise ReplaceRuleError(
            "sub-volume-count-changed",
            f"sub_volumes count changed {len(old.sub_volumes)} -> {len(new.sub_volumes)}",
        )
    if old.read_only_parent is None and new.read_only_parent is not None:
        raise ReplaceRuleError("read-only-parent-added", "a read_only_parent may be dropped but not added")
    if (
        old.read_only_parent is not None
        and new.read_only_parent is not None
        and old.read_only_parent != new.read_only_parent
    ):
        raise ReplaceRuleError(
            "read-only-parent-changed", "read_only_parent must stay the same or be dropped"
        )
    changes: list[TargetChange] = []
    for i, (o, n) in enumerate(zip(old.sub_volumes, new.sub_volumes, strict=True)):
        where = f"sub_volumes[{i}]"
        if not isinstance(o, RegionVcr) or not isinstance(n, RegionVcr):
            if o != n:
                raise ReplaceRuleError("sub-volume-changed", f"{where}: non-region changed")
            continue
        for field in ("block_size", "blocks_per_extent", "extent_count"):
            if getattr(o, field) != getattr(n, field):
                raise ReplaceRuleError(
                    "geometry-changed",
                    f"{where}.{field} changed {getattr(o, field)} -> {getattr(n, field)}",
                )
        if n.gen < o.gen:
            raise ReplaceRuleError("generation-lower", f"{where}.gen went backwards {o.gen} -> {n.gen}")
        old_opts, new_opts = _opts_without_target(o.opts), _opts_without_target(n.opts)
        for key in sorted(set(old_opts) | set(new_opts)):
            if old_opts.get(key) != new_opts.get(key):
                rule = "upstairs-id-changed" if key == "id" else "opts-changed"
                raise ReplaceRuleError(rule, f"{where}.opts.{key} may not change")
        for j, (ot, nt) in enumerate(zip(o.opts.target, n.opts.target, strict=True)):
            if ot != nt:
                changes.append(TargetChange(i, j, ot, nt))
    if len(changes) > 1 and not allow_multiple_targets:
        listed = ", ".join(f"{c.old} -> {c.new}" for c in changes)
        raise ReplaceRuleError(
            "two-targets-changed", f"only one target may change per replacement, got {listed}"
        )
    # Equal VCRs have no target change and no generation change, so this one test is all of
    # "nothing changed"; a dropped read-only parent alone is a change.
    if new == old:
        raise ReplaceRuleError("no-change", "the new VCR is identical to the current one")
    return ReplaceOutcome(tuple(changes))
