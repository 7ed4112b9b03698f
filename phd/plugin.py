"""The pytest plugin (entry point `phd`): options, fixtures, per-test results, cleanup.

Every option can also come from an environment variable (`--phd-guest` <- PHD_GUEST), so
CI and nightly jobs configure the suite without editing command lines.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import sys
import tempfile
import uuid as uuidlib
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from phd.downstairs import PROGRAM_KINDS, DsProgram, choose_program, sweep_leftovers
from phd.errors import ArtifactUnavailable, HarnessError
from phd.factory import DiskFactory, VmFactory
from phd.framework import Framework, PhdConfig
from phd.reaper import reap_dead_owners

_OPTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("--phd-server-cmd", {}, "server under test, as a command line (default: the reference server)"),
    ("--phd-manifest", {}, "artifact manifest (default: artifacts/artifacts.toml)"),
    ("--phd-artifact-dir", {}, "artifact cache directory (default: ~/.cache/phd/artifacts)"),
    ("--phd-tmp-dir", {}, "per-test results/run directories (default: $TMPDIR/phd)"),
    ("--phd-guest", {}, "default guest (default: tiny)"),
    ("--phd-guests", {}, "comma-separated guest matrix (default: the default guest)"),
    ("--phd-downstairs", {"choices": ["docker", "process"]}, "where downstairs run (default docker)"),
    ("--phd-downstairs-cmd", {},
     "downstairs command for process mode (default: the program's own); a single path to an ELF "
     "executable is a real crucible-downstairs (program binary)"),
    ("--phd-downstairs-program", {"metavar": "|".join(PROGRAM_KINDS)},
     "which downstairs (each speaks Crucible's protocol v13): ours (python -m "
     "sut.storage.downstairs) or binary (a crucible-downstairs); default: binary when "
     "--phd-downstairs-binary or an executable --phd-downstairs-cmd is given, else ours"),
    ("--phd-downstairs-binary", {"metavar": "PATH"},
     "a crucible-downstairs executable; docker mode runs containers of an image built around "
     "it. On the command line it implies --phd-downstairs-program binary; PHD_DOWNSTAIRS_BINARY "
     "alone only names it (the interop tests read it too)"),
    ("--phd-output-mode", {"choices": ["file", "stdio", "null"]},
     "where server/downstairs output goes (default file)"),
    ("--phd-keep-on-failure", {"action": "store_true", "default": None},
     "leave a failed test's VMs and disks running and print how to reach them; keep every "
     "test's results directory"),
    ("--phd-accel", {"choices": ["tcg", "kvm"]}, "QEMU accelerator (default tcg)"),
    ("--phd-regression", {"action": "append"},
     "re-create a historical bug in the reference server (repeatable)"),
    ("--phd-shard", {"metavar": "i/N"},
     "run only shard i of N (1-based): the items whose stable hash of their node id, modulo N, "
     "is i-1; the others are deselected, so N machines running 1/N..N/N share a run exactly"),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("phd", "PHD framework (each option also reads PHD_<NAME>)")
    for flag, extra, help_text in _OPTIONS:
        group.addoption(flag, dest=_dest(flag), help=help_text, **extra)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _opt(config: pytest.Config, flag: str, default: str) -> str:
    value = config.getoption(_dest(flag))
    if value is None:
        env = "PHD_" + flag.removeprefix("--phd-").replace("-", "_").upper()
        value = os.environ.get(env, default)
    return str(value)


def _guests(config: pytest.Config) -> tuple[str, ...]:
    """The guest matrix (--phd-guests), defaulting to the default guest alone."""
    default_guest = _opt(config, "--phd-guest", "tiny")
    return tuple(g.strip() for g in _opt(config, "--phd-guests", default_guest).split(",") if g.strip())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A test that takes `phd_guest` runs once per guest of the matrix, with the guest as its
    # id (`test_x[debian]`); ids come from the options alone, so every xdist worker
    # collects the same items.
    if "phd_guest" in metafunc.fixturenames:
        guests = _guests(metafunc.config)
        metafunc.parametrize("phd_guest", guests, ids=list(guests))


def _build_config(config: pytest.Config) -> PhdConfig:
    # Recipes (guests/<name>/) ship with phd, wherever the project using the plugin lives; a
    # project's own artifacts/artifacts.toml is preferred over phd's when it has one.
    root = Path(__file__).resolve().parent.parent
    project_manifest = Path(str(config.rootpath)) / "artifacts" / "artifacts.toml"
    own_manifest = root / "artifacts" / "artifacts.toml"
    default_manifest = project_manifest if project_manifest.is_file() else own_manifest
    regressions = config.getoption("phd_regression") or [
        r for r in os.environ.get("PHD_REGRESSION", "").split(",") if r]
    keep = config.getoption("phd_keep_on_failure") or os.environ.get("PHD_KEEP_ON_FAILURE") == "1"
    default_guest = _opt(config, "--phd-guest", "tiny")
    program = config.stash.get(_PROGRAM, None) or downstairs_program(config)
    return PhdConfig(
        server_cmd=tuple(shlex.split(_opt(config, "--phd-server-cmd",
                                          shlex.join([sys.executable, "-m", "sut.server"])))),
        manifest=Path(_opt(config, "--phd-manifest", str(default_manifest))),
        artifact_dir=Path(_opt(config, "--phd-artifact-dir",
                               str(Path.home() / ".cache" / "phd" / "artifacts"))),
        tmp_dir=Path(_opt(config, "--phd-tmp-dir", str(Path(tempfile.gettempdir()) / "phd"))),
        default_guest=default_guest,
        guests=_guests(config),
        downstairs=_opt(config, "--phd-downstairs", "docker"),
        downstairs_cmd=program.cmd,
        downstairs_program=program,
        output_mode=_opt(config, "--phd-output-mode", "file"),
        keep_on_failure=bool(keep),
        accel=_opt(config, "--phd-accel", "tcg"),
        regressions=tuple(regressions),
        repo_root=root,
    )


# Registered by the plugin, so a project using phd can run with --strict-markers without
# repeating them in its own configuration.
MARKERS = (
    "vm: boots a real guest through the server under test (slow)",
    "crucible: needs Crucible-style downstairs (Docker or processes)",
    "integration: uses real processes, sockets or containers but boots no guest",
    "nightly: too slow for the per-PR run; only the nightly job runs it (-m 'not nightly' leaves it out)",
)

_SHARD = pytest.StashKey[tuple[int, int]]()
_PROGRAM = pytest.StashKey[DsProgram]()


def downstairs_program(config: pytest.Config) -> DsProgram:
    """The session's downstairs program from --phd-downstairs-program/-cmd/-binary (and their
    PHD_* variables); a UsageError naming the option and the fix when they are wrong."""
    flag_binary = config.getoption(_dest("--phd-downstairs-binary"))
    try:
        return choose_program(
            flavour=_opt(config, "--phd-downstairs", "docker"),
            kind=_opt(config, "--phd-downstairs-program", "") or None,
            cmd=_opt(config, "--phd-downstairs-cmd", "") or None,
            binary=_opt(config, "--phd-downstairs-binary", "") or None,
            # PHD_DOWNSTAIRS_BINARY alone only names the binary: the interop tests
            # (tests/integration/storage/crucible_ds.py) read it too.
            binary_implies=flag_binary is not None)
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None


def _check_downstairs_program(config: pytest.Config) -> None:
    """Choose (and check) the program once, at configure time: a bad option stops the run."""
    config.stash[_PROGRAM] = downstairs_program(config)


_SHARD_RX = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(value: str) -> tuple[int, int]:
    """`i/N` (1-based i) -> (i, N); a UsageError naming the option and the rule otherwise."""
    match = _SHARD_RX.match(value)
    if match is None:
        raise pytest.UsageError(f"--phd-shard (PHD_SHARD) must be i/N, e.g. 2/4; got {value!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise pytest.UsageError(f"--phd-shard (PHD_SHARD) i/N needs 1 <= i <= N (i is 1-based); "
                                f"got {value!r}")
    return index, count


def shard_of(nodeid: str, count: int) -> int:
    """The 0-based shard of a node id. sha256, not hash(): Python salts str hashes per process,
    and every machine and xdist worker must put an item in the same shard."""
    return int.from_bytes(hashlib.sha256(nodeid.encode()).digest()[:8], "big") % count


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    shard = _opt(config, "--phd-shard", "")
    if shard:
        config.stash[_SHARD] = parse_shard(shard)
    _check_downstairs_program(config)
    workerinput = getattr(config, "workerinput", None)
    config._phd_session = (workerinput or {}).get("phd_session") or uuidlib.uuid4().hex[:8]  # type: ignore[attr-defined]
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(), "phd-xdist")


def pytest_report_header(config: pytest.Config) -> str | None:
    shard = config.stash.get(_SHARD, None)
    return None if shard is None else f"phd shard: {shard[0]}/{shard[1]}"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Last, so -k/-m have already deselected what they deselect: shards then only split what
    # would run. A hash of the node id (not the position in the list) keeps an item's shard
    # the same whatever else is collected, on every machine and every xdist worker.
    shard = config.stash.get(_SHARD, None)
    if shard is None:
        return
    index, count = shard
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        (keep if shard_of(item.nodeid, count) == index - 1 else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


class _XdistHooks:
    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["phd_session"] = node.config._phd_session



@pytest.fixture(scope="session")
def phd_config(pytestconfig: pytest.Config) -> PhdConfig:
    return _build_config(pytestconfig)


@pytest.fixture(scope="session")
def phd_framework(pytestconfig: pytest.Config, phd_config: PhdConfig) -> Iterator[Framework]:
    # Servers and process downstairs of runs that were killed outright (SIGKILL, OOM) are
    # stopped before this run starts its own (containers: see _phd_docker_swept).
    reaped = reap_dead_owners()
    if reaped:
        sys.stderr.write("\nphd: cleaned up after dead runs: " + "; ".join(reaped) + "\n")
    fw = Framework(phd_config, pytestconfig._phd_session)  # type: ignore[attr-defined]
    yield fw
    fw.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    results = item.stash.get(_RESULTS_DIR, None)
    if results is not None and report.failed:
        # In the failure report itself (terminal, JUnit XML system-out) and as a JUnit property.
        report.sections.append(("phd results", f"{results}\n{_RESULTS_HELP}"))
        # JUnit XML writes the properties of the teardown report, made from the item's.
        if ("phd_results", str(results)) not in item.user_properties:
            item.user_properties.append(("phd_results", str(results)))
    return report


_REPORTS = pytest.StashKey[dict[str, Any]]()
_RESULTS_DIR = pytest.StashKey[Path]()
_RESULTS_HELP = ("server logs (<vm>.server.log, QEMU argv in its 'launching qemu' line), serial "
                 "transcripts (<vm>.serial.log), step logs (<vm>.steps.jsonl), VCRs sent "
                 "(<vm>.<device>.vcr.jsonl), downstairs logs, server run dirs (QEMU log)")


@pytest.fixture
def phd_test_dir(request: pytest.FixtureRequest, phd_framework: Framework) -> Iterator[Path]:
    """Per-test results directory named after the node id; kept when the test fails."""
    path = phd_framework.test_dir(request.node.nodeid)
    request.node.stash[_RESULTS_DIR] = path
    yield path
    reports = request.node.stash.get(_REPORTS, {})
    failed = any(r.failed for r in reports.values())
    if failed:
        _attach_to_allure(request.config, path)
    if failed or phd_framework.config.keep_on_failure:
        sys.stderr.write(f"\nphd: results of {request.node.nodeid} kept in {path}\n")
        return
    shutil.rmtree(path, ignore_errors=True)


def _attach_to_allure(config: pytest.Config, path: Path, max_bytes: int = 4 << 20) -> None:
    """Attach the failed test's logs to its allure result (only when allure is recording)."""
    if not config.pluginmanager.hasplugin("allure_pytest") or not config.getoption(
            "allure_report_dir", default=None):
        return
    import allure  # only imported when allure-pytest is active

    for item in sorted(path.rglob("*")):
        if item.is_file() and item.stat().st_size <= max_bytes:
            allure.attach.file(  # type: ignore[no-untyped-call]
                str(item), name=str(item.relative_to(path)), attachment_type=allure.attachment_type.TEXT)


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest, phd_framework: Framework,
               phd_test_dir: Path) -> Iterator[VmFactory]:
    factory = VmFactory(phd_framework, request.node.nodeid, phd_test_dir)
    yield factory
    if _keep_alive(request, phd_framework):
        notes = factory.keep_running()
        if notes:
            sys.stderr.write(f"\nphd: --phd-keep-on-failure: {request.node.nodeid} failed; its VMs are "
                             f"still running:\n{notes}\nphd: `phd sweep` removes them (and their disks) "
                             "once this pytest run has ended; so does the next run.\n")
        return
    factory.close()


def _keep_alive(request: pytest.FixtureRequest, fw: Framework) -> bool:
    """--phd-keep-on-failure and the test itself failed: leave its VMs and disks up."""
    reports = request.node.stash.get(_REPORTS, {})
    return fw.config.keep_on_failure and any(r.failed for r in reports.values())


@pytest.fixture(scope="session")
def _phd_docker_swept(phd_framework: Framework) -> bool:
    """Once per session: remove containers/volumes left by killed phd runs."""
    if phd_framework.config.downstairs == "docker":
        try:
            removed = sweep_leftovers(phd_framework.docker(), phd_framework.session_id)
        except ArtifactUnavailable as exc:
            pytest.skip(f"Crucible disks need downstairs: {exc}")
        if removed:
            sys.stderr.write(f"\nphd: swept leftovers of dead sessions: {removed}\n")
    return True


@pytest.fixture
def disk_factory(request: pytest.FixtureRequest, phd_framework: Framework, phd_test_dir: Path,
                 _phd_docker_swept: bool) -> Iterator[DiskFactory]:
    factory = DiskFactory(phd_framework, request.node.nodeid, phd_test_dir)
    yield factory
    if _keep_alive(request, phd_framework):
        return  # the kept VMs still use these disks; they stay in the ledger / carry labels
    # The disk factory stops the VMs on its disks first (VMs before their disks), whatever
    # order the test named the fixtures in.
    factory.close()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Iterator[Any]:
    # A fixture that needs a guest or an image (module-scoped `tiny`, say) is a SKIP too.
    try:
        return (yield)
    except ArtifactUnavailable as exc:
        pytest.skip(str(exc))


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Iterator[Any]:
    try:
        return (yield)
    except ArtifactUnavailable as exc:
        pytest.skip(str(exc))
