"""The framework's configuration: one `PhdConfig`, built by one function for every tool.

`build_config` takes the values a tool was given (the pytest plugin's `--phd-*` options, the
`phd` CLI's flags), fills each one that was not given from its `PHD_*` environment variable,
then from its default, and checks them all: a bad value is a `ConfigError` that names the
option or variable it came from and what to write instead. The pytest plugin turns it into a
UsageError; the CLI prints it.

`SETTINGS` is the one table of options: the plugin registers its options from it and the
README's table follows it (tests/unit/phd/test_config.py holds the README to it).

Where things live (one lookup each, shared by the plugin and the CLI):
- `data_root()`: the folder holding the `guests` and `sut` packages, i.e. the checkout in
  development and site-packages in an installed copy; recipes run from `<data_root>/guests/`.
- `packaged_manifest()`: the manifest shipped in the phd package (`phd/artifacts/artifacts.toml`;
  a checkout's `artifacts/artifacts.toml` is a link to it).
- `project_manifest(start)`: a project's own `artifacts/artifacts.toml` in `start` or the
  nearest parent that has one; it is preferred over phd's. pytest starts from its rootdir,
  the CLI from the current directory, so both read the same file inside a project.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, cast, get_args

from phd.core.errors import HarnessError
from phd.storage.downstairs import PROGRAM_KINDS, DsProgram, choose_program, default_program

__all__ = [
    "SETTINGS",
    "Accel",
    "BootMode",
    "ConfigError",
    "DownstairsFlavour",
    "OutputMode",
    "PhdConfig",
    "Setting",
    "build_config",
    "data_root",
    "default_manifest",
    "packaged_manifest",
    "parse_shard",
    "project_manifest",
]

DownstairsFlavour = Literal["docker", "process"]
OutputMode = Literal["file", "stdio", "null"]
Accel = Literal["tcg", "kvm"]
# How guests boot: "firmware" - the server's BOOTROM (UEFI, OVMF) boots the guest's disk image,
# as Propolis always does; "kernel" - the reference server boots the guest's kernel and initrd
# directly (its own option, fast); "auto" - firmware for disk-image guests (debian), kernel for
# initramfs guests (tiny, alpine).
BootMode = Literal["auto", "firmware", "kernel"]

MANIFEST_NAME = "artifacts.toml"
PROJECT_MANIFEST = Path("artifacts") / MANIFEST_NAME


class ConfigError(HarnessError):
    """A configuration value is wrong; the message names where it came from and the fix."""


@dataclass(frozen=True)
class PhdConfig:
    """Everything a session is configured with (frozen: built once, read everywhere)."""

    server_cmd: tuple[str, ...]
    manifest: Path
    artifact_dir: Path
    tmp_dir: Path
    default_guest: str
    guests: tuple[str, ...]
    downstairs: DownstairsFlavour
    downstairs_cmd: tuple[str, ...]
    output_mode: OutputMode
    keep_on_failure: bool
    accel: Accel
    regressions: tuple[str, ...]
    # The folder holding the `guests` and `sut` packages (data_root()): the checkout in
    # development, site-packages when phd is installed. Recipes run from <repo_root>/guests/.
    repo_root: Path
    # ours / binary (phd.storage.downstairs); its `cmd` is what process downstairs run
    downstairs_program: DsProgram = field(default_factory=default_program)
    # A Docker image to run docker downstairs from instead of building phd-downstairs:<hash>
    # from sut/storage/image (None: build it).
    downstairs_image: str | None = None
    shard: tuple[int, int] | None = None  # (i, N), 1-based i
    boot: BootMode = "auto"
    # The server's BOOTROM argument; None: OVMF for firmware boot, SeaBIOS for kernel boot.
    bootrom: Path | None = None
    # The server that "from base" migration tests migrate FROM (--phd-base-server-cmd): the
    # last release, say, while server_cmd is the build under test. Empty: server_cmd.
    base_server_cmd: tuple[str, ...] = ()
    # Spawn the next VM's server while the current VM runs (phd.vm.spares).
    spare_servers: bool = True

    @property
    def migration_base_cmd(self) -> tuple[str, ...]:
        """The base server's command line (the server under test when none is given)."""
        return self.base_server_cmd or self.server_cmd

    def __post_init__(self) -> None:
        # The builder checks values with their option's name; this catches a direct
        # construction (ci/benchlib, tests) that slips a wrong string into a Literal field.
        for name, allowed in (("downstairs", DownstairsFlavour), ("output_mode", OutputMode),
                              ("accel", Accel), ("boot", BootMode)):
            value = getattr(self, name)
            if value not in get_args(allowed):
                raise ConfigError(f"PhdConfig.{name} {value!r} is not one of "
                                  f"{', '.join(get_args(allowed))}")


@dataclass(frozen=True)
class Setting:
    """One option: `--phd-<name>` in pytest, `PHD_<NAME>` in the environment."""

    name: str  # the pytest dest is phd_<name>
    default: str  # as shown in --help and the README
    help: str
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    action: Literal["store", "append", "store_true"] = "store"

    @property
    def flag(self) -> str:
        return "--phd-" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "PHD_" + self.name.upper()

    @property
    def dest(self) -> str:
        return "phd_" + self.name


SETTINGS: tuple[Setting, ...] = (
    Setting("server_cmd", "python -m sut.server",
            "server under test, as a command line (default: the reference server)"),
    Setting("base_server_cmd", "the --phd-server-cmd",
            "server that 'from base' migration tests migrate from, as a command line (default: "
            "the server under test)"),
    Setting("manifest", "artifacts/artifacts.toml of the project, else phd's own",
            "artifact manifest (default: the project's artifacts/artifacts.toml, looked for in "
            "the rootdir and its parents, else the one shipped with phd)"),
    Setting("artifact_dir", "~/.cache/phd/artifacts",
            "artifact cache directory (default: ~/.cache/phd/artifacts)"),
    Setting("tmp_dir", "$TMPDIR/phd", "per-test results/run directories (default: $TMPDIR/phd)"),
    Setting("guest", "tiny", "default guest (default: tiny)"),
    Setting("guests", "the default guest", "comma-separated guest matrix (default: the default guest)"),
    Setting("downstairs", "docker", "where downstairs run (default docker)",
            choices=get_args(DownstairsFlavour)),
    Setting("downstairs_cmd", "the program's own",
            "downstairs command for process mode (default: the program's own); a single path to "
            "an ELF executable is a real crucible-downstairs (program binary)"),
    Setting("downstairs_program", "ours",
            "which downstairs (each speaks Crucible's protocol v13): ours (python -m "
            "sut.storage.downstairs) or binary (a crucible-downstairs); default: binary when "
            "--phd-downstairs-binary or an executable --phd-downstairs-cmd is given, else ours",
            metavar="|".join(PROGRAM_KINDS)),
    Setting("downstairs_binary", "none",
            "a crucible-downstairs executable; docker mode runs containers of an image built "
            "around it. On the command line it implies --phd-downstairs-program binary; "
            "PHD_DOWNSTAIRS_BINARY alone only names it (the interop tests read it too)",
            metavar="PATH"),
    Setting("downstairs_image", "built: phd-downstairs:<hash>",
            "a local Docker image (name:tag) to run docker downstairs of the ours program from, "
            "instead of building phd-downstairs:<hash> from sut/storage/image; its entrypoint "
            "must take the downstairs command line (`create ...`, `run ...`)", metavar="IMAGE"),
    Setting("output_mode", "file", "where server/downstairs output goes (default file)",
            choices=get_args(OutputMode)),
    Setting("keep_on_failure", "off",
            "leave a failed test's VMs and disks running and print how to reach them; keep every "
            "test's results directory", action="store_true"),
    Setting("accel", "tcg", "QEMU accelerator (default tcg)", choices=get_args(Accel)),
    Setting("spare_servers", "on",
            "start the next VM's server while the current VM runs, so a VM like the last one "
            "gets a server that already answers (on), or start each server when its VM "
            "launches (off); default on", choices=("on", "off")),
    Setting("boot", "auto",
            "how guests boot: firmware (the BOOTROM, UEFI, boots the guest's disk image, as "
            "Propolis does), kernel (the reference server boots the guest's kernel and initrd "
            "directly: fast, its own option) or auto (firmware for disk-image guests such as "
            "debian, kernel for initramfs guests such as tiny); default auto",
            choices=get_args(BootMode)),
    Setting("bootrom", "OVMF for firmware boot, SeaBIOS for kernel boot",
            "the guest firmware the server is started with (its BOOTROM argument)", metavar="PATH"),
    Setting("regression", "none",
            "re-create a historical bug in the reference server (repeatable; the variable takes "
            "a comma-separated list)", action="append"),
    Setting("shard", "none",
            "run only shard i of N (1-based): the items whose stable hash of their node id, modulo "
            "N, is i-1; the others are deselected, so N machines running 1/N..N/N share a run "
            "exactly", metavar="i/N"),
)
_BY_NAME = {s.name: s for s in SETTINGS}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
_SHARD_RX = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


# --- where things live ----------------------------------------------------------------------
def _package_dir(package: str) -> Path:
    # files() of a package on the file system is its folder; phd is never run from a zip (its
    # recipes are executed and its server is started as `python -m sut.server`).
    return Path(str(resources.files(package)))


def data_root() -> Path:
    """The folder that holds the `guests` and `sut` packages (and phd)."""
    return _package_dir("guests").parent


def packaged_manifest() -> Path:
    return _package_dir("phd.artifacts") / MANIFEST_NAME


def project_manifest(start: Path) -> Path | None:
    """`artifacts/artifacts.toml` in `start` or the nearest of its parents that has one."""
    start = start.resolve()
    for folder in (start, *start.parents):
        candidate = folder / PROJECT_MANIFEST
        if candidate.is_file():
            return candidate
    return None


def default_manifest(project_dir: Path | None) -> Path:
    """The manifest used when none is given: the project's, else the one phd ships."""
    found = project_manifest(project_dir) if project_dir is not None else None
    return found if found is not None else packaged_manifest()


# --- building the config --------------------------------------------------------------------
def parse_shard(value: str, source: str = "--phd-shard (PHD_SHARD)") -> tuple[int, int]:
    """`i/N` (1-based i) -> (i, N); a ConfigError naming the option and the rule otherwise."""
    match = _SHARD_RX.match(value)
    if match is None:
        raise ConfigError(f"{source} must be i/N, e.g. 2/4; got {value!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise ConfigError(f"{source} i/N needs 1 <= i <= N (i is 1-based); got {value!r}")
    return index, count


class _Reader:
    """Looks a setting up: the tool's value, else PHD_<NAME>, else None; remembers where a
    value came from so an error can name it."""

    def __init__(self, options: Mapping[str, object], env: Mapping[str, str],
                 flags: Mapping[str, str]) -> None:
        self.options = options
        self.env = env
        self.flags = flags

    def flag(self, name: str) -> str:
        return self.flags.get(name, _BY_NAME[name].flag)

    def given(self, name: str) -> bool:
        return self.options.get(name) is not None

    def get(self, name: str) -> tuple[object, str] | None:
        value = self.options.get(name)
        if value is not None:
            return value, self.flag(name)
        env = _BY_NAME[name].env
        if self.env.get(env, "") != "":
            return self.env[env], env
        return None

    def source(self, name: str) -> str:
        """Where the value came from (the flag when it was not given at all)."""
        found = self.get(name)
        return self.flag(name) if found is None else found[1]

    def text(self, name: str) -> str | None:
        found = self.get(name)
        return None if found is None else str(found[0])

    def fix(self, name: str, source: str, wanted: str) -> str:
        """How to fix a bad value: set it right where it came from."""
        env = _BY_NAME[name].env
        if source == env:
            return f"set {env} to {wanted} (or unset it, or pass {self.flag(name)})"
        return f"pass {self.flag(name)} {wanted}"

    def choice(self, name: str, default: str) -> str:
        found = self.get(name)
        if found is None:
            return default
        value, source = str(found[0]), found[1]
        allowed = _BY_NAME[name].choices
        if value not in allowed:
            wanted = " or ".join(allowed)
            raise ConfigError(f"{source} {value!r} is not one of {', '.join(allowed)}: "
                              f"{self.fix(name, source, wanted)}")
        return value

    def path(self, name: str, default: Path) -> Path:
        value = self.text(name)
        return default if value is None else Path(value).expanduser()

    def switch(self, name: str) -> bool:
        found = self.get(name)
        if found is None:
            return False
        value, source = found
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ConfigError(f"{source} {value!r} is not a yes/no value: "
                          f"{self.fix(name, source, '1 or 0')}")

    def words(self, name: str, default: str) -> tuple[str, ...]:
        found = self.get(name)
        value, source = (default, "the default") if found is None else (str(found[0]), found[1])
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise ConfigError(f"{source} {value!r} is not a command line ({exc}): quote it as a "
                              "shell would, e.g. \"/path/to/server --flag 'a b'\"") from None
        if not argv:
            raise ConfigError(f"{source} is empty: give a command line, e.g. "
                              f"{self.flag(name)} '{_BY_NAME[name].default}'")
        return tuple(argv)

    def items(self, name: str) -> tuple[str, ...]:
        """A repeatable option (a list) or its variable (comma-separated)."""
        found = self.get(name)
        if found is None:
            return ()
        value = found[0]
        parts: Sequence[object] = value if isinstance(value, list | tuple) else str(value).split(",")
        return tuple(p for p in (str(v).strip() for v in parts) if p)


def build_config(options: Mapping[str, object] | None = None, *,
                 env: Mapping[str, str] | None = None,
                 project_dir: Path | None = None,
                 flags: Mapping[str, str] | None = None) -> PhdConfig:
    """The session's configuration: option > PHD_* variable > default, checked.

    options: values the tool was given, keyed by setting name (`SETTINGS`), None meaning
      "not given"; a name it does not take is simply absent.
    env: the environment (default os.environ).
    project_dir: where to look for the project's artifacts/artifacts.toml (pytest's rootdir,
      the CLI's current directory); None: phd's own manifest is the default.
    flags: how the tool spells an option (`{"manifest": "--manifest"}` for the CLI), for
      error messages; the default is the pytest plugin's `--phd-<name>`.
    """
    r = _Reader(options or {}, os.environ if env is None else env, flags or {})
    default_guest = r.text("guest") or "tiny"
    guests = tuple(g.strip() for g in (r.text("guests") or default_guest).split(",") if g.strip())
    if not guests:
        raise ConfigError(f"{r.flag('guests')} names no guest: give a comma-separated list, e.g. "
                          "tiny,debian")
    flavour = r.choice("downstairs", "docker")
    try:
        program = choose_program(
            flavour=flavour, kind=r.text("downstairs_program"), cmd=r.text("downstairs_cmd"),
            binary=r.text("downstairs_binary"),
            # PHD_DOWNSTAIRS_BINARY alone only names the binary: the interop tests
            # (tests/integration/storage/crucible_ds.py) read it too.
            binary_implies=r.given("downstairs_binary"),
            names={key: r.source(name) for key, name in (
                ("kind", "downstairs_program"), ("cmd", "downstairs_cmd"),
                ("binary", "downstairs_binary"), ("flavour", "downstairs"))})
    except HarnessError as exc:
        raise ConfigError(str(exc)) from None
    image = r.get("downstairs_image")
    if image is not None and (not str(image[0]).strip() or any(c.isspace() for c in str(image[0]))):
        raise ConfigError(f"{image[1]} {str(image[0])!r} is not an image name: give name:tag of a "
                          "local image (`docker images` lists them)")
    shard = r.get("shard")
    return PhdConfig(
        server_cmd=r.words("server_cmd", shlex.join([sys.executable, "-m", "sut.server"])),
        base_server_cmd=r.words("base_server_cmd", "") if r.get("base_server_cmd") is not None else (),
        manifest=r.path("manifest", default_manifest(project_dir)),
        artifact_dir=r.path("artifact_dir", Path.home() / ".cache" / "phd" / "artifacts"),
        tmp_dir=r.path("tmp_dir", Path(tempfile.gettempdir()) / "phd"),
        default_guest=default_guest,
        guests=guests,
        downstairs=cast(DownstairsFlavour, flavour),  # choice() checked it
        downstairs_cmd=program.cmd,
        downstairs_program=program,
        output_mode=cast(OutputMode, r.choice("output_mode", "file")),
        keep_on_failure=r.switch("keep_on_failure"),
        accel=cast(Accel, r.choice("accel", "tcg")),
        spare_servers=r.choice("spare_servers", "on") == "on",
        boot=cast(BootMode, r.choice("boot", "auto")),
        bootrom=_bootrom(r),
        regressions=r.items("regression"),
        repo_root=data_root(),
        downstairs_image=None if image is None else str(image[0]).strip(),
        shard=None if shard is None else parse_shard(str(shard[0]), _source(r, "shard", shard[1])),
    )


def _bootrom(r: _Reader) -> Path | None:
    text = r.text("bootrom")
    if text is None:
        return None
    path = Path(text).expanduser()
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a NUL byte, a name too long for the OS
        is_file = False
    if not is_file:
        raise ConfigError(f"{r.source('bootrom')} {text!r} is not a file: give a guest firmware image, "
                          "e.g. /usr/share/ovmf/OVMF.fd (Debian's ovmf package)")
    return path


def _source(r: _Reader, name: str, source: str) -> str:
    env = _BY_NAME[name].env
    return f"{r.flag(name)} ({env})" if source != env else env
