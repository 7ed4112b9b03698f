"""Conformance of the framework's requests (issue 15, item 2): every request phd sends during
a suite run is one propolis-server 5.0.0's OpenAPI document allows.

A nested suite run (the smoke boot, both seed behaviours, the state machine's raw requests, a
live migration)
records every request its clients send (``PHD_REQUEST_LOG``); each is then checked against the
document: its operation exists, its query parameters are declared and typed, its body matches
the operation's schema. The client also checks each request as it sends it, so a violation
fails the nested test at once; this test names every violation with its operation. Without the
document (../shared/propolis/ beside the checkout, or PHD_PROPOLIS_OPENAPI) it skips with the
how-to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from phd.config import PhdConfig
from phd.vm.conformance import DOC_ENV, HOW_TO, LOG_ENV, NO_BODY, ApiDocument, find_document

pytestmark = [pytest.mark.vm, pytest.mark.crucible]

SUITE_TESTS = [
    "tests/suite/test_smoke.py::test_boot_to_shell_and_run_commands",
    "tests/suite/test_crucible.py::test_vcr_replace_during_start",
    "tests/suite/test_server_state_machine.py::test_stop_while_blocked_on_start",
    "tests/suite/test_server_state_machine.py::test_start_stop_reaches_destroyed_and_then_every_state_change_is_424",
    "tests/suite/test_server_state_machine.py::test_vcr_replacement_after_a_queued_stop_is_queued",
    "tests/suite/test_migrate.py::test_smoke",
]
# What the framework must have exercised for the check to mean something.
EXPECTED_OPERATIONS = {"instance_ensure", "instance_state_put", "instance_state_monitor", "instance_serial",
                       "instance_issue_crucible_vcr_request", "disk_volume_status",
                       "instance_migrate_status"}


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
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
            "--phd-guests=tiny", f"--phd-downstairs={phd_config.downstairs}",
            f"--phd-artifact-dir={phd_config.artifact_dir}", f"--phd-tmp-dir={tmp_path / 'phd'}",
            *SUITE_TESTS]
    proc = subprocess.run(argv, cwd=phd_config.repo_root, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"the nested suite run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"

    records = [json.loads(line) for line in log.read_text().splitlines()]
    per_operation: Counter[str] = Counter()
    violations = []
    for record in records:
        method, where = record["method"], record["path"]
        op = document.operation(method, where)
        per_operation[op.operation_id if op else f"{method} {where}"] += 1
        body = record.get("body", NO_BODY)
        for problem in document.request_violations(method, where, record["query"], body):
            label = op.label if op else f"{method} {where}"
            violations.append(f"{label}: {problem}")
    print(f"{len(records)} requests checked against propolis-server {document.version}:", dict(per_operation))
    assert not violations, f"{len(violations)} requests violate the document:\n" + "\n".join(violations[:50])
    missing = EXPECTED_OPERATIONS - set(per_operation)
    assert not missing, f"the run never exercised {sorted(missing)}: {dict(per_operation)}"
