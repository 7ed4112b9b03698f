"""The pytest plugin seen from a user's project (pytester): options, env vars, markers, xdist."""

from __future__ import annotations

from pathlib import Path

import pytest

from ci.pipeline import LEAN  # nested sessions start without plugins they do not use

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[3]
MANIFEST = REPO / "artifacts" / "artifacts.toml"
CONTRACT_OPTIONS = (
    "--phd-server-cmd", "--phd-manifest", "--phd-artifact-dir", "--phd-tmp-dir", "--phd-guest",
    "--phd-guests", "--phd-downstairs", "--phd-output-mode", "--phd-keep-on-failure",
    "--phd-accel", "--phd-regression",
)


def test_help_lists_every_contract_option(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    assert result.ret == 0
    text = result.stdout.str()
    missing = [opt for opt in CONTRACT_OPTIONS if opt not in text]
    assert missing == [], f"options missing from --help: {missing}"


def test_markers_are_registered_by_the_plugin(pytester: pytest.Pytester) -> None:
    # The project configures no markers itself; --strict-markers must still accept phd's.
    pytester.makepyfile("""
        import pytest

        @pytest.mark.vm
        @pytest.mark.crucible
        @pytest.mark.integration
        def test_marked():
            pass
    """)
    result = pytester.runpytest("--strict-markers", "-m", "vm and crucible")
    result.assert_outcomes(passed=1)


def test_option_beats_env_var_beats_default(pytester: pytest.Pytester,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile("""
        def test_config(phd_config):
            print("GUEST=" + phd_config.default_guest)
            print("GUESTS=" + ",".join(phd_config.guests))
            print("DOWNSTAIRS=" + phd_config.downstairs)
            print("REGRESSIONS=" + ",".join(phd_config.regressions))
    """)
    monkeypatch.setenv("PHD_GUEST", "alpine")
    monkeypatch.setenv("PHD_DOWNSTAIRS", "process")
    monkeypatch.setenv("PHD_REGRESSION", "blocking-start")
    result = pytester.runpytest("-s", "--phd-guest", "debian")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*GUEST=debian", "GUESTS=debian", "DOWNSTAIRS=process",
                                 "REGRESSIONS=blocking-start"])


def test_bad_choice_is_a_usage_error_naming_the_option(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--phd-downstairs", "kubernetes")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--phd-downstairs*invalid choice*kubernetes*"])


def test_xdist_workers_share_one_session_and_get_distinct_ports(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import os
        import time
        import pytest

        @pytest.mark.parametrize("i", range(4))
        def test_where(i, phd_framework, tmp_path_factory):
            port = phd_framework.ports.allocate()
            out = tmp_path_factory.getbasetemp().parent.parent / "seen"
            out.mkdir(exist_ok=True)
            worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
            (out / f"{worker}-{i}").write_text(f"{phd_framework.session_id} {port}")
            # Hold on until the other worker has its ports too: a worker that ends gives its
            # slot back, and a later one may then rightly get the same ports; the claim is
            # about workers that run at the same time.
            deadline = time.monotonic() + 60
            while not any(not p.name.startswith(worker + "-") for p in out.iterdir()):
                assert time.monotonic() < deadline, "the other worker never allocated"
                time.sleep(0.05)  # poll interval of a deadline-bounded wait
    """)
    result = pytester.runpytest_subprocess(*LEAN, "-n", "2", "-p", "no:cacheprovider",
                                           f"--phd-manifest={MANIFEST}",
                                           f"--basetemp={pytester.path / 'bt'}")
    result.assert_outcomes(passed=4)
    seen = [p.read_text().split() for p in (pytester.path / "seen").iterdir()]
    workers = {p.name.split("-")[0] for p in (pytester.path / "seen").iterdir()}
    assert workers == {"gw0", "gw1"}, f"both workers must have run tests: {workers}"
    assert len({session for session, _ in seen}) == 1, f"one session id for the run: {seen}"
    ports = [int(port) for _, port in seen]
    assert len(set(ports)) == len(ports), f"ports must never repeat across workers: {ports}"


def test_failure_report_names_the_results_dir_in_terminal_junit_and_allure(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile("""
        def test_fails(phd_test_dir):
            (phd_test_dir / "vm.server.log").write_text("server said hello")
            assert False, "boom"

        def test_passes(phd_test_dir):
            (phd_test_dir / "vm.server.log").write_text("fine")
    """)
    tmp = pytester.path / "phd-tmp"
    # In a subprocess: in-process, this run's allure plugin would clash with the outer run's
    # when that one records allure results too (ci/test does).
    result = pytester.runpytest_subprocess(*LEAN, f"--phd-manifest={MANIFEST}", f"--phd-tmp-dir={tmp}",
                                           "--junitxml=junit.xml", "--alluredir=allure")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*phd results*", f"{tmp}/*test_fails*"])
    kept = [p.name for p in tmp.glob("*/*")]
    assert len(kept) == 1 and "test_fails" in kept[0], f"only the failed test's dir is kept: {kept}"
    junit = (pytester.path / "junit.xml").read_text()
    assert 'name="phd_results"' in junit and "test_fails" in junit
    attachments = [a.read_text() for a in (pytester.path / "allure").glob("*-attachment*")]
    assert "server said hello" in attachments, attachments  # the failed test's log file
    assert "fine" not in attachments  # nothing of the passing test


def test_an_unavailable_artifact_in_a_fixture_is_a_skip_not_an_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest
        from phd import ArtifactUnavailable

        @pytest.fixture(scope="module")
        def guest():
            raise ArtifactUnavailable("guest 'alpine'", "put the tarball at /somewhere")

        def test_uses_guest(guest):
            pass
    """)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*alpine*put the tarball at /somewhere*"])
