"""The pytest plugin (entry point `phd`): options, fixtures, per-test results, cleanup.

Every option can also come from an environment variable (`--phd-guest` <- PHD_GUEST), so
CI and nightly jobs configure the suite without editing command lines; the options, their
variables and defaults are phd.config's (SETTINGS, build_config), which the CLI uses too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import uuid as uuidlib
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from phd.config import SETTINGS, ConfigError, PhdConfig, build_config
from phd.config import parse_shard as config_parse_shard
from phd.core.errors import ArtifactUnavailable
from phd.core.progress import ProgressReporter, ProgressTail
from phd.core.reaper import reap_dead_owners
from phd.framework import Framework
from phd.storage.downstairs import sweep_leftovers
from phd.vm.factory import DiskFactory, VmFactory


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("phd", "PHD framework (each option also reads PHD_<NAME>)")
    for setting in SETTINGS:
        extra: dict[str, Any] = {"action": setting.action}
        if setting.action == "store_true":
            extra["default"] = None  # None: not given, so PHD_KEEP_ON_FAILURE decides
        if setting.choices:
            extra["choices"] = list(setting.choices)
        if setting.metavar:
            extra["metavar"] = setting.metavar
        group.addoption(setting.flag, dest=setting.dest, help=setting.help, **extra)


def _options(config: pytest.Config) -> dict[str, object]:
    """The --phd-* values given on the command line (None: not given), by setting name."""
    return {s.name: config.getoption(s.dest) for s in SETTINGS}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A test that takes `phd_guest` runs once per guest of the matrix, with the guest as its
    # id (`test_x[debian]`); ids come from the options alone, so every xdist worker
    # collects the same items.
    if "phd_guest" in metafunc.fixturenames:
        guests = metafunc.config.stash[_CONFIG].guests
        # @pytest.mark.pr_guests("tiny"): the cases of other guests are nightly-only (a slow
        # guest multiplies a long test; the per-PR run keeps the fast one).
        pr = metafunc.definition.get_closest_marker("pr_guests")
        params = [pytest.param(g, marks=[pytest.mark.nightly] if pr is not None and g not in pr.args else [])
                  for g in guests]
        metafunc.parametrize("phd_guest", params, ids=list(guests))


# Registered by the plugin, so a project using phd can run with --strict-markers without
# repeating them in its own configuration.
MARKERS = (
    "vm: boots a real guest through the server under test (slow)",
    "crucible: needs Crucible-style downstairs (Docker or processes)",
    "integration: uses real processes, sockets or containers but boots no guest",
    "nightly: too slow for the per-PR run; only the nightly job runs it (-m 'not nightly' leaves it out)",
    "pr_guests(*guests): only these guests' cases run per PR; the others are marked nightly",
)

_CONFIG = pytest.StashKey[PhdConfig]()


def parse_shard(value: str) -> tuple[int, int]:
    """`i/N` (1-based i) -> (i, N); a UsageError naming the option and the rule otherwise."""
    try:
        return config_parse_shard(value)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


def shard_of(nodeid: str, count: int) -> int:
    """The 0-based shard of a node id. sha256, not hash(): Python salts str hashes per process,
    and every machine and xdist worker must put an item in the same shard."""
    return int.from_bytes(hashlib.sha256(nodeid.encode()).digest()[:8], "big") % count


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    # Built and checked once, here: a bad option or PHD_* variable stops the run before
    # collection, with a message naming it and the fix.
    try:
        config.stash[_CONFIG] = build_config(_options(config), project_dir=config.rootpath)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    workerinput = getattr(config, "workerinput", None)
    config._phd_session = (workerinput or {}).get("phd_session") or uuidlib.uuid4().hex[:8]  # type: ignore[attr-defined]
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(), "phd-xdist")
    # The worker's name from xdist itself, not the environment: a session started inside
    # another session's worker (the meta tests do) inherits that worker's PYTEST_XDIST_WORKER.
    worker_id = str((workerinput or {}).get("workerid", "")) or None
    config.pluginmanager.register(_SessionProgress(config, worker=worker_id), "phd-progress")


def pytest_report_header(config: pytest.Config) -> str | None:
    shard = config.stash[_CONFIG].shard if _CONFIG in config.stash else None
    return None if shard is None else f"phd shard: {shard[0]}/{shard[1]}"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Last, so -k/-m have already deselected what they deselect: shards then only split what
    # would run. A hash of the node id (not the position in the list) keeps an item's shard
    # the same whatever else is collected, on every machine and every xdist worker.
    shard = config.stash[_CONFIG].shard
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



class _SessionProgress:
    """What the session builds or fetches before its tests, on the terminal as it happens
    (phd.core.progress): the reporter of this process, and under xdist the controller's tail of
    the workers' progress log. `-q` keeps the terminal quiet; the log has every line."""

    def __init__(self, config: pytest.Config, *, worker: str | None) -> None:
        self.config = config
        phd = config.stash[_CONFIG]
        self.log_path = phd.tmp_dir / config._phd_session / "progress.log"  # type: ignore[attr-defined]
        self.quiet = config.get_verbosity() < 0
        self._fd: int | None = None
        self._tail: ProgressTail | None = None
        self._broke_line = False
        terminal = None
        if worker is None and not self.quiet:
            # A copy of the terminal's descriptor, taken now, before any test captures fd 1:
            # builds run inside a test's setup, and often on a thread (a recipe's output reader).
            with contextlib.suppress(OSError):
                self._fd = os.dup(sys.stdout.fileno())
            terminal = self._write_direct if self._fd is not None else None
        self.reporter = ProgressReporter(terminal=terminal, log_path=self.log_path, worker=worker or "")

    def _terminal(self) -> Any:
        return self.config.pluginmanager.get_plugin("terminalreporter")

    def _write_direct(self, line: str) -> None:
        """A plain run: past pytest's capture of fd 1 (a build runs inside a test)."""
        assert self._fd is not None
        tr = self._terminal()
        prefix = ""
        if tr is not None and tr.currentfspath is not None:
            # The terminal is in the middle of a line of results: start a new one, and write
            # the file's name again before its next result (pytest_runtest_logreport).
            prefix, tr.currentfspath, self._broke_line = "\n", None, True
        os.write(self._fd, f"{prefix}{line}\n".encode(errors="replace"))

    def _write_reporter(self, line: str) -> None:
        """The xdist controller: nothing captures its terminal."""
        tr = self._terminal()
        if tr is not None:
            if tr._tw.width_of_current_line:  # after a line of results ("..  [ 50%]")
                tr._tw.line()
            tr.currentfspath = None
            tr.write_line(line)
            tr.flush()

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logstart(self) -> None:
        # The terminal reporter has written the test's file name without flushing it; flushed
        # now (no capture yet), a build's lines come after it, not before it.
        tr = self._terminal()
        if tr is not None:
            tr.flush()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self._tail is not None:
            self._tail.poll()  # a worker's build lines before the result they led to
        tr = self._terminal()
        if self._broke_line and tr is not None and tr.verbosity <= 0 and tr.currentfspath is None:
            # Our lines ended the line of this file's results: open a new one, as pytest
            # would, but with no blank line before it.
            fspath = self.config.rootpath / report.nodeid.split("::")[0]
            tr.currentfspath = fspath
            tr.write(os.path.relpath(fspath, tr.startpath) + " ")
        self._broke_line = False

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self.config.pluginmanager.get_plugin("dsession") is not None and not self.quiet:
            # The xdist controller: workers cannot reach the terminal, so it shows what they
            # write to the session's progress log.
            self._tail = ProgressTail(self.log_path, self._write_reporter).start()

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self) -> None:
        if self._tail is not None:
            self._tail.stop()
            self._tail = None

    def pytest_unconfigure(self) -> None:
        self.reporter.close()
        if self._tail is not None:
            self._tail.stop()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _progress(config: pytest.Config) -> ProgressReporter:
    plugin = config.pluginmanager.get_plugin("phd-progress")
    return plugin.reporter if isinstance(plugin, _SessionProgress) else ProgressReporter()


@pytest.fixture(scope="session")
def phd_config(pytestconfig: pytest.Config) -> PhdConfig:
    return pytestconfig.stash[_CONFIG]


@pytest.fixture(scope="session")
def phd_framework(pytestconfig: pytest.Config, phd_config: PhdConfig) -> Iterator[Framework]:
    # Servers and process downstairs of runs that were killed outright (SIGKILL, OOM) are
    # stopped before this run starts its own (containers: see _phd_docker_swept).
    reaped = reap_dead_owners()
    if reaped:
        sys.stderr.write("\nphd: cleaned up after dead runs: " + "; ".join(reaped) + "\n")
    fw = Framework(phd_config, pytestconfig._phd_session, _progress(pytestconfig))  # type: ignore[attr-defined]
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
