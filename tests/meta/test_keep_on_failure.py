"""--phd-keep-on-failure: a failed test's VM stays up and the run says how to reach it.

A nested pytest (a project of its own, using phd only as a plugin) runs one VM test that
fails on purpose. Its output must name the API, console and SSH of the VM; after the nested
run has ended the VM must still answer on that API, Running; then `phd sweep`'s reaper
removes it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ci.pipeline import LEAN
from phd.core.reaper import reap_dead_owners
from phd.core.wait import wait_until
from phd.framework import PhdConfig

from .procs import pids_mentioning

pytestmark = [pytest.mark.vm]

FAILING_TEST = '''
from phd import InstanceState

def test_fails_with_a_running_vm(vm_factory):
    vm = vm_factory.new_vm("kept")
    vm.launch()
    vm.wait_for_state(InstanceState.RUNNING, timeout_s=60)
    assert False, "deliberate failure"
'''


def test_failed_vm_is_left_running_and_reachable(phd_config: PhdConfig, tmp_path: Path) -> None:
    tmp = Path(f"/tmp/phd-keep-{os.getpid()}")  # short: unix socket paths are capped
    tmp.mkdir()
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_kept.py").write_text(FAILING_TEST)
    env = dict(os.environ, TMPDIR=str(tmp))
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PHD_PORT_BASE", None)  # the nested session claims a port slot of its own (phd.core.ports)
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", *LEAN, "-q",
            "--phd-keep-on-failure", f"--phd-artifact-dir={phd_config.artifact_dir}",
            f"--phd-tmp-dir={tmp / 'results'}", "test_kept.py"]
    try:
        run = subprocess.run(argv, cwd=project, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=300, check=False)
        out = run.stdout + run.stderr
        assert run.returncode == 1 and "deliberate failure" in out, out[-3000:]
        api = re.search(r"API:\s+curl (http://127\.0\.0\.1:\d+)/instance", out)
        console = re.search(r"console: python -m websockets (ws://127\.0\.0\.1:\d+/instance/serial\S*)", out)
        assert api and console, f"the run must say how to reach the kept VM:\n{out[-3000:]}"
        assert "phd sweep" in out

        # The nested run is over; its VM is not.
        state = httpx.get(api.group(1) + "/instance", timeout=10).json()["instance"]["state"]
        assert state == "Running", f"the kept VM should still be Running, is {state}"

        done = reap_dead_owners(tmp / "phd-ledger")
        assert any(line.startswith("stopped server") for line in done), done
        wait_until(lambda: pids_mentioning(str(tmp)), lambda pids: pids == [],
                   what="the kept VM's server and QEMU to be gone", timeout_s=30.0)
    finally:
        reap_dead_owners(tmp / "phd-ledger")
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
