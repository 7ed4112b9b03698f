"""`phd dsc run` end to end, as a subprocess: start, drive over the control API, signal,
and nothing is left (no downstairs process, no container, no volume)."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from phd.framework import Framework

from .conftest import FLAVOURS, answer, docker_leftovers, processes_under

pytestmark = pytest.mark.integration

START_DEADLINE_S = 120.0  # the docker flavour may build the image first (cached: < 1 s)


class DscRun:
    """A `phd dsc run` subprocess whose output lines are collected by a reader thread."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout_s: float) -> str:
        """The first new output line containing `text`; fails with the output so far."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"phd dsc exited {self.proc.wait()} before {text!r}:\n{self.output}")
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} from phd dsc within {timeout_s}s:\n{self.output}")

    def value(self, prefix: str) -> str:
        return next(line for line in self.lines if line.startswith(prefix)).split(maxsplit=1)[1]

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def finish(self, sig: signal.Signals, timeout_s: float = 60.0) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout_s)
        self._reader.join(10)
        while not self._queue.empty() and (line := self._queue.get_nowait()) is not None:
            self.lines.append(line)
        return code


@pytest.fixture
def port_base(phd_framework: Framework) -> Iterator[int]:
    """Three port pairs (port, port + 4000) of this worker's range for the downstairs (dsc
    skips busy ones)."""
    ports = [phd_framework.ports.allocate_pair() for _ in range(3)]
    yield min(ports)
    for port in ports:
        phd_framework.ports.release(port)


@pytest.fixture
def dsc_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    runs: list[DscRun] = []

    def start(flavour: str, *extra: str) -> DscRun:
        if flavour == "docker":
            request.getfixturevalue("docker_env")  # skips with the reason when Docker is missing
        run = DscRun([sys.executable, "-m", "phd.cli", "dsc", "run", "--dir", str(tmp_path / "dsc"),
                      "--flavour", flavour, "--control", "127.0.0.1:0", "--extent-size", "1024",
                      "--extent-count", "4", *extra])
        runs.append(run)
        return run

    yield start
    for run in runs:  # a failed test still leaves nothing: SIGTERM, then SIGKILL
        if run.proc.poll() is None:
            try:
                run.finish(signal.SIGTERM)
            except subprocess.TimeoutExpired:
                run.proc.kill()
                run.proc.wait()


def post(control: str, path: str) -> httpx.Response:
    return httpx.post(f"http://{control}{path}", timeout=60)


def state(control: str) -> list[str]:
    return [m["state"] for m in httpx.get(f"http://{control}/state", timeout=10).json()["members"]]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_dsc_run_end_to_end(dsc_factory: Any, flavour: str, port_base: int, tmp_path: Path,
                            request: pytest.FixtureRequest) -> None:
    run = dsc_factory(flavour, "--port-base", str(port_base))
    run.wait_for("ready;", START_DEADLINE_S)
    targets = run.value("targets:").split()
    vcr = json.loads(run.value("vcr:"))
    control = run.value("control:").split()[0]
    assert vcr["target"] == targets and len(targets) == 3
    assert (vcr["block_size"], vcr["blocks_per_extent"], vcr["extent_count"]) == (512, 1024, 4)
    assert [answer(t) for t in targets] == ["YesItsMe"] * 3

    assert post(control, "/ds/1/kill").json()["state"] == "stopped"
    assert answer(targets[1]).startswith("refused")
    refused = post(control, "/ds/1/pause")
    assert refused.status_code == 409 and "it is stopped" in refused.json()["message"]
    assert post(control, "/ds/1/start").json()["state"] == "running"
    assert answer(targets[1]) == "YesItsMe"
    assert post(control, "/ds/2/pause").json()["state"] == "paused"
    assert answer(targets[2], timeout_s=1.0) == "timeout"
    assert post(control, "/ds/0/restart").json()["state"] == "running"
    assert post(control, "/ds/0/frobnicate").status_code == 400
    assert state(control) == ["running", "running", "paused"]
    # the human's client, against the same control API
    cli = subprocess.run([sys.executable, "-m", "phd.cli", "dsc", "cmd", "stop", "0", "--control",
                          control], capture_output=True, text=True, check=False, timeout=60)
    assert cli.returncode == 0 and json.loads(cli.stdout)["state"] == "stopped", cli.stderr

    session = run.value("session:").split()[0] if flavour == "docker" else ""
    assert run.finish(signal.SIGINT) == 0, run.output
    assert "torn down" in run.output
    assert processes_under(tmp_path) == []
    if flavour == "docker":
        client, _image = request.getfixturevalue("docker_env")
        assert docker_leftovers(client, f"phd.session={session}") == []
    else:
        assert (tmp_path / "dsc" / "ds0" / "region.json").is_file()  # process regions are kept


def test_dsc_run_random_stop_kills_and_restarts(dsc_factory: Any, port_base: int, tmp_path: Path) -> None:
    run = dsc_factory("process", "--port-base", str(port_base), "--random-stop-min", "0.2",
                      "--random-stop-max", "0.4", "--seed", "5", "--cleanup")
    run.wait_for("ready;", START_DEADLINE_S)
    killed = run.wait_for("random stop: killed ds", 30)
    restarted = run.wait_for("random stop: restarted ds", 30)
    assert killed.rsplit("ds", 1)[1] == restarted.rsplit("ds", 1)[1]
    assert run.finish(signal.SIGTERM) == 0, run.output
    assert processes_under(tmp_path) == []
    assert not (tmp_path / "dsc" / "ds0").exists()  # --cleanup removed the regions
