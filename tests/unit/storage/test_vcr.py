"""VCR parsing, serialisation, error messages, and every replacement rule."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from sut.storage.errors import ReplaceRuleError, VcrError
from sut.storage.vcr import (
    FileVcr,
    RegionVcr,
    TargetChange,
    UrlVcr,
    VolumeVcr,
    compare,
    dump_vcr,
    parse_vcr,
    parse_volume,
)

VID = "3f1c6a52-7f0e-4b44-9d8b-2a9f0c1e5d10"
EXAMPLE: dict[str, Any] = {
    "type": "volume",
    "id": VID,
    "block_size": 512,
    "sub_volumes": [
        {
            "type": "region",
            "block_size": 512,
            "blocks_per_extent": 131072,
            "extent_count": 16,
            "gen": 1,
            "opts": {
                "id": VID,
                "target": ["127.0.0.1:8810", "127.0.0.1:8820", "127.0.0.1:8830"],
                "lossy": False,
                "flush_timeout": None,
                "key": None,
                "cert_pem": None,
                "key_pem": None,
                "root_cert_pem": None,
                "control": None,
                "read_only": False,
            },
        }
    ],
    "read_only_parent": {
        "type": "file",
        "id": "b7a0e0c4-1d5a-4c7e-8f2e-0d6a3e9c4b21",
        "block_size": 512,
        "path": "/path/to/guest.raw",
    },
}


def example() -> dict[str, Any]:
    return copy.deepcopy(EXAMPLE)


def region(d: dict[str, Any]) -> dict[str, Any]:
    return d["sub_volumes"][0]  # type: ignore[no-any-return]


def test_example_parses_into_typed_models() -> None:
    vcr = parse_volume(json.dumps(EXAMPLE))
    assert isinstance(vcr, VolumeVcr)
    sub = vcr.sub_volumes[0]
    assert isinstance(sub, RegionVcr)
    assert sub.size_bytes == 512 * 131072 * 16
    assert sub.opts.target[2] == "127.0.0.1:8830"
    assert isinstance(vcr.read_only_parent, FileVcr)


@pytest.mark.parametrize(
    "doc",
    [
        EXAMPLE,
        EXAMPLE["sub_volumes"][0],
        EXAMPLE["read_only_parent"],
        {"type": "url", "id": VID, "block_size": 4096, "url": "http://127.0.0.1:1/img"},
        {**EXAMPLE, "read_only_parent": None, "future_field": {"kept": True}},
    ],
)
def test_round_trip_yields_an_equal_model(doc: dict[str, Any]) -> None:
    vcr = parse_vcr(json.dumps(doc))
    again = parse_vcr(dump_vcr(vcr))
    assert again == vcr
    assert json.loads(dump_vcr(again)) == json.loads(dump_vcr(vcr))
    if doc.get("type") == "url":
        assert isinstance(vcr, UrlVcr)


def test_optional_opts_default_to_null() -> None:
    d = example()
    for key in ("flush_timeout", "key", "cert_pem", "key_pem", "root_cert_pem", "control"):
        del region(d)["opts"][key]
    vcr = parse_volume(json.dumps(d))
    assert json.loads(dump_vcr(vcr))["sub_volumes"][0]["opts"]["key"] is None


def _drop_target(d: dict[str, Any]) -> None:
    region(d)["opts"]["target"].pop()


def _bad_key(d: dict[str, Any]) -> None:
    region(d)["opts"]["key"] = "c2hvcnQ="


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_drop_target, 'sub_volumes[0].opts.target: expected exactly 3 "ip:port" targets, got 2'),
        (
            lambda d: region(d)["opts"]["target"].__setitem__(0, "localhost:1"),
            "sub_volumes[0].opts.target: target 'localhost:1': 'localhost' is not an IP address",
        ),
        (lambda d: region(d)["opts"]["target"].__setitem__(1, "127.0.0.1:0"), "port must be 1..65535"),
        (lambda d: region(d)["opts"]["target"].__setitem__(1, "127.0.0.1:8810"), "targets must be distinct"),
        (lambda d: region(d)["opts"].pop("read_only"), "sub_volumes[0].opts.read_only: Field required"),
        (lambda d: region(d).__setitem__("type", "bogus"), 'sub_volumes[0]: unknown "type"'),
        (lambda d: d.__setitem__("block_size", 1000), "block_size: must be 512 or 4096"),
        (lambda d: region(d).__setitem__("gen", -1), "sub_volumes[0].gen"),
        (_bad_key, "sub_volumes[0].opts.key: key must be base64 of 32 bytes, got 5 bytes"),
        (lambda d: d["read_only_parent"].pop("path"), "read_only_parent.path: Field required"),
    ],
)
def test_malformed_vcr_errors_name_the_path_and_problem(
    mutate: Callable[[dict[str, Any]], object], expected: str
) -> None:
    d = example()
    mutate(d)
    with pytest.raises(VcrError) as info:
        parse_vcr(json.dumps(d))
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"id": "x"}', 'missing "type"'),
    ],
)
def test_non_vcr_input_is_a_clear_error(text: str, expected: str) -> None:
    with pytest.raises(VcrError, match=expected):
        parse_vcr(text)


def test_backend_needs_a_volume_of_regions() -> None:
    with pytest.raises(VcrError, match='needs a "volume" VCR, got "region"'):
        parse_volume(json.dumps(EXAMPLE["sub_volumes"][0]))
    d = example()
    d["sub_volumes"][0] = EXAMPLE["read_only_parent"]
    with pytest.raises(VcrError, match=r'sub_volumes\[0\].type: expected "region"'):
        parse_volume(json.dumps(d))
    d = example()
    region(d)["block_size"] = 4096
    with pytest.raises(VcrError, match=r"sub_volumes\[0\].block_size: 4096 differs"):
        parse_volume(json.dumps(d))


# -- replacement rules (table-driven: one row per rule) -----------------------------------
def _set_target(i: int, value: str) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        region(d)["opts"]["target"][i] = value
        region(d)["gen"] = 2

    return mutate


def _two_targets(d: dict[str, Any]) -> None:
    _set_target(0, "127.0.0.1:9901")(d)
    _set_target(1, "127.0.0.1:9902")(d)


def _swap_targets(d: dict[str, Any]) -> None:
    t = region(d)["opts"]["target"]
    t[0], t[1] = t[1], t[0]


def _add_sub_volume(d: dict[str, Any]) -> None:
    d["sub_volumes"].append(copy.deepcopy(region(d)))


def _all_block_sizes_4k(d: dict[str, Any]) -> None:
    for part in (d, region(d), d["read_only_parent"]):
        part["block_size"] = 4096
    region(d)["blocks_per_extent"] //= 8


def _add_parent(d: dict[str, Any]) -> None:
    d["read_only_parent"] = {"type": "file", "id": VID, "block_size": 512, "path": "/x.raw"}


RULES: list[tuple[str, Callable[[dict[str, Any]], None], bool]] = [
    # (rule, mutation of the new VCR, whether the OLD one has no read-only parent)
    ("volume-id-changed", lambda d: d.__setitem__("id", "00000000-0000-0000-0000-000000000000"), False),
    ("block-size-changed", _all_block_sizes_4k, False),
    ("sub-volume-count-changed", _add_sub_volume, False),
    ("read-only-parent-added", _add_parent, True),
    ("read-only-parent-changed", lambda d: d["read_only_parent"].__setitem__("path", "/y"), False),
    ("geometry-changed", lambda d: region(d).__setitem__("extent_count", 32), False),
    ("geometry-changed", lambda d: region(d).__setitem__("blocks_per_extent", 4096), False),
    ("generation-lower", lambda d: region(d).__setitem__("gen", 1), False),
    ("opts-changed", lambda d: region(d)["opts"].__setitem__("lossy", True), False),
    ("opts-changed", lambda d: region(d)["opts"].__setitem__("read_only", True), False),
    (
        "upstairs-id-changed",
        lambda d: region(d)["opts"].__setitem__("id", "00000000-0000-0000-0000-000000000001"),
        False,
    ),
    ("two-targets-changed", _two_targets, False),
    ("two-targets-changed", _swap_targets, False),
    ("no-change", lambda d: None, False),
]


@pytest.mark.parametrize(
    ("rule", "mutate", "no_parent"), RULES, ids=[f"{r[0]}-{i}" for i, r in enumerate(RULES)]
)
def test_each_replacement_rule_is_enforced(
    rule: str, mutate: Callable[[dict[str, Any]], None], no_parent: bool
) -> None:
    old_doc = example()
    if no_parent:
        old_doc["read_only_parent"] = None
    if rule == "generation-lower":
        region(old_doc)["gen"] = 2  # generations start at 1: going lower needs a start above it
    new_doc = copy.deepcopy(old_doc)
    mutate(new_doc)
    old, new = parse_volume(json.dumps(old_doc)), parse_volume(json.dumps(new_doc))
    with pytest.raises(ReplaceRuleError) as info:
        compare(old, new)
    assert info.value.rule == rule
    assert rule in str(info.value)
    assert len(str(info.value)) > len(rule) + 12


def test_one_target_change_is_a_target_replacement() -> None:
    new_doc = example()
    _set_target(1, "127.0.0.1:9911")(new_doc)
    outcome = compare(parse_volume(json.dumps(EXAMPLE)), parse_volume(json.dumps(new_doc)))
    assert outcome.target == TargetChange(0, 1, "127.0.0.1:8820", "127.0.0.1:9911")
    assert outcome.changes == (outcome.target,)


def test_generation_only_change_matches_and_parent_may_be_dropped() -> None:
    new_doc = example()
    region(new_doc)["gen"] = 5
    new_doc["read_only_parent"] = None
    outcome = compare(parse_volume(json.dumps(EXAMPLE)), parse_volume(json.dumps(new_doc)))
    assert outcome.target is None
    assert outcome.changes == ()


def test_multiple_targets_allowed_only_for_the_regression() -> None:
    new_doc = example()
    _two_targets(new_doc)
    outcome = compare(
        parse_volume(json.dumps(EXAMPLE)), parse_volume(json.dumps(new_doc)), allow_multiple_targets=True
    )
    assert [c.index for c in outcome.changes] == [0, 1]


# --- hostile input: one bounded parse, value bounds (issue 12) ------------------------------


@pytest.mark.parametrize(
    ("mangle", "needle"),
    [
        (lambda t: t.replace('"gen": 1', '"gen": ' + "9" * 5000), "5000 digits"),
        (lambda t: t[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nesting deeper than"),
        (lambda t: t.replace('"gen": 1', '"gen": 1e999'), "not a finite float"),
        (lambda t: t.replace('"gen": 1', '"gen": NaN'), "NaN is not JSON"),
        (lambda t: t + " " * (2 * 1024 * 1024), "over the limit of"),
    ],
    ids=["huge-int", "deep", "inf", "nan", "huge"],
)
def test_hostile_json_is_a_vcr_error(mangle: Callable[[str], str], needle: str) -> None:
    with pytest.raises(VcrError, match=needle):
        parse_vcr(mangle(json.dumps(EXAMPLE)))


U64 = 2**64 - 1


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("block_size", 2**40, "block_size: must be 512 or 4096"),
        ("block_size", 1024, "block_size: must be 512 or 4096"),
        ("blocks_per_extent", U64 + 1, f"blocks_per_extent: Input should be less than or equal to {U64}"),
        ("extent_count", U64 + 1, f"extent_count: Input should be less than or equal to {U64}"),
        ("gen", U64 + 1, f"gen: Input should be less than or equal to {U64}"),
        ("gen", 0, "gen: Input should be greater than or equal to 1"),
        ("extent_count", 2**50, "size of 512 * 131072 * 1125899906842624 bytes is over the limit of "
         "9223372036854775807 bytes"),
    ],
)
def test_vcr_values_are_bounded(field: str, value: int, needle: str) -> None:
    doc = example()
    region(doc)[field] = value
    if field == "block_size":
        doc["block_size"] = value
        doc["read_only_parent"]["block_size"] = value
    with pytest.raises(VcrError) as info:
        parse_volume(json.dumps(doc))
    assert needle in str(info.value), str(info.value)


def test_volume_size_sums_its_regions() -> None:
    doc = example()
    big = copy.deepcopy(region(doc))
    big["extent_count"] = 2**63 // (512 * 131072) - 1
    doc["sub_volumes"] = [big, copy.deepcopy(big)]
    with pytest.raises(VcrError, match=r"volume size .* is over the limit of 9223372036854775807 bytes"):
        parse_volume(json.dumps(doc))


def test_4096_byte_blocks_are_allowed() -> None:
    doc = example()
    doc["block_size"] = region(doc)["block_size"] = doc["read_only_parent"]["block_size"] = 4096
    assert parse_volume(json.dumps(doc)).block_size == 4096


def test_iter_targets_walks_sub_volumes_and_parents() -> None:
    from sut.storage.vcr import iter_targets

    doc = example()
    doc["read_only_parent"] = {"type": "volume", "id": "p", "block_size": 512,
                               "sub_volumes": [copy.deepcopy(region(doc))]}
    found = list(iter_targets(parse_vcr(json.dumps(doc))))
    assert [where for where, _ in found] == [
        "sub_volumes[0].opts.target[0]", "sub_volumes[0].opts.target[1]", "sub_volumes[0].opts.target[2]",
        "read_only_parent.sub_volumes[0].opts.target[0]", "read_only_parent.sub_volumes[0].opts.target[1]",
        "read_only_parent.sub_volumes[0].opts.target[2]",
    ]
