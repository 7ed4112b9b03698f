"""Finding the processes a nested run left behind (by a path only that run used)."""

from __future__ import annotations

import os
from pathlib import Path

from phd.core.reaper import start_time


def pids_mentioning(needle: str) -> list[int]:
    """Live (non-zombie) processes other than this one whose command line contains ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if needle.encode() in cmdline and start_time(int(entry.name)) is not None:
            found.append(int(entry.name))
    return found
