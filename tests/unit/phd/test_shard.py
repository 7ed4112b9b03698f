"""`--phd-shard i/N` (PHD_SHARD): N machines running shards 1/N..N/N run every item exactly once
(pytester)."""

from __future__ import annotations

import pytest

from ci.pipeline import LEAN  # nested sessions start without plugins they do not use
from phd.plugin import parse_shard, shard_of

pytest_plugins = ["pytester"]

# 40 items from parametrised tests, a plain test and a class: enough that every one of three
# shards gets some, whatever the hash does with these particular ids.
TEST_FILE = """
import pytest

@pytest.mark.parametrize("i", range(30))
def test_param(i):
    pass

@pytest.mark.parametrize("guest", ["tiny", "debian", "alpine"])
def test_guest(guest):
    pass

def test_plain():
    pass

class TestGroup:
    @pytest.mark.parametrize("j", range(6))
    def test_member(self, j):
        pass
"""
TOTAL = 40


def _collected(pytester: pytest.Pytester, *args: str) -> list[str]:
    result = pytester.runpytest("--collect-only", "-q", "-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    return [line for line in result.outlines if "::" in line]


def test_shards_partition_the_items(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TEST_FILE)
    everything = _collected(pytester)
    assert len(everything) == TOTAL
    shards = [_collected(pytester, "--phd-shard", f"{i}/3") for i in (1, 2, 3)]
    seen = [item for shard in shards for item in shard]
    assert sorted(seen) == sorted(everything), "the shards together must be exactly all the items"
    assert len(seen) == len(set(seen)), "an item ran in two shards"
    assert all(shards), f"a shard is empty: sizes {[len(s) for s in shards]}"
    # Each item is where the documented hash puts it (what another machine computes too).
    for i, shard in enumerate(shards):
        assert all(shard_of(item, 3) == i for item in shard)


def test_one_shard_is_everything(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TEST_FILE)
    assert _collected(pytester, "--phd-shard", "1/1") == _collected(pytester)


def test_shard_applies_after_k_and_reports_deselected(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TEST_FILE)
    selected = _collected(pytester, "-k", "test_param")
    shards = [_collected(pytester, "-k", "test_param", "--phd-shard", f"{i}/2") for i in (1, 2)]
    assert sorted(shards[0] + shards[1]) == sorted(selected)
    first = _collected(pytester, "--phd-shard", "1/2")
    result = pytester.runpytest("-p", "no:cacheprovider", "--phd-shard", "1/2")
    # Deselected through pytest's own hook, so the summary counts them like -k would.
    result.assert_outcomes(passed=len(first), deselected=TOTAL - len(first))
    result.stdout.fnmatch_lines(["phd shard: 1/2"])


def test_env_var_selects_the_shard(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(TEST_FILE)
    by_option = _collected(pytester, "--phd-shard", "2/3")
    monkeypatch.setenv("PHD_SHARD", "2/3")
    assert _collected(pytester) == by_option
    # The option wins over the environment, as for every phd option.
    assert len(_collected(pytester, "--phd-shard", "1/1")) == TOTAL


def test_shards_hold_under_xdist(pytester: pytest.Pytester) -> None:
    # Every worker collects and shards on its own; they must agree (xdist checks) and run
    # exactly the shard's items.
    pytester.makepyfile(TEST_FILE)
    expected = len(_collected(pytester, "--phd-shard", "2/2"))
    result = pytester.runpytest_subprocess(*LEAN, "-n", "2", "-p", "no:cacheprovider", "--phd-shard", "2/2")
    result.assert_outcomes(passed=expected)


@pytest.mark.parametrize(("value", "reason"), [
    ("3/2", "1 <= i <= N"), ("0/2", "1 <= i <= N"), ("1/0", "1 <= i <= N"),
    ("x", "must be i/N"), ("1/", "must be i/N"), ("-1/2", "must be i/N"), ("1/2/3", "must be i/N"),
])
def test_bad_shard_is_a_usage_error(pytester: pytest.Pytester, value: str, reason: str) -> None:
    pytester.makepyfile(TEST_FILE)
    result = pytester.runpytest(f"--phd-shard={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = result.stderr.str()
    assert "--phd-shard" in text and reason in text and repr(value) in text, text


def test_parse_shard_accepts_spaces_around_the_slash() -> None:
    assert parse_shard(" 2 / 4 ") == (2, 4)
