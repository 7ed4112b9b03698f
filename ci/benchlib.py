"""What the benchmarks share: a phd Framework built outside pytest, and factories for one
measured scenario that tear down whatever happens (VMs before the disks they use)."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from phd.framework import Framework, PhdConfig
from phd.storage.downstairs import default_process_cmd
from phd.vm.factory import DiskFactory, VmFactory

REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def framework(downstairs: str, tmp: Path, guests: tuple[str, ...] = ("tiny",)) -> Framework:
    """The reference server and downstairs, the repo's manifest, PHD_ARTIFACT_DIR / PHD_ACCEL /
    PHD_SPARE_SERVERS honoured as in pytest runs."""
    spares = os.environ.get("PHD_SPARE_SERVERS", "on")
    if spares not in ("on", "off"):
        raise SystemExit(f"PHD_SPARE_SERVERS is {spares!r}: set it to on or off (or unset it)")
    config = PhdConfig(
        server_cmd=(sys.executable, "-m", "sut.server"),
        manifest=REPO / "artifacts" / "artifacts.toml",
        artifact_dir=Path(os.environ.get("PHD_ARTIFACT_DIR", Path.home() / ".cache" / "phd" / "artifacts")),
        tmp_dir=tmp, default_guest="tiny", guests=guests, downstairs=downstairs,
        downstairs_cmd=tuple(default_process_cmd()), output_mode="file", keep_on_failure=False,
        accel=os.environ.get("PHD_ACCEL", "tcg"), regressions=(), repo_root=REPO,
        spare_servers=spares == "on")
    return Framework(config, f"bench{uuid.uuid4().hex[:6]}")


@contextmanager
def factories(fw: Framework, tmp: Path, bench: str, name: str) -> Iterator[tuple[VmFactory, DiskFactory]]:
    test_dir = tmp / name
    test_dir.mkdir(parents=True)
    vms = VmFactory(fw, f"{bench}::{name}", test_dir)
    disks = DiskFactory(fw, f"{bench}::{name}", test_dir)
    try:
        yield vms, disks
    finally:
        try:
            vms.close()
        finally:
            disks.close()
