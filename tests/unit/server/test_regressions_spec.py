"""Regression-name validation and SPEC validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sut.regressions import ALL_REGRESSIONS
from sut.server.cli import main
from sut.server.regressions import Regressions, UnknownRegressionError
from sut.server.spec import InstanceSpec


def test_all_contract_regressions_are_known() -> None:
    regs = Regressions.parse(sorted(ALL_REGRESSIONS))
    assert regs.storage == {"multi-target-replace", "no-generation-fence", "no-read-hash-check", "no-replay"}


def test_unknown_regression_lists_valid_names() -> None:
    with pytest.raises(UnknownRegressionError, match="blocking-start"):
        Regressions.parse(["blocking-strat"])


def test_cli_rejects_unknown_regression_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--data-dir", str(tmp_path), "--regression", "nope"])
    assert info.value.code == 2
    assert "vcr-denied-after-stop" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"boot": {"kernel": "relative/vmlinuz"}}, "absolute"),
        ({"boot": {"firmware": "bios", "order": ["nope"]}}, "unknown disks"),
        ({"boot": {"firmware": "bios"}, "disks": {"bad name": {}}}, "invalid device name"),
        ({"boot": {"firmware": "bios"}, "board": {"cpus": 0}}, "cpus"),
        ({"boot": {"firmware": "bios"}, "typo": 1}, "typo"),
    ],
)
def test_spec_errors_name_the_problem(spec: dict[str, object], needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        InstanceSpec.model_validate(spec)
    assert needle in str(info.value)
