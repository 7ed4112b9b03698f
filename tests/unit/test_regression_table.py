"""The one table of regression switches (sut.regressions) and everything that must agree with
it: the meta test's expectations, the READMEs' tables and the storage backend."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sut.regressions import (
    ALL_REGRESSIONS,
    MULTI_TARGET_REPLACE,
    REGRESSIONS,
    SERVER_REGRESSIONS,
    STORAGE_REGRESSIONS,
)
from sut.storage.backend import flaws_for
from sut.storage.client import NO_FLAWS
from tests.meta.test_regressions_caught import EXPECTED_FAILURES

ROOT = Path(__file__).resolve().parents[2]


def _table_rows(markdown: Path, heading: str) -> list[list[str]]:
    """The body rows of the first table under `heading`, as lists of stripped cells."""
    lines = markdown.read_text().splitlines()
    start = lines.index(heading)
    rows: list[list[str]] = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break  # the table ended
    return [row for row in rows[2:]]  # past the header and the |---| line


def test_names_are_unique_and_each_on_one_side() -> None:
    names = [r.name for r in REGRESSIONS]
    assert len(names) == len(set(names))
    assert SERVER_REGRESSIONS | STORAGE_REGRESSIONS == ALL_REGRESSIONS
    assert SERVER_REGRESSIONS.isdisjoint(STORAGE_REGRESSIONS)


def test_every_switch_has_an_expected_catcher() -> None:
    # A switch no test is expected to catch proves nothing; an expectation for a name the
    # table does not have is never run.
    assert set(EXPECTED_FAILURES) == ALL_REGRESSIONS
    for switch, tests in EXPECTED_FAILURES.items():
        assert tests, switch
        for test_id, text in tests.items():
            module, _, name = test_id.partition("::")
            assert re.search(rf"^def {name}\(", (ROOT / module).read_text(), re.MULTILINE), (
                f"{switch}: {test_id} names no test")
            assert text, test_id


def test_the_readme_table_is_the_table() -> None:
    rows = _table_rows(ROOT / "README.md", "## Reference server regressions")
    assert [row[0].strip("`") for row in rows] == [r.name for r in REGRESSIONS]
    for row, regression in zip(rows, REGRESSIONS, strict=True):
        assert row[1] == regression.bug, regression.name
        for test_id in EXPECTED_FAILURES[regression.name]:
            short = test_id.rpartition("::")[2].removeprefix("test_")
            assert f"`{short}`" in row[2], f"{regression.name}: the README does not name {short}"


def test_the_server_readme_lists_every_switch() -> None:
    rows = _table_rows(ROOT / "sut" / "server" / "README.md", "## Regression switches (`--regression NAME`)")
    assert [row[0].strip("`") for row in rows] == [r.name for r in REGRESSIONS]


@pytest.mark.parametrize("switch", sorted(STORAGE_REGRESSIONS - {MULTI_TARGET_REPLACE}))
def test_each_upstairs_switch_is_a_flaw(switch: str) -> None:
    # multi-target-replace is the backend's own (compare); the rest are the upstairs' flaws
    assert flaws_for(frozenset({switch})) != NO_FLAWS
    assert flaws_for(frozenset()) == NO_FLAWS


@pytest.mark.parametrize("switch", sorted(SERVER_REGRESSIONS))
def test_the_storage_refuses_a_server_switch(switch: str) -> None:
    with pytest.raises(ValueError, match="not storage regression switches"):
        flaws_for(frozenset({switch}))
