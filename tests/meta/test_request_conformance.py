"""Conformance of the framework's requests (issue 15, item 2): every request phd sends during
a suite run is one propolis-server 5.0.0's OpenAPI document allows.

A nested suite run (the smoke boot, both seed behaviours, the state machine's raw requests, a
live migration)
records every request its clients send (``PHD_REQUEST_LOG``); each is then checked against the
document: its operation exists, its query parameters are declared and typed, its body matches
the operation's schema. The client also checks each request as it sends it, so a violation
fails the nested test at once; this test names every violation with its operation. Nightly: per
PR, ci/test's suite stage records every request of the whole suite and its conformance stage
checks that log the same way (ci/conformance.py). Without the
document (../shared/propolis/ beside the checkout, or PHD_PROPOLIS_OPENAPI) it skips with the
how-to.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ci.conformance import SUITE_OPERATIONS
from ci.pipeline import LEAN
from phd.config import PhdConfig
from phd.vm.conformance import DOC_ENV, HOW_TO, LOG_ENV, ApiDocument, check_log, find_document

pytestmark = [pytest.mark.vm, pytest.mark.crucible, pytest.mark.nightly]

SUITE_TESTS = [
    "tests/suite/test_smoke.py::test_boot_to_shell_and_run_commands",
    "tests/suite/test_crucible.py::test_vcr_replace_during_start",
    "tests/suite/test_server_state_machine.py::test_stop_while_blocked_on_start",
    "tests/suite/test_server_state_machine.py::test_start_stop_reaches_destroyed_and_then_every_state_change_is_424",
    "tests/suite/test_server_state_machine.py::test_vcr_replacement_after_a_queued_stop_is_queued",
    "tests/suite/test_migrate.py::test_smoke",
]


def test_every_request_of_a_suite_run_conforms(phd_config: PhdConfig, tmp_path: Path) -> None:
    path = find_document()
    if path is None:
        pytest.skip(HOW_TO)
    document = ApiDocument.load(path)
    log = tmp_path / "requests.jsonl"
    env = dict(os.environ)
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PHD_PORT_BASE", None)  # the nested session claims a port slot of its own
    env[LOG_ENV] = str(log)
    env[DOC_ENV] = str(path)
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", *LEAN, "-q",
            "--phd-guests=tiny", f"--phd-downstairs={phd_config.downstairs}",
            f"--phd-artifact-dir={phd_config.artifact_dir}", f"--phd-tmp-dir={tmp_path / 'phd'}",
            *SUITE_TESTS]
    proc = subprocess.run(argv, cwd=phd_config.repo_root, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"the nested suite run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"

    with log.open() as lines:
        found = check_log(document, lines)
    print(f"{found.requests} requests checked against propolis-server {document.version}:",
          found.per_operation)
    assert not found.unreadable, found.unreadable[:10]
    assert not found.violations, (f"{len(found.violations)} requests violate the document:\n"
                                  + "\n".join(found.violations[:50]))
    missing = found.missing(SUITE_OPERATIONS)
    assert not missing, f"the run never exercised {missing}: {found.per_operation}"
