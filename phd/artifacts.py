"""Artifact store: resolve a guest name from the manifest to files on disk.

For now every guest comes from a `recipe` (a build script under `guests/<name>/` that
caches by a hash of its inputs and locks against concurrent builders). The store only
adds a per-process memo, so each pytest worker asks the recipe once per session.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

from phd.errors import ArtifactUnavailable, HarnessError

__all__ = ["ArtifactStore", "GuestArtifact"]


@dataclass(frozen=True)
class GuestArtifact:
    name: str
    kernel: Path
    initrd: Path
    cmdline: str
    login_prompt: str
    shell_prompt: str
    # The guest's root disk image (raw), for recipes that boot from a disk (guest.json
    # "files": {"disk": ...}); None for initramfs-only guests such as tiny.
    disk: Path | None = None


class ArtifactStore:
    def __init__(self, manifest: Path, artifact_dir: Path, repo_root: Path) -> None:
        self.manifest_path = manifest
        self.artifact_dir = artifact_dir
        self.repo_root = repo_root
        self._memo: dict[str, GuestArtifact] = {}
        self._lock = threading.Lock()
        try:
            self._entries: dict[str, dict[str, object]] = tomllib.loads(
                manifest.read_text())["artifacts"]
        except FileNotFoundError:
            raise HarnessError(f"artifact manifest {manifest} not found; pass --phd-manifest") from None
        except (tomllib.TOMLDecodeError, KeyError) as exc:
            raise HarnessError(f"artifact manifest {manifest} is malformed: {exc}") from None

    def guest(self, name: str) -> GuestArtifact:
        with self._lock:
            if name not in self._memo:
                self._memo[name] = self._build_guest(name)
            return self._memo[name]

    def _build_guest(self, name: str) -> GuestArtifact:
        entry = self._entries.get(name)
        if entry is None:
            raise HarnessError(f"guest {name!r} is not in {self.manifest_path}; "
                               f"known: {sorted(self._entries)}")
        source = entry.get("source")
        if not isinstance(source, dict) or "recipe" not in source:
            raise HarnessError(f"artifacts.{name}.source: only `recipe` sources are supported yet")
        recipe = self.repo_root / str(source["recipe"]) / "build"
        out = self.artifact_dir / "guests" / name
        argv = [str(recipe), "--out", str(out)]
        out.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,  # noqa: S603
                              text=True, check=False)
        if proc.returncode != 0:
            raise ArtifactUnavailable(
                f"guest {name!r}",
                f"its recipe failed ({shlex.join(argv)} exited {proc.returncode}); run it by hand "
                f"to see why; last output:\n{proc.stderr[-1500:]}")
        meta = json.loads((out / "guest.json").read_text())
        disk_name = (meta.get("files") or {}).get("disk")
        return GuestArtifact(
            name=name,
            kernel=out / "vmlinuz",
            initrd=out / "initrd.img",
            cmdline=(out / "cmdline").read_text().strip(),
            login_prompt=str(meta.get("login_prompt", "login: ")),
            shell_prompt=str(meta.get("shell_prompt", "# ")),
            disk=None if disk_name is None else out / str(disk_name),
        )
