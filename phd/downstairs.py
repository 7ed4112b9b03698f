"""Downstairs processes for Crucible disks: in Docker containers (default) or as processes.

Both flavours run the same CONTRACT command line (`create ...`, then `run ...`) and publish
on a loopback port from the worker's range, so a VCR target is always `127.0.0.1:PORT`.
Each handle owns what it started and `destroy()` is idempotent and never stops at the
first error. Containers and volumes carry the CONTRACT labels so a sweeper can find the
leftovers of a killed run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

from phd.errors import HarnessError, SutError
from phd.wait import wait_until

__all__ = ["DockerDownstairs", "Downstairs", "ProcessDownstairs", "sweep_leftovers"]

CONTAINER_PORT = 3810
READY_TEXT = "listening"  # the downstairs logs a JSON line with this word once it accepts


class Downstairs(Protocol):
    name: str
    host_port: int

    @property
    def address(self) -> str: ...
    def create_region(self, uuid: str, block_size: int, extent_size: int, extent_count: int) -> None: ...
    def start(self) -> None: ...
    def destroy(self) -> None: ...
    def logs(self) -> str: ...


def _region_args(uuid: str, block_size: int, extent_size: int, extent_count: int,
                 data_dir: str) -> list[str]:
    return ["create", "-u", uuid, "-d", data_dir, "--block-size", str(block_size),
            "--extent-size", str(extent_size), "--extent-count", str(extent_count)]


class DockerDownstairs:
    def __init__(self, client: Any, image: str, name: str, host_port: int,
                 labels: dict[str, str], log_path: Path | None) -> None:
        self.client = client
        self.image = image
        self.name = name
        self.host_port = host_port
        self.labels = {**labels, "phd.role": "downstairs"}
        self.log_path = log_path
        self.volume_name = f"{name}-data"
        self._container: Any = None
        self._volume: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.host_port}"

    def _common(self) -> dict[str, Any]:
        return {
            "volumes": {self.volume_name: {"bind": "/data", "mode": "rw"}},
            "read_only": True,  # only the region volume is writable
            "tmpfs": {"/tmp": "size=16m"},
            "labels": self.labels,
        }

    def create_region(self, uuid: str, block_size: int, extent_size: int, extent_count: int) -> None:
        import docker.errors

        self._volume = self.client.volumes.create(self.volume_name, labels=self.labels)
        try:
            self.client.containers.run(
                self.image, _region_args(uuid, block_size, extent_size, extent_count, "/data"),
                name=f"{self.name}-create", remove=True, detach=False, **self._common())
        except docker.errors.ContainerError as exc:
            raise SutError(f"downstairs create in {self.name} failed (exit {exc.exit_status}): "
                           f"{(exc.stderr or b'').decode(errors='replace')[-1500:]}") from exc

    def start(self) -> None:
        self._container = self.client.containers.run(
            self.image, ["run", "-d", "/data", "-a", "0.0.0.0", "-p", str(CONTAINER_PORT)],
            name=self.name, detach=True,
            ports={f"{CONTAINER_PORT}/tcp": ("127.0.0.1", self.host_port)}, **self._common())
        wait_until(self._ready, lambda ok: ok, what=f"downstairs {self.name} to listen",
                   timeout_s=30.0, interval_s=0.1)

    def _ready(self) -> bool:
        self._container.reload()
        if self._container.status not in ("created", "running"):
            raise SutError(f"downstairs container {self.name} is {self._container.status}: "
                           f"{self.logs()[-1500:]}")
        return READY_TEXT in self.logs()

    def logs(self) -> str:
        if self._container is None:
            return ""
        with contextlib.suppress(Exception):
            raw: bytes = self._container.logs()
            return raw.decode(errors="replace")
        return ""

    def destroy(self) -> None:
        errors: list[BaseException] = []
        if self._container is not None:
            if self.log_path is not None:
                with contextlib.suppress(OSError):
                    self.log_path.write_text(self.logs())
            try:
                self._container.remove(force=True)
            except Exception as exc:  # noqa: BLE001 - collected, raised together
                errors.append(exc)
            self._container = None
        if self._volume is not None:
            try:
                self._volume.remove(force=True)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
            self._volume = None
        if errors:
            raise HarnessError(f"tearing down downstairs {self.name}: {errors}")


class ProcessDownstairs:
    """A downstairs as a local process (`--phd-downstairs process`): no Docker needed."""

    def __init__(self, cmd: list[str], name: str, host_port: int, data_dir: Path,
                 log_path: Path | None) -> None:
        self.cmd = cmd
        self.name = name
        self.host_port = host_port
        self.data_dir = data_dir
        self.log_path = log_path or (data_dir.parent / f"{name}.log")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.host_port}"

    def create_region(self, uuid: str, block_size: int, extent_size: int, extent_count: int) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(  # noqa: S603 - argv list
            [*self.cmd, *_region_args(uuid, block_size, extent_size, extent_count, str(self.data_dir))],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SutError(f"downstairs create for {self.name} failed: {proc.stderr[-1500:]}")

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(  # noqa: S603 - argv list
                [*self.cmd, "run", "-d", str(self.data_dir), "-a", "127.0.0.1",
                 "-p", str(self.host_port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        wait_until(self._ready, lambda ok: ok, what=f"downstairs {self.name} to listen",
                   timeout_s=30.0, interval_s=0.05)

    def _ready(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise SutError(f"downstairs {self.name} exited {self._proc.returncode}: {self.logs()[-1500:]}")
        return READY_TEXT in self.logs()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def destroy(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def default_process_cmd() -> list[str]:
    return [sys.executable, "-m", "sut.storage.downstairs"]


def sweep_leftovers(client: Any, keep_session: str) -> list[str]:
    """Remove containers and volumes of phd sessions whose owning process is gone."""
    removed: list[str] = []
    for container in client.containers.list(all=True, filters={"label": "phd.session"}):
        labels = container.labels or {}
        if labels.get("phd.session") == keep_session or _owner_alive(labels):
            continue
        with contextlib.suppress(Exception):
            container.remove(force=True)
            removed.append(container.name)
    for volume in client.volumes.list(filters={"label": "phd.session"}):
        labels = volume.attrs.get("Labels") or {}
        if labels.get("phd.session") == keep_session or _owner_alive(labels):
            continue
        with contextlib.suppress(Exception):
            volume.remove(force=True)
            removed.append(volume.name)
    return removed


def _owner_alive(labels: dict[str, str]) -> bool:
    if labels.get("phd.host") != os.uname().nodename:
        return True  # not ours to judge: another machine's session
    try:
        os.kill(int(labels.get("phd.pid", "0")), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(labels.get("phd.pid", "0")) > 0
