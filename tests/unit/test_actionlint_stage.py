"""ci/actionlint.py, the actionlint stage of ci/test: it lints every workflow with the actionlint
it finds, says so and passes where none is installed, and fails then under
PHD_REQUIRE_ACTIONLINT=1 (what the GitHub workflows set)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from ci import actionlint


@pytest.fixture
def no_actionlint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(actionlint, "find_actionlint", lambda: None)


@pytest.mark.usefixtures("no_actionlint")
def test_missing_actionlint_passes_with_a_note(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("PHD_REQUIRE_ACTIONLINT", raising=False)
    assert actionlint.main([]) == 0
    assert "actionlint: SKIPPED" in capsys.readouterr().out


@pytest.mark.usefixtures("no_actionlint")
def test_missing_actionlint_fails_when_required(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PHD_REQUIRE_ACTIONLINT", "1")
    assert actionlint.main([]) == 1
    assert "PHD_REQUIRE_ACTIONLINT is set" in capsys.readouterr().err


def test_lints_every_workflow_and_returns_its_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in actionlint that records its arguments and fails like a finding would.
    seen = tmp_path / "argv"
    fake = tmp_path / "actionlint"
    fake.write_text(f"#!{sys.executable}\nimport sys\n"
                    f"open({str(seen)!r}, 'w').write('\\n'.join(sys.argv[1:]))\nsys.exit(1)\n")
    fake.chmod(0o755)
    monkeypatch.setattr(actionlint, "find_actionlint", lambda: str(fake))
    assert actionlint.main(["-no-color"]) == 1
    args = seen.read_text().splitlines()
    assert args[0] == "-no-color"
    assert {".github/workflows/ci.yml", ".github/workflows/nightly.yml"} <= set(args[1:])


def test_no_workflows_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(actionlint, "ROOT", tmp_path)
    monkeypatch.setattr(actionlint, "WORKFLOWS", tmp_path / ".github" / "workflows")
    assert actionlint.main([]) == 1


def test_the_venv_copy_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "actionlint").write_text("")
    (tmp_path / "actionlint").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", os.defpath)
    assert actionlint.find_actionlint() == str(tmp_path / "actionlint")
