"""sut.bounded_json: every limit is enforced, named in the error, and ordinary JSON is untouched."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sut.bounded_json import DEFAULT_LIMITS, JsonLimitError, JsonLimits, loads

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


@given(json_values)
def test_ordinary_json_parses_as_the_stdlib_does(value: object) -> None:
    text = json.dumps(value)
    assert loads(text) == json.loads(text)
    assert loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ("[" * 100_000 + "]" * 100_000, "nesting deeper than the limit of 32 levels"),
        ("[" * 33 + "]" * 33, "nesting deeper than the limit of 32 levels"),
        ('{"a":' * 40 + "1" + "}" * 40, "nesting deeper than the limit of 32 levels"),
        ("1" * 5000, "integer of 5000 digits is over the limit of 20 digits"),
        ('{"gen": -' + "9" * 21 + "}", "integer of 21 digits"),
        ("1e999", "out of range"),
        ("-1e999", "out of range"),
        ("[NaN]", "NaN is not JSON"),
        ('{"x": Infinity}', "Infinity is not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        ('{"a": }', "not valid JSON"),
        ("", "not valid JSON"),
    ],
)
def test_each_limit_is_named(data: str | bytes, named: str) -> None:
    with pytest.raises(JsonLimitError, match=named):
        loads(data)


def test_the_limits_are_inclusive() -> None:
    deepest = loads("[" * 32 + "]" * 32)
    for _ in range(31):
        deepest = deepest[0]
    assert deepest == []
    assert loads(str(2**64 - 1)) == 2**64 - 1
    assert loads("-" + "9" * 20) == -int("9" * 20)


def test_size_is_counted_in_utf8_bytes_before_parsing() -> None:
    limits = JsonLimits(max_bytes=10)
    assert loads('"ééé"', limits) == "ééé"  # 8 bytes
    assert loads('"éééé"', limits) == "éééé"  # 6 characters, exactly 10 bytes
    with pytest.raises(JsonLimitError, match="12 bytes is over the limit of 10 bytes"):
        loads('"ééééé"', limits)  # 7 characters, 12 bytes
    with pytest.raises(JsonLimitError, match="over the limit of 1048576 bytes"):
        loads(b" " * (DEFAULT_LIMITS.max_bytes + 1))


def test_an_oversized_input_is_refused_without_parsing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # 200 MB of nested arrays would take seconds and gigabytes to parse: it must never get there.
    def parser_called(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the parser ran on an input over the size limit")

    monkeypatch.setattr(json, "loads", parser_called)
    with pytest.raises(JsonLimitError, match="over the limit"):
        loads("[" * (200 * 1024 * 1024))
    with pytest.raises(JsonLimitError, match="over the limit"):
        loads("é" * (DEFAULT_LIMITS.max_bytes // 2 + 1))


@pytest.mark.parametrize(
    "data",
    [
        "[[]," * 40 + "1" + "]" * 40,  # never two openers in a row, still 41 deep
        '[ { "a" : ' * 20 + "1" + " } ]" * 20,  # whitespace and keys between the openers
        "[" * 33 + "]" * 33,
    ],
)
def test_depth_is_found_however_the_brackets_are_spread(data: str) -> None:
    with pytest.raises(JsonLimitError, match="nesting deeper than the limit of 32 levels"):
        loads(data)


@pytest.mark.parametrize(
    ("data", "value"),
    [
        ('{"a": "' + "1" * 100 + '"}', {"a": "1" * 100}),  # digits inside a string
        ('["' + "[" * 100 + '"]', ["[" * 100]),  # brackets inside a string
        ('["\\"[[[[", 1]', ['"[[[[', 1]),  # an escaped quote does not end the string
        ("[0.1234567890123456789012345]", [0.1234567890123456789012345]),  # a long fraction
        ("[1e-12345678901234567890123]", [0.0]),  # a long exponent that underflows
    ],
)
def test_digits_and_brackets_that_are_not_integers_or_nesting_pass(data: str, value: object) -> None:
    assert loads(data) == value


def test_unbalanced_brackets_are_invalid_json_not_a_crash() -> None:
    for data in ("[" * 100_000 + "]" * 5, "[" * 50, "]" * 50 + "[", '{"a": [}'):
        with pytest.raises(JsonLimitError):
            loads(data)
