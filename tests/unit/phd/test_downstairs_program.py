"""Choosing the downstairs program (ours / binary; both speak Crucible's protocol v13) from the
options, checking a crucible-downstairs binary, and the plugin's UsageErrors."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import phd.storage.downstairs as ds_mod
from phd.core.errors import HarnessError
from phd.storage.downstairs import (
    OURS,
    PROGRAM_KINDS,
    binary_program,
    check_binary,
    choose_program,
    default_program,
)
from tests.integration.storage.crucible_ds import BINARY, needs_binary

pytest_plugins = ["pytester"]

TRUE = Path(shutil.which("true") or "/bin/true")


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "wrapper.sh"
    path.write_text("#!/bin/sh\nexec python3 -m sut.storage.downstairs \"$@\"\n")
    path.chmod(0o755)
    return path


def test_ours_is_the_default_and_there_is_nothing_to_switch() -> None:
    assert PROGRAM_KINDS == ("ours", "binary")
    assert default_program() is OURS
    assert choose_program(flavour="docker") is OURS
    assert choose_program(flavour="process") is OURS
    assert choose_program(flavour="process", kind="ours") is OURS
    for gone in ("LEGACY", "OURS13", "UPSTAIRS_PROTOCOL", "NETWORKS", "upstairs_refusal"):
        assert not hasattr(ds_mod, gone), gone


def test_programs_know_their_readiness_and_init() -> None:
    assert (OURS.kind, OURS.ready, OURS.init) == ("ours", "log", False)
    assert OURS.cmd == (sys.executable, "-m", "sut.storage.downstairs")
    real = binary_program(TRUE)
    assert (real.kind, real.ready, real.init) == ("binary", "connect", True)


def test_a_wrapper_command_is_the_ours_program(script: Path) -> None:
    program = choose_program(flavour="process", cmd=f"{script} --verbose")
    assert program.kind == "ours"
    assert program.cmd == (str(script), "--verbose")
    assert choose_program(flavour="process", cmd="python3 -m sut.storage.downstairs").kind == "ours"
    ours = choose_program(flavour="process", kind="ours", cmd=str(script))
    assert (ours.kind, ours.cmd) == ("ours", (str(script),))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"cmd": "/nonexistent/crucible-downstairs"}, r"--phd-downstairs-cmd .*does not exist"),
    ({"kind": "binary", "binary": "/nonexistent/cd"},
     r"--phd-downstairs-binary '/nonexistent/cd'.*does not exist"),
    ({"kind": "binary", "binary": "/"}, "is not a regular file"),
    ({"kind": "binary", "cmd": str(TRUE)}, "does not answer like a crucible-downstairs"),
    ({"kind": "binary", "cmd": f"{TRUE} --flag"}, "takes the path of the crucible-downstairs alone"),
    ({"kind": "binary"},
     "needs a crucible-downstairs: --phd-downstairs-cmd PATH .* or --phd-downstairs-binary"),
    ({"kind": "ours", "binary": str(TRUE)},
     "names a crucible-downstairs for the binary program, not ours"),
    ({"kind": "ours", "cmd": str(TRUE)}, "is an executable binary .* add --phd-downstairs-program binary"),
    ({"kind": "cobol"}, "--phd-downstairs-program 'cobol' is unknown: use one of ours, binary"),
    ({"kind": "legacy"}, "'legacy' is unknown: the legacy program and its protocol were removed.*"
                         "use ours .* or binary"),
    ({"kind": "ours13"}, "'ours13' is unknown: ours13 is now called ours"),
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
    assert choose_program(flavour="docker", binary=str(BINARY), binary_implies=False) is OURS


# --- the plugin -----------------------------------------------------------------------------
CONFIG_TEST = """
    def test_program(phd_config):
        p = phd_config.downstairs_program
        print("PROGRAM=" + p.kind + " CMD=" + " ".join(phd_config.downstairs_cmd))
"""


@pytest.mark.parametrize(("value", "message"), [
    ("legacy", "*--phd-downstairs-program 'legacy' is unknown: the legacy program and its protocol "
               "were removed*use ours (the default) or binary*"),
    ("ours13", "*--phd-downstairs-program 'ours13' is unknown: ours13 is now called ours*"),
    ("cobol", "*--phd-downstairs-program 'cobol' is unknown: use one of ours, binary*"),
])
def test_plugin_refuses_an_unknown_program_naming_the_choices(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    pytester.makepyfile(CONFIG_TEST)
    result = pytester.runpytest("--phd-downstairs-program", value)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    monkeypatch.setenv("PHD_DOWNSTAIRS_PROGRAM", value)  # the same from the environment,
    result = pytester.runpytest()                       # which the message then names
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message.replace("--phd-downstairs-program", "PHD_DOWNSTAIRS_PROGRAM")])


def test_plugin_names_the_option_of_a_bad_path(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(CONFIG_TEST)
    result = pytester.runpytest("--phd-downstairs", "process", "--phd-downstairs-cmd", "/nope/cd")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--phd-downstairs-cmd '/nope/cd': /nope/cd does not exist*"])
    result = pytester.runpytest("--phd-downstairs-binary", str(TRUE))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--phd-downstairs-binary*does not answer like a crucible-downstairs*"])


def test_plugin_default_and_a_wrapper(pytester: pytest.Pytester, script: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(CONFIG_TEST)
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*PROGRAM=ours CMD={sys.executable} -m sut.storage.downstairs"])
    result = pytester.runpytest("-s", "--phd-downstairs-program", "ours")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*PROGRAM=ours CMD=*"])
    monkeypatch.setenv("PHD_DOWNSTAIRS_CMD", str(script))
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*PROGRAM=ours CMD={script}"])


@needs_binary
def test_plugin_env_binary_alone_only_names_it(pytester: pytest.Pytester,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # The interop tests read PHD_DOWNSTAIRS_BINARY too: setting it alone keeps our downstairs.
    pytester.makepyfile(CONFIG_TEST)
    monkeypatch.setenv("PHD_DOWNSTAIRS_BINARY", str(BINARY))
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*PROGRAM=ours*"])
    # the option on the command line (or the program named) takes it
    for args in (["--phd-downstairs-binary", str(BINARY)], ["--phd-downstairs-program", "binary"]):
        result = pytester.runpytest("-s", *args)
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([f"*PROGRAM=binary CMD={BINARY.resolve()}"])


@needs_binary
def test_plugin_takes_the_binary_from_the_cmd_option(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(CONFIG_TEST)
    result = pytester.runpytest("-s", "--phd-downstairs", "process", "--phd-downstairs-cmd", str(BINARY))
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*PROGRAM=binary CMD={BINARY.resolve()}"])
    result = pytester.runpytest("-s", "--phd-downstairs", "process", "--phd-downstairs-program",
                                "binary", "--phd-downstairs-binary", str(BINARY))
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*PROGRAM=binary CMD={BINARY.resolve()}"])
