"""VCR targets must lie in the allowed networks (default loopback only)."""

from __future__ import annotations

import ipaddress
import json

import pytest

from sut.server.policy import TargetNotAllowedError, TargetPolicy, check_vcr_targets

# The first address after 127/8, built by arithmetic rather than written as a literal.
NOT_LOOPBACK = str(ipaddress.ip_address("127.0.0.1") + 2**24)
LOOPBACK = TargetPolicy.default()


@pytest.mark.parametrize("target", ["127.0.0.1:3810", "127.255.0.9:1"])
def test_loopback_is_allowed_by_default(target: str) -> None:
    LOOPBACK.check(target, "sub_volumes[0].opts.target[0]")


@pytest.mark.parametrize(
    ("target", "needles"),
    [
        (f"{NOT_LOOPBACK}:3810", ["outside the allowed networks [127.0.0.0/8]", "--allow-targets CIDR"]),
        ("[::1]:3810", ["::1", "--allow-targets"]),
        ("0.0.0.0:3810", ["never allowed", "unspecified"]),
        ("[::]:3810", ["never allowed", "unspecified"]),
        ("224.0.0.1:3810", ["never allowed", "multicast"]),
        ("255.255.255.255:3810", ["never allowed", "broadcast"]),
    ],
)
def test_refused_targets_name_the_rule_and_the_flag(target: str, needles: list[str]) -> None:
    with pytest.raises(TargetNotAllowedError) as info:
        LOOPBACK.check(target, "sub_volumes[0].opts.target[1]")
    message = str(info.value)
    assert message.startswith("sub_volumes[0].opts.target[1]: ")
    for needle in needles:
        assert needle in message, message


def test_allow_targets_widens_but_never_to_unspecified() -> None:
    wide = TargetPolicy.parse([f"{NOT_LOOPBACK}/32", "::1/128"])
    wide.check(f"{NOT_LOOPBACK}:1", "t")
    wide.check("[::1]:1", "t")
    with pytest.raises(TargetNotAllowedError):
        wide.check("127.0.0.1:1", "t")  # the flag replaces the default
    with pytest.raises(TargetNotAllowedError, match="never allowed"):
        TargetPolicy.parse(["0.0.0.0/0"]).check("0.0.0.0:1", "t")
    with pytest.raises(ValueError, match="CIDR"):
        TargetPolicy.parse(["not-a-net"])


def test_every_target_of_a_vcr_is_checked() -> None:
    region = {"type": "region", "block_size": 512, "blocks_per_extent": 8, "extent_count": 1, "gen": 1,
              "opts": {"id": "x", "lossy": False, "read_only": True,
                       "target": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]}}
    bad = json.loads(json.dumps(region))
    bad["opts"]["target"][2] = f"{NOT_LOOPBACK}:3"
    parent = {"type": "volume", "id": "p", "block_size": 512, "sub_volumes": [bad]}
    doc = {"type": "volume", "id": "v", "block_size": 512, "sub_volumes": [region],
           "read_only_parent": parent}
    with pytest.raises(TargetNotAllowedError, match=r"read_only_parent\.sub_volumes\[0\]\.opts\.target\[2\]"):
        check_vcr_targets(json.dumps(doc), LOOPBACK)
