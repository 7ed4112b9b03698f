"""How the regression meta test and ci/regressions find a seed test's outcomes: a
parametrized seed test (plain / encrypted disk) is every one of its cases, and nothing else."""

from __future__ import annotations

import pytest

from tests.meta.test_regressions_caught import EXPECTED_FAILURES, VCR_TEST, _find, is_case_of


@pytest.mark.parametrize(("node", "matches"), [
    ("tests/suite/test_crucible.py::test_vcr_replace_during_start", True),
    ("tests/suite/test_crucible.py::test_vcr_replace_during_start[plain]", True),
    ("tests/suite/test_crucible.py::test_vcr_replace_during_start[encrypted]", True),
    ("::test_vcr_replace_during_start[encrypted]", True),  # the nested run's JUnit: no module
    ("tests/suite/test_crucible.py::test_vcr_replace_during_start_with_a_silent_black_hole", False),
    ("::test_vcr_replace_during_start_with_a_silent_black_hole", False),
    ("tests/integration/server/test_crucible_start.py::test_vcr_replace_during_start", False),
])
def test_a_seed_test_is_each_of_its_cases(node: str, matches: bool) -> None:
    assert is_case_of(node, VCR_TEST) is matches


def test_find_returns_every_case_or_not_run() -> None:
    outcomes = {"::test_vcr_replace_during_start[plain]": "failed: a",
                "::test_vcr_replace_during_start[encrypted]": "passed",
                "::test_vcr_replace_during_start_with_a_silent_black_hole": "failed: b"}
    assert _find(outcomes, VCR_TEST) == {"::test_vcr_replace_during_start[plain]": "failed: a",
                                         "::test_vcr_replace_during_start[encrypted]": "passed"}
    assert _find({}, VCR_TEST) == {VCR_TEST: "<not run>"}
    assert VCR_TEST in EXPECTED_FAILURES["blocking-start"]


def test_catchers_mode_runs_every_switch_against_its_named_tests_only() -> None:
    from ci.regressions import catching_tests, selected_entries
    from sut.regressions import ALL_REGRESSIONS

    assert selected_entries(None) == ["none", *sorted(ALL_REGRESSIONS)]
    assert selected_entries(None, catchers=True) == sorted(ALL_REGRESSIONS)  # the suite stage is "none"
    assert selected_entries("no-replay,none", catchers=True) == ["none", "no-replay"]
    for switch in ALL_REGRESSIONS:
        tests = catching_tests(switch)
        assert tests and all(t.startswith("tests/suite/") and "::" in t for t in tests)
        assert set(tests) == set(EXPECTED_FAILURES[switch])
    with pytest.raises(SystemExit, match="--switches takes names from"):
        selected_entries("no-such-switch", catchers=True)


def test_storage_names_the_storage_side_switches() -> None:
    from ci.regressions import selected_entries
    from sut.regressions import STORAGE_REGRESSIONS

    assert selected_entries("storage", catchers=True) == sorted(STORAGE_REGRESSIONS)
    assert "no-replay" in STORAGE_REGRESSIONS and "blocking-start" not in STORAGE_REGRESSIONS
