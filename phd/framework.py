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
import threading
from pathlib import Path
from typing import Any

from phd.artifacts import ArtifactStore
from phd.config import PhdConfig
from phd.downstairs import DsProgram
from phd.errors import ArtifactUnavailable
from phd.ports import PortAllocator

__all__ = ["Framework", "PhdConfig"]


class Framework:
    def __init__(self, config: PhdConfig, session_id: str) -> None:
        self.config = config
        self.session_id = session_id
        # A slot of loopback ports claimed for this process (phd.ports), named for this session.
        self.ports = PortAllocator(owner=f"session {session_id}")
        self.artifacts = ArtifactStore(config.manifest, config.artifact_dir, config.repo_root)
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
                argv = [sys.executable, "-m", "sut.storage.image", "ensure"]
                argv += (["--binary", str(program.binary)] if program.binary is not None
                         else ["--program", program.kind])
                proc = subprocess.run(argv, cwd=self.config.repo_root,  # noqa: S603
                                      stdin=subprocess.DEVNULL, capture_output=True,
                                      text=True, check=False)
                lines = proc.stdout.strip().splitlines()
                if proc.returncode != 0 or not lines:
                    raise ArtifactUnavailable(
                        f"the {program.kind} downstairs container image",
                        f"`{shlex.join(argv)}` exited {proc.returncode}; it builds from Debian "
                        f"packages with mmdebstrap (run ci/bootstrap); output:\n{proc.stderr[-1500:]}")
                self._images[program] = lines[-1].strip()
            return self._images[program]

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
            if self._docker is not None:
                self._docker.close()
        finally:
            self.ports.close()

    def test_dir(self, node_id: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.[]" else "_" for c in node_id)[-180:]
        path = self.config.tmp_dir / self.session_id / safe
        path.mkdir(parents=True, exist_ok=True)
        return path
