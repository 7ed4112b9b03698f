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

pytestmark = pytest.mark.integration

BUILD = Path(__file__).resolve().parents[3] / "guests" / "tiny" / "build"


def start(out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BUILD), "--out", str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_concurrent_builds_build_once_then_cache_hits(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    procs = [start(out), start(out)]
    try:
        results = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (stdout, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr
        assert stdout.strip() == str(out)
    logs = [stderr for _, stderr in results]
    assert sum("building into" in log for log in logs) == 1, logs
    assert sum("concurrent build" in log for log in logs) == 1, logs

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
