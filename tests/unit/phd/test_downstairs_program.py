"""Choosing the downstairs program (legacy / ours13 / binary) from the options, checking a
crucible-downstairs binary, and the plugin's refusal while the upstairs speaks only legacy."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import phd.downstairs as ds_mod
from phd.downstairs import (
    LEGACY,
    OURS13,
    UPSTAIRS_PROTOCOL,
    binary_program,
    check_binary,
    choose_program,
    default_program,
    upstairs_refusal,
)
from phd.errors import HarnessError
from tests.integration.storage.crucible_ds import BINARY, needs_binary

pytest_plugins = ["pytester"]

TRUE = Path(shutil.which("true") or "/bin/true")


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "wrapper.sh"
    path.write_text("#!/bin/sh\nexec python3 -m sut.storage.downstairs \"$@\"\n")
    path.chmod(0o755)
    return path


def test_the_switch_is_legacy_until_the_v13_upstairs_lands() -> None:
    assert UPSTAIRS_PROTOCOL == "legacy"
    assert default_program() is LEGACY
    assert choose_program(flavour="docker") is LEGACY
    assert upstairs_refusal(LEGACY) is None
    refusal = upstairs_refusal(OURS13)
    assert refusal is not None
    assert "does not yet speak v13" in refusal and 'UPSTAIRS_PROTOCOL = "v13"' in refusal


def test_flipping_the_switch_makes_ours13_the_default_and_refuses_legacy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ds_mod, "UPSTAIRS_PROTOCOL", "v13")
    assert default_program() is OURS13
    assert choose_program(flavour="process") is OURS13
    assert upstairs_refusal(OURS13) is None
    assert upstairs_refusal(binary_program(TRUE)) is None
    assert "speaks our legacy protocol" in (upstairs_refusal(LEGACY) or "")


def test_programs_know_their_protocol_network_and_readiness() -> None:
    assert (LEGACY.protocol, LEGACY.network, LEGACY.ready, LEGACY.crucible) == (
        "legacy", "published", "log", False)
    assert (OURS13.protocol, OURS13.network, OURS13.ready, OURS13.crucible) == (
        "v13", "host", "log", True)
    assert OURS13.cmd == (sys.executable, "-m", "sut.storage.downstairs")
    real = binary_program(TRUE)
    assert (real.protocol, real.network, real.ready, real.init) == ("v13", "host", "connect", True)


def test_a_wrapper_command_keeps_the_legacy_program(script: Path) -> None:
    program = choose_program(flavour="process", cmd=f"{script} --verbose")
    assert program.kind == "legacy"
    assert program.cmd == (str(script), "--verbose")
    assert choose_program(flavour="process", cmd="python3 -m sut.storage.downstairs").kind == "legacy"
    ours = choose_program(flavour="process", kind="ours13", cmd=str(script))
    assert (ours.kind, ours.cmd) == ("ours13", (str(script),))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"cmd": "/nonexistent/crucible-downstairs"}, r"--phd-downstairs-cmd .*does not exist"),
    ({"kind": "binary", "binary": "/nonexistent/cd"},
     r"--phd-downstairs-binary '/nonexistent/cd'.*does not exist"),
    ({"kind": "binary", "binary": "/"}, "is not a regular file"),
    ({"kind": "binary", "cmd": str(TRUE)}, "does not answer like a crucible-downstairs"),
    ({"kind": "binary", "cmd": f"{TRUE} --flag"}, "takes the path of the crucible-downstairs alone"),
    ({"kind": "binary"},
     "needs a crucible-downstairs: --phd-downstairs-cmd PATH .* or --phd-downstairs-binary"),
    ({"kind": "legacy", "binary": str(TRUE)},
     "names a crucible-downstairs for the binary program, not legacy"),
    ({"kind": "ours13", "cmd": str(TRUE)}, "is an executable binary .* add --phd-downstairs-program binary"),
    ({"kind": "cobol"}, "is unknown"),
])
def test_bad_choices_name_the_option_and_the_fix(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(HarnessError, match=message):
        choose_program(flavour="process", **kwargs)


def test_not_executable_and_not_elf_are_refused(tmp_path: Path, script: Path) -> None:
    plain = tmp_path / "crucible-downstairs"
    plain.write_bytes(b"\x7fELF" + bytes(60))
    with pytest.raises(HarnessError, match=r"is not executable: `chmod \+x"):
        check_binary(plain)
    with pytest.raises(HarnessError, match="not an ELF executable"):
        check_binary(script)
    with pytest.raises(HarnessError, match="is not an executable file"):
        choose_program(flavour="process", cmd=str(plain))


def test_containers_of_a_binary_need_the_binary_option() -> None:
    with pytest.raises(HarnessError, match=r"containers of a crucible-downstairs need "
                       r"--phd-downstairs-binary PATH.*add --phd-downstairs process"):
        choose_program(flavour="docker", kind="binary", cmd="/bin/true")


@needs_binary
def test_the_real_binary_is_recognised_from_either_option() -> None:
    assert "Message Version: 13" in check_binary(BINARY)
    from_cmd = choose_program(flavour="process", cmd=str(BINARY))
    resolved = BINARY.resolve()
    assert (from_cmd.kind, from_cmd.binary, from_cmd.cmd) == ("binary", resolved, (str(resolved),))
    from_flag = choose_program(flavour="docker", binary=str(BINARY))
    assert from_flag == from_cmd
    # process downstairs from --phd-downstairs-binary alone run the same binary
    assert choose_program(flavour="process", binary=str(BINARY)) == from_cmd
    # PHD_DOWNSTAIRS_BINARY alone (binary_implies=False) only names it
    assert choose_program(flavour="docker", binary=str(BINARY), binary_implies=False) is LEGACY


# --- the plugin -----------------------------------------------------------------------------
CONFIG_TEST = """
    def test_program(phd_config):
        p = phd_config.downstairs_program
        print("PROGRAM=" + p.kind + " CMD=" + " ".join(phd_config.downstairs_cmd))
"""


def test_plugin_refuses_a_v13_program_while_the_upstairs_is_legacy(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(CONFIG_TEST)
    result = pytester.runpytest("--phd-downstairs-program", "ours13")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ours13*speaks Crucible's protocol v13*the upstairs*does not yet "
                                 "speak v13*UPSTAIRS_PROTOCOL = \"v13\"*"])


def test_plugin_names_the_option_of_a_bad_path(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(CONFIG_TEST)
    result = pytester.runpytest("--phd-downstairs", "process", "--phd-downstairs-cmd", "/nope/cd")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--phd-downstairs-cmd '/nope/cd': /nope/cd does not exist*"])
    result = pytester.runpytest("--phd-downstairs-binary", str(TRUE))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--phd-downstairs-binary*does not answer like a crucible-downstairs*"])


def test_plugin_default_and_legacy_wrapper(pytester: pytest.Pytester, script: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(CONFIG_TEST)
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*PROGRAM=legacy CMD={sys.executable} -m sut.storage.downstairs"])
    monkeypatch.setenv("PHD_DOWNSTAIRS_CMD", str(script))
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*PROGRAM=legacy CMD={script}"])


@needs_binary
def test_plugin_env_binary_alone_only_names_it(pytester: pytest.Pytester,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # The interop tests read PHD_DOWNSTAIRS_BINARY too: setting it must not stop a legacy run.
    pytester.makepyfile(CONFIG_TEST)
    monkeypatch.setenv("PHD_DOWNSTAIRS_BINARY", str(BINARY))
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*PROGRAM=legacy*"])
    result = pytester.runpytest("--phd-downstairs-binary", str(BINARY))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*binary*speaks Crucible's protocol v13*does not yet speak v13*"])


@needs_binary
def test_plugin_after_the_switch_takes_the_binary(pytester: pytest.Pytester,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ds_mod, "UPSTAIRS_PROTOCOL", "v13")
    pytester.makepyfile(CONFIG_TEST)
    result = pytester.runpytest("-s", "--phd-downstairs", "process", "--phd-downstairs-cmd", str(BINARY))
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*PROGRAM=binary CMD={BINARY.resolve()}"])
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*PROGRAM=ours13*sut.storage.downstairs"])
