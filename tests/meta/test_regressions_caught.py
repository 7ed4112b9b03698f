"""Proof that the suite catches the historical bugs the reference system can re-create.

Runs the two seed tests (and the tests named for the switch) in a nested pytest against the
reference server with a `--regression NAME` switch (e.g. `blocking-start`, the livelock of
Propolis issue 841) and asserts that the tests which must catch that bug fail, each with a
message that names the broken behaviour - a suite that stays green against a known bug proves
nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ci.pipeline import LEAN
from phd.framework import PhdConfig
from sut.regressions import (
    BLOCKING_START,
    FAILED_MIGRATION_STOPS_SOURCE,
    MIGRATION_SAME_GENERATION,
    MULTI_TARGET_REPLACE,
    NO_GENERATION_FENCE,
    NO_READ_HASH_CHECK,
    NO_REPLAY,
    SOURCE_RUNS_AFTER_MIGRATION,
    STOP_IGNORED_WHILE_STARTING,
    VCR_DENIED_AFTER_STOP,
    VCR_DENIED_WHILE_STARTING,
)

pytestmark = [pytest.mark.vm, pytest.mark.crucible]

VCR_TEST = "tests/suite/test_crucible.py::test_vcr_replace_during_start"
STOP_TEST = "tests/suite/test_server_state_machine.py::test_stop_while_blocked_on_start"
SEED_TESTS = (VCR_TEST, STOP_TEST)
AFTER_STOP_TEST = ("tests/suite/test_server_state_machine.py::"
                   "test_vcr_replacement_after_a_queued_stop_is_queued")
RULES_TEST = "tests/suite/test_crucible.py::test_replacements_that_break_a_rule_are_refused"
FENCE_TEST = "tests/suite/test_crucible.py::test_a_stale_generation_cannot_activate"
REPLAY_TEST = "tests/suite/test_crucible.py::test_a_restarted_downstairs_catches_up_by_replay"
BITROT_TEST = "tests/suite/test_crucible.py::test_a_corrupted_block_on_one_copy_is_never_served"
# The seed scenario with the Crucible disk as the BOOT disk, booted through firmware.
FIRMWARE_VCR_TEST = ("tests/suite/test_firmware.py::"
                     "test_vcr_replace_during_start_unblocks_a_firmware_boot_from_crucible")
MIGRATE_CRUCIBLE_TEST = "tests/suite/test_migrate.py::test_crucible_smoke"
MIGRATE_FAILURE_TEST = "tests/suite/test_migrate.py::test_failure_keeps_the_source_running"
MIGRATED_OUT_TEST = "tests/suite/test_migrate.py::test_source_is_destroyed_after_migrating_out"

# regression switch (every one of sut.regressions' table) -> {test that must fail: text its
# failure message must contain}. ci/regressions checks the same expectations over the suite.
EXPECTED_FAILURES: dict[str, dict[str, str]] = {
    BLOCKING_START: {
        VCR_TEST: "VCR replacement during a blocked start was never applied",
        STOP_TEST: "a stop during a blocked start did not abort the start",
        FIRMWARE_VCR_TEST: "VCR replacement during a blocked start was never applied",
    },
    VCR_DENIED_WHILE_STARTING: {
        VCR_TEST: "VCR replacement during a blocked start was refused",
        FIRMWARE_VCR_TEST: "VCR replacement during a blocked start was refused",
    },
    VCR_DENIED_AFTER_STOP: {
        AFTER_STOP_TEST: "a VCR replacement sent after a queued stop was refused",
    },
    STOP_IGNORED_WHILE_STARTING: {
        STOP_TEST: "a stop during a blocked start did not abort the start",
    },
    MULTI_TARGET_REPLACE: {
        RULES_TEST: "two-targets-changed: a replacement breaking this rule was accepted",
    },
    NO_GENERATION_FENCE: {
        FENCE_TEST: "the generation fence is missing, so a stale VCR can roll the disk back",
    },
    NO_REPLAY: {
        REPLAY_TEST: "its backlog was not replayed after LastFlush",
    },
    NO_READ_HASH_CHECK: {
        BITROT_TEST: "the upstairs served data whose block hash does not match",
    },
    MIGRATION_SAME_GENERATION: {
        MIGRATE_CRUCIBLE_TEST: "at generation 2, which fences the source's upstairs",
    },
    FAILED_MIGRATION_STOPS_SOURCE: {
        MIGRATE_FAILURE_TEST: "a failed migration left the source",
    },
    SOURCE_RUNS_AFTER_MIGRATION: {
        MIGRATED_OUT_TEST: "the source still runs its guest after migrating out",
    },
}


def _run_nested(regression: str, phd_config: PhdConfig, tmp_path: Path) -> dict[str, str]:
    junit = tmp_path / "junit.xml"
    env = dict(os.environ)
    env.pop("PYTEST_XDIST_WORKER", None)
    # No PHD_PORT_BASE: the nested session claims a port slot of its own (phd.core.ports), clear of
    # every worker of the outer run, as any second session on this machine does.
    env.pop("PHD_PORT_BASE", None)
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", *LEAN, "-q",
            f"--junitxml={junit}", f"--phd-regression={regression}",
            f"--phd-downstairs={phd_config.downstairs}", f"--phd-artifact-dir={phd_config.artifact_dir}",
            f"--phd-tmp-dir={tmp_path / 'phd'}", *sorted({*SEED_TESTS, *EXPECTED_FAILURES[regression]})]
    proc = subprocess.run(argv, cwd=phd_config.repo_root, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=900, check=False)
    if not junit.exists():
        pytest.fail(f"nested pytest wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
                    f"\n{proc.stderr[-3000:]}")
    outcomes: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        node = f"{case.get('file') or ''}::{case.get('name')}"
        failure = case.find("failure")
        error = case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            outcomes[node] = "failed: " + (failure.get("message") or "") + (failure.text or "")
        elif error is not None:
            outcomes[node] = "error: " + (error.get("message") or "")
        elif skipped is not None:
            outcomes[node] = "skipped: " + (skipped.get("message") or "")
        else:
            outcomes[node] = "passed"
    return outcomes


def is_case_of(node: str, test_id: str) -> bool:
    """Whether the node id `node` is test `test_id` or one of its parametrized cases
    (`...::test_x[encrypted]`). A node without its module (`::test_x[plain]`, as the nested
    run's JUnit names it) matches on the name; `test_x_other` and another module's `test_x`
    never do."""
    module, _, name = test_id.rpartition("::")
    node_module, _, node_name = node.split("[", 1)[0].rpartition("::")
    return node_name == name and node_module in ("", module)


def _find(outcomes: dict[str, str], test_id: str) -> dict[str, str]:
    """Every case of `test_id` in the nested run (one per parameter), or {test_id: "<not run>"}."""
    found = {node: outcome for node, outcome in outcomes.items() if is_case_of(node, test_id)}
    return found or {test_id: "<not run>"}


@pytest.mark.parametrize("regression", sorted(EXPECTED_FAILURES))
def test_regression_is_caught(regression: str, phd_config: PhdConfig, tmp_path: Path) -> None:
    outcomes = _run_nested(regression, phd_config, tmp_path)
    for test_id, expected in EXPECTED_FAILURES[regression].items():
        # a parametrized test (plain / encrypted disk) must catch the bug in every case
        for node, outcome in _find(outcomes, test_id).items():
            if outcome.startswith("skipped"):
                pytest.skip(f"{node} skipped in the nested run: {outcome}")
            assert outcome.startswith("failed"), (
                f"{node} did not fail against --regression {regression}: {outcome}")
            assert expected in outcome, f"{node} failed for another reason: {outcome[:2000]}"
