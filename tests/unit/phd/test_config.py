"""phd.config: one PhdConfig for the pytest plugin and the CLI (option > PHD_* > default),
bad values named with their fix, and the same manifest whichever tool reads it."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

from phd import cli
from phd.config import (
    SETTINGS,
    ConfigError,
    PhdConfig,
    build_config,
    data_root,
    packaged_manifest,
)
from phd.core.errors import ArtifactUnavailable
from phd.framework import Framework

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parents[3] / "README.md"


def test_defaults_without_options_or_environment(tmp_path: Path) -> None:
    config = build_config({}, env={}, project_dir=tmp_path)
    assert (config.accel, config.downstairs, config.output_mode) == ("tcg", "docker", "file")
    assert (config.default_guest, config.guests, config.regressions) == ("tiny", ("tiny",), ())
    assert config.keep_on_failure is False and config.shard is None and config.downstairs_image is None
    assert config.server_cmd[1:] == ("-m", "sut.server")
    assert config.artifact_dir == Path.home() / ".cache" / "phd" / "artifacts"
    assert config.manifest == packaged_manifest() and config.manifest.is_file()
    assert (config.repo_root / "guests" / "tiny" / "build").is_file()
    assert config.downstairs_program.kind == "ours"


@pytest.mark.parametrize(("name", "option", "env", "default", "field", "convert"), [
    ("accel", "kvm", "tcg", "tcg", "accel", str),
    ("guest", "debian", "alpine", "tiny", "default_guest", str),
    ("guests", "debian,tiny", "alpine", ("tiny",), "guests", lambda v: tuple(v.split(","))),
    ("output_mode", "null", "stdio", "file", "output_mode", str),
    ("artifact_dir", "/opt/a", "/opt/b", Path.home() / ".cache" / "phd" / "artifacts", "artifact_dir", Path),
    ("manifest", "/opt/m.toml", "/opt/n.toml", None, "manifest", Path),
    ("downstairs_image", "ds:opt", "ds:env", None, "downstairs_image", str),
    ("regression", ["blocking-start"], "a,b", (), "regressions",
     lambda v: tuple(v) if isinstance(v, list) else tuple(v.split(","))),
    ("keep_on_failure", True, "1", False, "keep_on_failure", lambda v: v is True or v == "1"),
    ("shard", "2/3", "1/4", None, "shard", lambda v: tuple(map(int, v.split("/")))),
])
def test_option_beats_environment_beats_default(name: str, option: Any, env: str, default: Any,
                                                field: str, convert: Any, tmp_path: Path) -> None:
    var = f"PHD_{name.upper()}"
    given = build_config({name: option}, env={var: env}, project_dir=tmp_path)
    assert getattr(given, field) == convert(option)
    from_env = build_config({name: None}, env={var: env}, project_dir=tmp_path)
    assert getattr(from_env, field) == convert(env)
    neither = build_config({}, env={}, project_dir=tmp_path)
    assert getattr(neither, field) == (packaged_manifest() if default is None and name == "manifest"
                                       else default)


def test_an_empty_variable_counts_as_unset(tmp_path: Path) -> None:
    assert build_config({}, env={"PHD_ACCEL": "", "PHD_GUEST": ""}, project_dir=tmp_path).accel == "tcg"


@pytest.mark.parametrize(("options", "env", "message"), [
    ({}, {"PHD_ACCEL": "kwm"},
     "PHD_ACCEL 'kwm' is not one of tcg, kvm: set PHD_ACCEL to tcg or kvm (or unset it, or pass "
     "--phd-accel)"),
    ({"accel": "kwm"}, {}, "--phd-accel 'kwm' is not one of tcg, kvm: pass --phd-accel tcg or kvm"),
    ({}, {"PHD_DOWNSTAIRS": "kubernetes"}, "PHD_DOWNSTAIRS 'kubernetes' is not one of docker, process: "
                                           "set PHD_DOWNSTAIRS to docker or process"),
    ({}, {"PHD_OUTPUT_MODE": "loud"}, "PHD_OUTPUT_MODE 'loud' is not one of file, stdio, null"),
    ({}, {"PHD_KEEP_ON_FAILURE": "maybe"},
     "PHD_KEEP_ON_FAILURE 'maybe' is not a yes/no value: set PHD_KEEP_ON_FAILURE to 1 or 0"),
    ({}, {"PHD_SHARD": "2-4"}, "PHD_SHARD must be i/N, e.g. 2/4; got '2-4'"),
    ({"shard": "5/4"}, {}, "--phd-shard (PHD_SHARD) i/N needs 1 <= i <= N"),
    ({}, {"PHD_SERVER_CMD": "/opt/server 'unclosed"}, "PHD_SERVER_CMD \"/opt/server 'unclosed\" is not a "
                                                      "command line"),
    ({"guests": " , "}, {}, "--phd-guests names no guest"),
    ({}, {"PHD_DOWNSTAIRS_IMAGE": "my image"}, "PHD_DOWNSTAIRS_IMAGE 'my image' is not an image name"),
    ({}, {"PHD_DOWNSTAIRS_PROGRAM": "cobol"},
     "PHD_DOWNSTAIRS_PROGRAM 'cobol' is unknown: use one of ours, binary"),
])
def test_a_bad_value_names_its_source_and_the_fix(options: dict[str, object], env: dict[str, str],
                                                  message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(options, env=env, project_dir=tmp_path)


def test_errors_name_the_tools_own_flags(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--program 'cobol' is unknown"):
        build_config({"downstairs_program": "cobol"}, env={}, flags={"downstairs_program": "--program"})


def test_a_direct_construction_cannot_carry_an_unknown_choice(tmp_path: Path) -> None:
    good = build_config({}, env={}, project_dir=tmp_path)
    fields = {f: getattr(good, f) for f in good.__dataclass_fields__}
    with pytest.raises(ConfigError, match=r"PhdConfig\.accel 'kwm' is not one of tcg, kvm"):
        PhdConfig(**{**fields, "accel": "kwm"})


def test_the_plugin_reports_a_bad_variable_as_a_usage_error(pytester: pytest.Pytester,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile("def test_x(): pass")
    monkeypatch.setenv("PHD_OUTPUT_MODE", "loud")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*PHD_OUTPUT_MODE 'loud' is not one of file, stdio, null: set "
                                 "PHD_OUTPUT_MODE to file or stdio or null*"])


# --- one manifest for pytest and the CLI ------------------------------------------------------
def _plugin_manifest(pytester: pytest.Pytester, *args: str) -> Path:
    pytester.makepyfile(test_manifest="""
        def test_manifest(phd_config):
            print("MANIFEST=" + str(phd_config.manifest))
    """)
    result = pytester.runpytest("-s", "-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=1)
    found = re.search(r"MANIFEST=(\S+)", result.stdout.str())
    assert found is not None, result.stdout.str()
    return Path(found.group(1))


def _cli_manifest(capsys: pytest.CaptureFixture[str], *args: str) -> Path:
    assert cli.main(["artifacts", "list", *args]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("manifest: "))
    return Path(line.removeprefix("manifest: "))


MANIFEST = """
[artifacts.tiny]
kind = { guest_os = "tiny" }
source = { recipe = "guests/tiny" }
"""


@pytest.mark.parametrize("where", ["project", "no-project", "env"])
def test_the_cli_and_the_plugin_read_the_same_manifest(
        where: str, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.delenv("PHD_MANIFEST", raising=False)
    monkeypatch.setenv("PHD_ARTIFACT_DIR", str(tmp_path / "cache"))
    expected = packaged_manifest()
    if where == "project":
        expected = pytester.path / "artifacts" / "artifacts.toml"
        expected.parent.mkdir()
        expected.write_text(MANIFEST)
    elif where == "env":
        expected = tmp_path / "elsewhere.toml"
        expected.write_text(MANIFEST)
        monkeypatch.setenv("PHD_MANIFEST", str(expected))
    plugin_sees = _plugin_manifest(pytester)
    # The CLI run from a folder inside the project finds the project's manifest too.
    inside = pytester.path / "docs"
    inside.mkdir()
    monkeypatch.chdir(inside)
    cli_sees = _cli_manifest(capsys)
    assert plugin_sees.resolve() == cli_sees.resolve() == expected.resolve()


def test_an_option_names_the_manifest_for_both(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setenv("PHD_ARTIFACT_DIR", str(tmp_path / "cache"))
    chosen = tmp_path / "chosen.toml"
    chosen.write_text(MANIFEST)
    monkeypatch.setenv("PHD_MANIFEST", str(tmp_path / "not-this.toml"))
    assert _plugin_manifest(pytester, f"--phd-manifest={chosen}") == chosen
    assert _cli_manifest(capsys, "--manifest", str(chosen)) == chosen


def test_the_checkouts_manifest_is_the_one_phd_ships() -> None:
    """artifacts/artifacts.toml (the documented place) is a link to phd/artifacts/artifacts.toml, the
    package data an installed phd reads: one file, never two copies drifting apart."""
    checkout = data_root() / "artifacts" / "artifacts.toml"
    if not checkout.exists():
        pytest.skip("phd is installed, not run from a checkout")
    assert checkout.resolve() == packaged_manifest().resolve()


# --- the downstairs image -------------------------------------------------------------------
class _Images:
    def __init__(self, present: set[str]) -> None:
        self.present = present
        self.asked: list[str] = []

    def get(self, tag: str) -> object:
        self.asked.append(tag)
        if tag not in self.present:
            raise LookupError(f"No such image: {tag}")
        return object()


class _Docker:
    def __init__(self, present: set[str]) -> None:
        self.images = _Images(present)

    def close(self) -> None:
        pass


def test_a_given_downstairs_image_is_used_instead_of_a_build(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHD_PORT_LOCK_DIR", str(tmp_path / "ports"))
    config = build_config({}, env={"PHD_DOWNSTAIRS_IMAGE": "mine:1"}, project_dir=tmp_path)
    fw = Framework(config, "cfgtest")
    try:
        fw._docker = _Docker({"mine:1"})
        assert fw.downstairs_image() == "mine:1"
        fw._docker = _Docker(set())
        with pytest.raises(ArtifactUnavailable, match=r"mine:1.*--phd-downstairs-image.*`docker images`"):
            fw.downstairs_image()
    finally:
        fw.close()


# --- documentation ----------------------------------------------------------------------------
def test_the_readme_table_lists_every_option_and_variable() -> None:
    text = README.read_text()
    table = text[text.index("## Configuration: pytest options"):]
    table = table[:table.index("\n## ")]
    missing = [s.flag for s in SETTINGS if f"`{s.flag}" not in table]
    missing += [s.env for s in SETTINGS if s.env not in table]
    assert missing == [], f"README's options table lacks {missing}"


# --- the CLI's other users of the config ------------------------------------------------------
def test_phd_dsc_run_reads_the_same_variables_and_its_flags_win(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    args = cli._parser().parse_args(["dsc", "run", "--dir", str(tmp_path), "--program", "cobol"])
    monkeypatch.setenv("PHD_DOWNSTAIRS", "docker")  # --flavour's default (process) wins
    monkeypatch.setenv("PHD_DOWNSTAIRS_IMAGE", "mine:2")
    with pytest.raises(ConfigError, match=r"^--program 'cobol' is unknown"):
        cli._dsc_config(args)
    args = cli._parser().parse_args(["dsc", "run", "--dir", str(tmp_path)])
    config = cli._dsc_config(args)
    assert (config.downstairs, config.downstairs_program.kind, config.downstairs_image) == (
        "process", "ours", "mine:2")


def test_recipes_run_with_the_interpreter_phd_runs_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe's `build` runs `python3` from PATH when no checkout .venv is beside it (phd
    installed with pip): that must be this interpreter, which has guests and filelock."""
    from phd.artifacts.store import _recipe_env

    env = _recipe_env({"PATH": "/usr/bin:/bin", "HOME": "/root"})
    assert env["PATH"].split(":") == [str(Path(sys.executable).parent), "/usr/bin", "/bin"]
    assert env["HOME"] == "/root"


# --- boot mode and BOOTROM ------------------------------------------------------------------
def test_boot_defaults_to_auto_and_takes_a_choice_from_flag_or_variable(tmp_path: Path) -> None:
    assert (build_config({}, env={}).boot, build_config({}, env={}).bootrom) == ("auto", None)
    assert build_config({"boot": "firmware"}, env={"PHD_BOOT": "kernel"}).boot == "firmware"
    assert build_config({}, env={"PHD_BOOT": "kernel"}).boot == "kernel"
    with pytest.raises(ConfigError, match=r"PHD_BOOT 'uefi' is not one of auto, firmware, kernel"):
        build_config({}, env={"PHD_BOOT": "uefi"})


@pytest.mark.parametrize("value", ["/nonexistent/OVMF.fd", "bad\0name", "x" * 5000, ".", ",,,"])
def test_a_bootrom_that_is_not_a_file_is_named_with_the_fix(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^PHD_BOOTROM .* is not a file: give a guest firmware image"):
        build_config({}, env={"PHD_BOOTROM": value})


def test_a_bootrom_file_is_taken(tmp_path: Path) -> None:
    rom = tmp_path / "OVMF.fd"
    rom.write_bytes(b"\0" * 4096)
    assert build_config({"bootrom": str(rom)}, env={}).bootrom == rom
