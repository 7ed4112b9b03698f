"""Two builds of one recipe at once (two xdist workers wanting the same guest): exactly one
builds, the other waits on the lock and reuses the result."""

from __future__ import annotations

import subprocess
from pathlib import Path


def build_twice_at_once(build: Path, out: Path, timeout_s: float) -> list[str]:
    """Run `build --out out` twice concurrently; both must succeed and print `out`, one must
    say it built, the other that it reused a concurrent build. Returns both stderr logs."""
    procs = [subprocess.Popen([str(build), "--out", str(out)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        results = [proc.communicate(timeout=timeout_s) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (stdout, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        assert stdout.strip() == str(out)
    logs = [stderr for _, stderr in results]
    assert sum("building into" in log for log in logs) == 1, [log[-1000:] for log in logs]
    assert sum("concurrent build" in log for log in logs) == 1, [log[-1000:] for log in logs]
    return logs
