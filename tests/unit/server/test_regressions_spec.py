"""Regression-name validation and SPEC validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sut.regressions import ALL_REGRESSIONS
from sut.server.cli import main
from sut.server.regressions import Regressions, UnknownRegressionError
from sut.server.spec import InstanceSpec
from tests import v5


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


def _spec(*components: dict[str, object], **board: object) -> dict[str, object]:
    body = v5.spec(*components)  # type: ignore[arg-type]
    body["board"].update(board)
    return body


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        (_spec(v5.disk("d0", v5.file_backend("relative/disk.img"))), "absolute"),
        (_spec(v5.boot_order("nope")), "not a disk device"),
        (_spec({"bad name": v5.serial()["com1"]}), "invalid component key"),
        (_spec(cpus=0), "cpus"),
        (_spec(typo=1), "typo"),
        (_spec(v5.disk("d0", v5.file_backend("/x"), backend_key="elsewhere")
               | {"elsewhere": v5.serial()["com1"]}), "is not a storage backend"),
        (_spec({"p": {"type": "p9fs", "component": {}}}), "not supported by this server"),
        (_spec({"p": {"type": "floppy", "component": {}}}), "unknown component type"),
        (_spec(v5.disk("d0", v5.file_backend("/x"), slot=0x10),
               v5.disk("d1", v5.file_backend("/y"), slot=0x10)), "taken by d0"),
    ],
)
def test_spec_errors_name_the_problem(spec: dict[str, object], needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        InstanceSpec.model_validate(spec)
    assert needle in str(info.value)
