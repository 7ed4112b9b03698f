"""Where a VCR may make the server connect: the target policy.

THE RULE: every ``target`` of a VCR - each region's three, in every sub-volume and in the
read-only parent, at creation (``PUT /instance``) and on replacement - must be an address in
the allowed networks: 127.0.0.0/8 by default, replaced by the ``--allow-targets CIDR`` flags
when given. The unspecified address (0.0.0.0, ::), multicast and the broadcast address are
never allowed (connecting to them reaches "any local interface" or many hosts, never the one
downstairs a VCR means). Host forwards of NICs follow the same loopback rule (spec.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sut.storage.vcr import FileVcr, RegionVcr, UrlVcr, VolumeVcr

# sut.storage.vcr (pydantic models) is imported where a VCR is checked, not here: the server
# imports this module at start-up (the --allow-targets parser), and an instance without a
# Crucible disk never needs the VCR models.

__all__ = ["ALLOW_TARGETS_FLAG", "DEFAULT_NETWORKS", "TargetNotAllowedError", "TargetPolicy",
           "check_vcr_targets"]

ALLOW_TARGETS_FLAG = "--allow-targets"
DEFAULT_NETWORKS = ("127.0.0.0/8",)
_BROADCAST = ipaddress.ip_address("255.255.255.255")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TargetNotAllowedError(ValueError):
    """A VCR target outside the allowed networks; the message names the target and the flag."""

    rule = "target-not-allowed"


@dataclass(frozen=True)
class TargetPolicy:
    networks: tuple[Network, ...]

    @classmethod
    def default(cls) -> TargetPolicy:
        return cls.parse(DEFAULT_NETWORKS)

    @classmethod
    def parse(cls, cidrs: Sequence[str]) -> TargetPolicy:
        networks = []
        for cidr in cidrs:
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                raise ValueError(f"expected a CIDR such as 127.0.0.0/8, got {cidr!r}") from None
        return cls(tuple(networks))

    def describe(self) -> str:
        return "[" + ", ".join(map(str, self.networks)) + "]"

    def check(self, target: str, where: str) -> None:
        """Raise :class:`TargetNotAllowedError` unless ``target`` ("ip:port") is allowed."""
        from sut.storage.vcr import parse_target

        try:
            host, _ = parse_target(target)
            ip = ipaddress.ip_address(host)
        except ValueError as exc:
            raise TargetNotAllowedError(f"{where}: {exc}") from None
        never = (
            "unspecified" if ip.is_unspecified
            else "multicast" if ip.is_multicast
            else "broadcast" if ip == _BROADCAST
            else None
        )
        if never is not None:
            raise TargetNotAllowedError(
                f"{where}: {ip} is a {never} address, which is never allowed as a downstairs target"
            )
        if not any(ip.version == net.version and ip in net for net in self.networks):
            raise TargetNotAllowedError(
                f"{where}: target {target} is outside the allowed networks {self.describe()}; "
                f"start the server with {ALLOW_TARGETS_FLAG} CIDR to allow it"
            )


def check_vcr_targets(vcr: VolumeVcr | RegionVcr | FileVcr | UrlVcr | str, policy: TargetPolicy) -> None:
    """Check every target of ``vcr`` (a parsed VCR, or its JSON)."""
    from sut.storage.vcr import iter_targets, parse_vcr

    for where, target in iter_targets(parse_vcr(vcr) if isinstance(vcr, str) else vcr):
        policy.check(target, where)
