"""The VCR rules at their edges: target syntax, exact error texts and paths, the builder,
and each replacement rule from both sides (issue 14: tests that a mutant of vcr.py fails).

test_vcr.py walks the rules once each; these pin the boundaries a changed constant or
operator would move (port 65535 / 65536, a key added vs removed, a non-region sub-volume
changed vs unchanged) and the messages the API returns as they are, word for word.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from sut.storage.errors import ReplaceRuleError, VcrError
from sut.storage.vcr import (
    FileVcr,
    RegionVcr,
    TargetChange,
    VolumeVcr,
    compare,
    dump_vcr,
    iter_targets,
    parse_target,
    parse_vcr,
    parse_volume,
    region_volume,
)

from .test_vcr import EXAMPLE, VID, example, region

TARGETS = ["127.0.0.1:8810", "127.0.0.1:8820", "127.0.0.1:8830"]
U64_MAX = 2**64 - 1


def volume(doc: dict[str, Any]) -> VolumeVcr:
    vcr = parse_vcr(json.dumps(doc))
    assert isinstance(vcr, VolumeVcr)
    return vcr


def rule_error(old: dict[str, Any], new: dict[str, Any]) -> ReplaceRuleError:
    with pytest.raises(ReplaceRuleError) as info:
        compare(volume(old), volume(new))
    return info.value


# --- targets: what Rust's SocketAddr accepts, nothing more ---------------------------------------
@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:1", "127.0.0.1", 1),
        ("127.0.0.1:65535", "127.0.0.1", 65535),
        ("127.1.2.3:08080", "127.1.2.3", 8080),  # five digits, a leading zero
        ("[::1]:3810", "::1", 3810),
        ("[0:0:0:0:0:0:0:1]:19000", "0:0:0:0:0:0:0:1", 19000),  # loopback, every group written
        ("[::ffff:127.0.0.1]:80", "::ffff:127.0.0.1", 80),
    ],
)
def test_targets_that_parse(text: str, host: str, port: int) -> None:
    assert parse_target(text) == (host, port)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("127.0.0.1:65536", "port must be 1..65535"),
        ("127.0.0.1:65537", "port must be 1..65535"),
        ("127.0.0.1:0", "port must be 1..65535"),
        ("127.0.0.1:00000", "port must be 1..65535"),
        ("127.0.0.1:", "port must be 1..65535"),
        ("127.0.0.1:008080", "port must be 1..65535"),  # six digits, even if the value fits
        ("127.0.0.1:" + "9" * 5000, "port must be 1..65535"),  # not int()'s 4300-digit error
        ("127.0.0.1:18446744073709551617", "port must be 1..65535"),
        ("127.0.0.1:-1", "port must be 1..65535"),
        ("127.0.0.1:+80", "port must be 1..65535"),
        ("127.0.0.1: 80", "port must be 1..65535"),
        ("127.0.0.1:\u0668\u0660", "port must be 1..65535"),  # Arabic-Indic "80": int() reads 80
        ("127.0.0.1:\u00b3", "port must be 1..65535"),  # superscript three: isdigit() says yes
        ("::1:80", "an IPv6 address goes in brackets, an IPv4 address does not"),
        ("[127.0.0.1]:80", "an IPv6 address goes in brackets, an IPv4 address does not"),
    ],
)
def test_target_problems_are_named(text: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_target(text)
    assert str(info.value) == f"target {text!r}: {problem}"


@pytest.mark.parametrize(
    ("text", "host"),
    [
        ("localhost:80", "localhost"),
        ("X127.0.0.1:80", "X127.0.0.1"),
        ("[[::1]]:80", "[[::1]]"),
        ("[::1:80", "[::1"),
        ("::1]:80", "::1]"),
        ("[]:80", "[]"),
        ("127.0.0.1,id=x:80", "127.0.0.1,id=x"),  # a comma would end a QEMU option
        ("127.0.0.1:80:80", "127.0.0.1:80"),
    ],
)
def test_a_host_that_is_no_ip_address(text: str, host: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_target(text)
    assert str(info.value) == f"target {text!r}: {host!r} is not an IP address"


@pytest.mark.parametrize("text", ["", ":80", "127.0.0.1", "80"])
def test_no_host_or_no_colon_is_not_ip_port(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_target(text)
    assert str(info.value) == f'target {text!r} is not "ip:port"'


def test_a_vcr_with_an_out_of_range_port_names_the_target() -> None:
    doc = example()
    region(doc)["opts"]["target"][2] = "127.0.0.1:65536"
    with pytest.raises(VcrError) as info:
        parse_vcr(json.dumps(doc))
    assert str(info.value) == ("invalid VCR: sub_volumes[0].opts.target: "
                               "target '127.0.0.1:65536': port must be 1..65535")


# --- error texts: one line per problem, JSON paths without pydantic's union tags ---------------
def test_error_is_the_path_and_problem_word_for_word() -> None:
    doc = example()
    region(doc)["opts"]["target"].pop()
    with pytest.raises(VcrError) as info:
        parse_vcr(json.dumps(doc))
    assert str(info.value) == ('invalid VCR: sub_volumes[0].opts.target: expected exactly 3 "ip:port" '
                               "targets, got 2")


def test_several_problems_are_joined_in_one_message() -> None:
    doc = example()
    del region(doc)["opts"]["lossy"]
    del region(doc)["opts"]["read_only"]
    with pytest.raises(VcrError) as info:
        parse_vcr(json.dumps(doc))
    assert str(info.value) == ("invalid VCR: sub_volumes[0].opts.lossy: Field required; "
                               "sub_volumes[0].opts.read_only: Field required")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"type": "bogus"}, "$: unknown \"type\"; expected one of ['file', 'region', 'url', 'volume']"),
        ({"id": VID}, '$: missing "type" (one of volume, region, file, url)'),
        # the url variant's own "url" field is a field, not the tag
        ({"type": "url", "id": VID, "block_size": 512}, "url: Field required"),
        ({"type": "file", "id": VID, "block_size": 512}, "path: Field required"),
    ],
    ids=["unknown-type", "missing-type", "url-field", "file-field"],
)
def test_root_level_errors(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(VcrError) as info:
        parse_vcr(json.dumps(doc))
    assert str(info.value) == f"invalid VCR: {message}"


def nested(depth: int, leaf: dict[str, Any]) -> dict[str, Any]:
    """``depth`` volumes, each the only sub-volume of the one above, around ``leaf``."""
    doc = leaf
    for level in range(depth):
        doc = {"type": "volume", "id": f"v{level}", "block_size": 512, "sub_volumes": [doc]}
    return doc


def test_paths_through_nested_volumes_and_parents() -> None:
    bad = copy.deepcopy(region(example()))
    bad["gen"] = 0
    doc = example()
    doc["read_only_parent"] = nested(3, bad)
    with pytest.raises(VcrError) as info:
        parse_vcr(json.dumps(doc))
    assert str(info.value) == ("invalid VCR: read_only_parent.sub_volumes[0].sub_volumes[0]."
                               "sub_volumes[0].gen: Input should be greater than or equal to 1")


def test_deeply_nested_volumes_parse_and_walk_up_to_the_depth_limit() -> None:
    leaf = copy.deepcopy(region(example()))
    vcr = parse_vcr(json.dumps(nested(13, leaf)))
    found = list(iter_targets(vcr))
    assert [t for _, t in found] == TARGETS
    assert found[0][0] == "sub_volumes[0]." * 13 + "opts.target[0]"
    assert isinstance(vcr, VolumeVcr) and vcr.size_bytes == 512 * 131072 * 16
    with pytest.raises(VcrError, match="nesting deeper than"):
        parse_vcr(json.dumps(nested(40, leaf)))


def test_a_non_object_names_its_json_type() -> None:
    for text, kind in (("[1, 2]", "list"), ('"volume"', "str"), ("7", "int"), ("null", "NoneType")):
        with pytest.raises(VcrError) as info:
            parse_vcr(text)
        assert str(info.value) == f"VCR must be a JSON object, got {kind}"


# --- what a block backend accepts -----------------------------------------------------------------
def test_a_volume_without_regions_is_refused() -> None:
    doc = example()
    doc["sub_volumes"] = []
    with pytest.raises(VcrError) as info:
        parse_volume(json.dumps(doc))
    assert str(info.value) == "sub_volumes: a volume needs at least one region"


def test_a_parent_of_another_block_size_is_refused() -> None:
    doc = example()
    doc["read_only_parent"]["block_size"] = 4096
    with pytest.raises(VcrError) as info:
        parse_volume(json.dumps(doc))
    assert str(info.value) == ("read_only_parent.block_size: 4096 differs from the volume's "
                               "block_size 512")


def test_a_nested_volume_is_no_region() -> None:
    doc = example()
    doc["sub_volumes"] = [region(example()), nested(1, region(example()))]
    with pytest.raises(VcrError) as info:
        parse_volume(json.dumps(doc))
    assert str(info.value) == 'sub_volumes[1].type: expected "region", got "volume"'


def test_dump_is_compact_and_keeps_comma_laden_paths() -> None:
    doc = example()
    doc["read_only_parent"]["path"] = "/images/a,b,,c/guest,raw=on.img"
    text = dump_vcr(parse_volume(json.dumps(doc)))
    assert ", " not in text and ": " not in text  # separators (",", ":")
    assert json.loads(text) == doc
    again = parse_volume(text)
    assert isinstance(again.read_only_parent, FileVcr)
    assert again.read_only_parent.path == "/images/a,b,,c/guest,raw=on.img"


# --- the one builder tests, the bench and the fuzz share ------------------------------------------
def test_region_volume_defaults() -> None:
    vcr = region_volume(VID, TARGETS, blocks_per_extent=64, extent_count=2)
    assert json.loads(dump_vcr(vcr)) == {
        "type": "volume", "id": VID, "block_size": 512, "read_only_parent": None,
        "sub_volumes": [{
            "type": "region", "block_size": 512, "blocks_per_extent": 64, "extent_count": 2, "gen": 1,
            "opts": {"id": VID, "target": TARGETS, "lossy": False, "read_only": False,
                     "flush_timeout": None, "key": None, "cert_pem": None, "key_pem": None,
                     "root_cert_pem": None, "control": None},
        }],
    }
    assert parse_volume(dump_vcr(vcr)) == vcr


def test_region_volume_takes_every_argument() -> None:
    parent = FileVcr(id="p", block_size=4096, path="/base,1.raw")
    vcr = region_volume("vol", list(reversed(TARGETS)), gen=U64_MAX, block_size=4096,
                        blocks_per_extent=8, extent_count=3, read_only_parent=parent)
    assert (vcr.id, vcr.block_size, vcr.read_only_parent) == ("vol", 4096, parent)
    (sub,) = vcr.sub_volumes
    assert isinstance(sub, RegionVcr)
    assert (sub.block_size, sub.blocks_per_extent, sub.extent_count, sub.gen) == (4096, 8, 3, U64_MAX)
    assert (sub.opts.id, sub.opts.target, sub.opts.lossy, sub.opts.read_only) == (
        "vol", list(reversed(TARGETS)), False, False)
    assert vcr.size_bytes == 4096 * 8 * 3
    assert parse_volume(dump_vcr(vcr)) == vcr


def test_region_volume_validates_like_a_parsed_vcr() -> None:
    with pytest.raises(ValueError, match=r"port must be 1\.\.65535"):
        region_volume(VID, [*TARGETS[:2], "127.0.0.1:65536"], blocks_per_extent=1, extent_count=1)
    with pytest.raises(ValueError, match="over the limit of 9223372036854775807 bytes"):
        region_volume(VID, TARGETS, blocks_per_extent=2**32, extent_count=2**32)


# --- replacement rules from both sides ------------------------------------------------------------
def bumped(doc: dict[str, Any], gen: int = 2) -> dict[str, Any]:
    new = copy.deepcopy(doc)
    for sub in new["sub_volumes"]:
        if sub["type"] == "region":
            sub["gen"] = gen
    return new


@pytest.mark.parametrize(
    ("change", "rule", "message"),
    [
        (lambda d: d.__setitem__("id", "other"), "volume-id-changed", f"volume id changed {VID} -> other"),
        (lambda d: d["sub_volumes"].append(copy.deepcopy(region(d))), "sub-volume-count-changed",
         "sub_volumes count changed 1 -> 2"),
        (lambda d: region(d).__setitem__("extent_count", 17), "geometry-changed",
         "sub_volumes[0].extent_count changed 16 -> 17"),
        (lambda d: region(d).__setitem__("block_size", 4096), "geometry-changed",
         "sub_volumes[0].block_size changed 512 -> 4096"),
        (lambda d: region(d).__setitem__("gen", 1), "no-change",
         "the new VCR is identical to the current one"),
        (lambda d: d["read_only_parent"].__setitem__("id", "x"), "read-only-parent-changed",
         "read_only_parent must stay the same or be dropped"),
        (lambda d: region(d)["opts"].__setitem__("key", "A" * 43 + "="), "opts-changed",
         "sub_volumes[0].opts.key may not change"),
        (lambda d: region(d)["opts"].__setitem__("id", "other"), "upstairs-id-changed",
         "sub_volumes[0].opts.id may not change"),
    ],
    ids=["volume-id", "count", "extent-count", "region-block-size", "identical", "parent", "key", "opts-id"],
)
def test_rule_messages_word_for_word(change: Any, rule: str, message: str) -> None:
    new = example()
    change(new)
    error = rule_error(EXAMPLE, new)
    assert (error.rule, str(error)) == (rule, f"{message} (rule: {rule})")


def test_volume_block_size_message() -> None:
    new = example()
    new["block_size"] = new["read_only_parent"]["block_size"] = region(new)["block_size"] = 4096
    error = rule_error(EXAMPLE, new)
    assert str(error) == "volume block_size changed 512 -> 4096 (rule: block-size-changed)"


def test_parent_added_message() -> None:
    old = example()
    old["read_only_parent"] = None
    error = rule_error(old, EXAMPLE)
    assert str(error) == "a read_only_parent may be dropped but not added (rule: read-only-parent-added)"


@pytest.mark.parametrize(
    ("old_gen", "new_gen", "outcome"),
    [
        (1, 1, "no-change"),
        (1, 2, "accepted"),
        (2, 1, "generation-lower"),
        (1, U64_MAX, "accepted"),
        (U64_MAX, U64_MAX - 1, "generation-lower"),
        (U64_MAX, U64_MAX, "no-change"),
    ],
)
def test_generation_only_changes(old_gen: int, new_gen: int, outcome: str) -> None:
    old, new = bumped(EXAMPLE, old_gen), bumped(EXAMPLE, new_gen)
    if outcome == "accepted":
        assert compare(volume(old), volume(new)).changes == ()
    else:
        error = rule_error(old, new)
        assert error.rule == outcome
        if outcome == "generation-lower":
            assert str(error) == (f"sub_volumes[0].gen went backwards {old_gen} -> {new_gen} "
                                  "(rule: generation-lower)")


def test_a_target_change_with_a_generation_bump() -> None:
    new = bumped(EXAMPLE, 7)
    region(new)["opts"]["target"][2] = "[::1]:9000"
    outcome = compare(volume(EXAMPLE), volume(new))
    assert outcome.changes == (TargetChange(0, 2, "127.0.0.1:8830", "[::1]:9000"),)


def test_the_generation_is_checked_in_every_region() -> None:
    old = example()
    old["sub_volumes"].append(copy.deepcopy(region(old)))
    new = bumped(old, 3)
    new["sub_volumes"][1]["gen"] = 1  # the second region keeps its generation: fine
    assert compare(volume(old), volume(new)).changes == ()
    old["sub_volumes"][1]["gen"] = 5
    error = rule_error(old, new)
    assert str(error) == "sub_volumes[1].gen went backwards 5 -> 1 (rule: generation-lower)"


def test_two_target_changes_are_listed() -> None:
    new = bumped(EXAMPLE)
    region(new)["opts"]["target"][0] = "127.0.0.1:9901"
    region(new)["opts"]["target"][2] = "127.0.0.1:9903"
    error = rule_error(EXAMPLE, new)
    assert str(error) == ("only one target may change per replacement, got 127.0.0.1:8810 -> 127.0.0.1:9901, "
                          "127.0.0.1:8830 -> 127.0.0.1:9903 (rule: two-targets-changed)")


def test_target_changes_in_two_regions_are_two_changes() -> None:
    old = example()
    old["sub_volumes"].append(copy.deepcopy(region(old)))
    new = bumped(old)
    new["sub_volumes"][0]["opts"]["target"][1] = "127.0.0.1:9901"
    new["sub_volumes"][1]["opts"]["target"][0] = "127.0.0.1:9902"
    assert rule_error(old, new).rule == "two-targets-changed"
    outcome = compare(volume(old), volume(new), allow_multiple_targets=True)
    assert outcome.changes == (TargetChange(0, 1, "127.0.0.1:8820", "127.0.0.1:9901"),
                               TargetChange(1, 0, "127.0.0.1:8810", "127.0.0.1:9902"))


@pytest.mark.parametrize("side", ["added", "removed"])
def test_an_opts_key_added_or_removed_is_refused(side: str) -> None:
    """opts keep unknown keys (a newer Crucible's); one appearing or going away is a change."""
    with_key = example()
    region(with_key)["opts"]["future_option"] = 3
    old, new = (EXAMPLE, bumped(with_key)) if side == "added" else (with_key, bumped(EXAMPLE))
    error = rule_error(old, new)
    assert str(error) == "sub_volumes[0].opts.future_option may not change (rule: opts-changed)"


def test_a_null_opts_key_equals_a_missing_one() -> None:
    without = example()
    del region(without)["opts"]["control"]
    assert compare(volume(EXAMPLE), volume(bumped(without))).changes == ()


def with_file_sub_volume(first: bool, path: str = "/a.raw") -> dict[str, Any]:
    doc = example()
    file = {"type": "file", "id": "f", "block_size": 512, "path": path}
    doc["sub_volumes"] = [file, region(doc)] if first else [region(doc), file]
    return doc


@pytest.mark.parametrize("first", [True, False])
def test_a_changed_non_region_sub_volume_is_refused(first: bool) -> None:
    old, new = with_file_sub_volume(first), bumped(with_file_sub_volume(first, "/b.raw"))
    error = rule_error(old, new)
    where = 0 if first else 1
    assert str(error) == f"sub_volumes[{where}]: non-region changed (rule: sub-volume-changed)"


@pytest.mark.parametrize("first", [True, False])
def test_an_unchanged_non_region_sub_volume_lets_the_regions_change(first: bool) -> None:
    old = with_file_sub_volume(first)
    new = bumped(old)
    index = 1 if first else 0
    new["sub_volumes"][index]["opts"]["target"][0] = "127.0.0.1:9901"
    outcome = compare(volume(old), volume(new))
    assert outcome.changes == (TargetChange(index, 0, "127.0.0.1:8810", "127.0.0.1:9901"),)


def test_a_region_replaced_by_a_non_region_is_refused() -> None:
    old = example()
    old["read_only_parent"] = None
    new = with_file_sub_volume(False)
    new["sub_volumes"] = [new["sub_volumes"][1]]
    new["read_only_parent"] = None
    for a, b in ((old, new), (new, old)):
        error = rule_error(a, b)
        assert str(error) == "sub_volumes[0]: non-region changed (rule: sub-volume-changed)"


def test_a_region_built_without_validation_is_not_compared_on_three_targets() -> None:
    """model_copy() skips the validators: a fourth target must not be silently ignored."""
    old = parse_volume(json.dumps(EXAMPLE))
    sub = old.sub_volumes[0]
    assert isinstance(sub, RegionVcr)
    four = sub.model_copy(update={"gen": 2, "opts": sub.opts.model_copy(
        update={"target": [*sub.opts.target, "127.0.0.1:9999"]})})
    new = old.model_copy(update={"sub_volumes": [four]})
    with pytest.raises(ValueError, match="zip"):
        compare(old, new)
