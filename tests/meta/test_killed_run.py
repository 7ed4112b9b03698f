"""A run killed with SIGKILL leaves nothing behind once the next run starts.

A nested pytest runs the seed test `vcr_replace_during_start` (a server, its QEMU and three
downstairs stay up for several seconds while the start is blocked). It is SIGKILLed while they
run; nothing of it can clean up. Its processes must still be there (otherwise this test proves
nothing), and then a new run's start (`reap_dead_owners`, which the plugin calls when the
framework is made, and the container sweeper) must remove every one of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ci.pipeline import LEAN
from phd.core.reaper import reap_dead_owners, start_time
from phd.core.wait import wait_until
from phd.framework import Framework, PhdConfig
from phd.storage.downstairs import sweep_leftovers

from .procs import pids_mentioning

pytestmark = [pytest.mark.vm, pytest.mark.crucible]

TEST = "tests/suite/test_crucible.py::test_vcr_replace_during_start"


def test_sigkilled_run_is_cleaned_up_by_the_next(
    phd_config: PhdConfig, phd_framework: Framework, tmp_path: Path
) -> None:
    # Everything the nested run makes lives under its own TMPDIR: its server run dirs, its
    # ledger, its process downstairs' regions. That is how this test finds (only) its own.
    tmp = Path(f"/tmp/phd-kill-{os.getpid()}")  # short: unix socket paths are capped
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PHD_PORT_BASE", None)  # the nested session claims a port slot of its own (phd.core.ports)
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", *LEAN, "-q",
            f"--phd-downstairs={phd_config.downstairs}", f"--phd-artifact-dir={phd_config.artifact_dir}",
            f"--phd-tmp-dir={tmp / 'results'}", TEST]
    with (tmp_path / "nested.log").open("wb") as log:
        run = subprocess.Popen(argv, cwd=phd_config.repo_root, env=env, stdin=subprocess.DEVNULL,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        # Wait until the VM is up and blocked: its QEMU runs (with a run dir under tmp).
        wait_until(lambda: pids_mentioning(f"{tmp}/phd-run"), lambda pids: len(pids) >= 2,
                   what="the nested run's server and QEMU", timeout_s=240.0)
        run.send_signal(signal.SIGKILL)
        run.wait()
        # Nothing tidied up after the kill: the leak is real before the next run.
        leftovers = pids_mentioning(str(tmp))
        assert leftovers, "the killed run left nothing running; this test would prove nothing"
        containers = _containers(phd_framework, phd_config)
        if phd_config.downstairs == "docker":
            assert containers, "the killed run left no downstairs containers to sweep"

        done = reap_dead_owners(tmp / "phd-ledger")
        swept = sweep_leftovers(phd_framework.docker(), phd_framework.session_id) if containers else []

        assert any(line.startswith("stopped server") for line in done), done
        wait_until(lambda: pids_mentioning(str(tmp)), lambda pids: pids == [],
                   what="every process of the killed run to be gone", timeout_s=30.0)
        assert not any((tmp / "phd-run").iterdir()), "server run directories were left behind"
        if containers:
            assert set(containers) <= set(swept), (containers, swept)
            assert _containers(phd_framework, phd_config) == []
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        reap_dead_owners(tmp / "phd-ledger")
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def _containers(fw: Framework, config: PhdConfig) -> list[str]:
    """Containers of dead sessions (the nested run's), when downstairs run in Docker."""
    if config.downstairs != "docker":
        return []
    ours = []
    # ignore_removed: another session (a stage beside this one) may remove one of its containers
    # between the list and its inspect
    for container in fw.docker().containers.list(all=True, filters={"label": "phd.session"},
                                                ignore_removed=True):
        labels = container.labels or {}
        if labels.get("phd.session") == fw.session_id:
            continue
        pid = int(labels.get("phd.pid", "0"))
        if pid and start_time(pid) is None:
            ours.append(container.name)
    return ours
