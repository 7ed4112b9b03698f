"""Two real ``guests/tiny/build`` processes on one ``--out``: one builds, one waits and reuses.

This is the pytest-xdist situation (every worker asks for the guest at session
start) with real processes, real apt/dpkg and a real file lock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.guests.builds import build_twice_at_once

pytestmark = pytest.mark.integration

BUILD = Path(__file__).resolve().parents[3] / "guests" / "tiny" / "build"


def test_concurrent_builds_build_once_then_cache_hits(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    build_twice_at_once(BUILD, out, timeout_s=300)

    meta = json.loads((out / "guest.json").read_text())
    assert (out / "initrd.img").stat().st_size > 500_000
    assert (out / "vmlinuz").read_bytes()[0x202:0x206] == b"HdrS", "not a bzImage"
    # Nothing but the result and its lock is left next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "tiny.lock"]

    started = time.monotonic()
    again = subprocess.run(
        [str(BUILD), "--out", str(out)], stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    cached_s = time.monotonic() - started
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stderr
    assert json.loads((out / "guest.json").read_text()) == meta
    print(f"\ntiny build: cold {meta['build_seconds']} s, cached {cached_s:.2f} s", file=sys.stderr)


def test_bad_out_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep")
    done = subprocess.run(
        [str(BUILD), "--out", str(tmp_path / "precious")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert "refusing to replace it" in done.stderr
    assert "Traceback" not in done.stderr
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep"
