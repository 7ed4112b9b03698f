"""The session-wide framework object: configuration, ports, artifacts, Docker.

Created once per pytest process (each xdist worker has its own); factories borrow from
it. Expensive shared things (the downstairs image, guest builds) are resolved lazily and
memoised, and the recipes/image builder hold file locks so workers never build twice.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phd.artifacts.store import ArtifactStore
from phd.config import PhdConfig
from phd.core.errors import ArtifactUnavailable
from phd.core.ports import PortAllocator
from phd.core.progress import ProgressReporter, build_lock
from phd.storage.downstairs import DsProgram
from phd.vm.spares import SpareServers

__all__ = ["Framework", "PhdConfig"]

IMAGE_LOCK_TIMEOUT_S = 1800.0  # another worker's build of the downstairs image


def _run_streaming(argv: list[str], cwd: Path, on_line: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run `argv` (stdout and stderr merged), handing each line to `on_line` as it comes;
    (exit code, every line)."""
    lines: list[str] = []
    with subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,  # noqa: S603
                          stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.rstrip("\n"))
            on_line(lines[-1])
        code = proc.wait()
    return code, lines


class Framework:
    def __init__(self, config: PhdConfig, session_id: str,
                 progress: ProgressReporter | None = None) -> None:
        self.config = config
        self.session_id = session_id
        # Builds and downloads report here (the terminal and the session's progress log).
        self.progress = progress or ProgressReporter(terminal=None)
        # A slot of loopback ports claimed for this process (phd.core.ports), named for this session.
        self.ports = PortAllocator(owner=f"session {session_id}")
        # The next VM's server, started while the current one runs (phd.vm.spares); its log
        # sits beside the test directories, on their filesystem, so it moves into the one of
        # the test that takes it.
        self.spares = SpareServers(
            self.ports, session_id,
            None if config.output_mode == "null" else config.tmp_dir / session_id / "spare-servers",
            enabled=config.spare_servers)
        self.artifacts = ArtifactStore(config.manifest, config.artifact_dir, config.repo_root)
        self.artifacts.progress = self.progress
        self._docker: Any = None
        self._images: dict[DsProgram, str] = {}
        self._lock = threading.Lock()

    def labels(self, node_id: str) -> dict[str, str]:
        """CONTRACT labels, plus the owner pid/host so a sweeper can tell dead sessions."""
        return {"phd.session": self.session_id, "phd.test": node_id[:250],
                "phd.pid": str(os.getpid()), "phd.host": os.uname().nodename}

    def docker(self) -> Any:
        with self._lock:
            if self._docker is None:
                try:
                    import docker

                    client = docker.from_env(timeout=120)
                    client.ping()
                except Exception as exc:  # noqa: BLE001 - any failure means "no engine here"
                    raise ArtifactUnavailable(
                        "the Docker engine",
                        f"it does not answer ({exc}); start dockerd, or run with "
                        "--phd-downstairs process") from None
                self._docker = client
            return self._docker

    def downstairs_image(self, program: DsProgram | None = None) -> str:
        """Build (once, under a file lock inside the builder) the image of `program` (default:
        the session's --phd-downstairs-program); its tag."""
        program = program or self.config.downstairs_program
        if self.config.downstairs_image is not None and program.kind == "ours":
            return self._given_image(self.config.downstairs_image)
        with self._lock:
            if program not in self._images:
                self._images[program] = self._ensure_image(program)
            return self._images[program]

    def _ensure_image(self, program: DsProgram) -> str:
        """`python -m sut.storage.image ensure`, its output shown as progress as it comes;
        under a lock whose waiters say whom they wait for (the builder's own lock is silent)."""
        argv = [sys.executable, "-m", "sut.storage.image", "ensure"]
        argv += (["--binary", str(program.binary)] if program.binary is not None
                 else ["--program", program.kind])
        key = f"downstairs image ({program.kind})"
        lock = Path(tempfile.gettempdir()) / f".phd-downstairs-image-{program.kind}.phd-build.lock"
        def timed_out(why: str) -> Exception:
            return ArtifactUnavailable(f"the {program.kind} downstairs container image", why)

        with build_lock(lock, key, f"build {key}", self.progress, timeout_s=IMAGE_LOCK_TIMEOUT_S,
                        on_timeout=timed_out), self.progress.step(key, f"build {key}"):
            code, lines = _run_streaming(argv, self.config.repo_root,
                                         lambda text: self.progress.line(key, text))
            if code != 0:
                self.progress.line(key, f"failed (exit {code})")
        # The tag is the last line of stdout, which ends the merged output.
        tag = next((line.strip() for line in reversed(lines) if line.strip()), "")
        if code != 0 or not tag or " " in tag:
            tail = "\n".join(lines)[-1500:]
            raise ArtifactUnavailable(
                f"the {program.kind} downstairs container image",
                f"`{shlex.join(argv)}` exited {code}; it builds from Debian "
                f"packages with mmdebstrap (run ci/bootstrap); output:\n{tail}")
        return tag

    def _given_image(self, tag: str) -> str:
        """--phd-downstairs-image: used as it is, once Docker confirms it is there (no
        registry here, so a missing image cannot be pulled)."""
        client = self.docker()
        try:
            client.images.get(tag)
        except Exception as exc:  # noqa: BLE001 - docker.errors.ImageNotFound, APIError
            raise ArtifactUnavailable(
                f"the downstairs image {tag!r} (--phd-downstairs-image / PHD_DOWNSTAIRS_IMAGE)",
                f"Docker cannot find it ({exc}); build or load it (`docker images` lists what is "
                "there), or leave the option out to build phd-downstairs:<hash>") from None
        return tag

    def close(self) -> None:
        try:
            self.spares.close()
        finally:
            try:
                if self._docker is not None:
                    self._docker.close()
            finally:
                self.ports.close()

    def test_dir(self, node_id: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.[]" else "_" for c in node_id)[-180:]
        path = self.config.tmp_dir / self.session_id / safe
        path.mkdir(parents=True, exist_ok=True)
        return path
