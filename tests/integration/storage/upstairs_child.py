"""One upstairs (a CrucibleBackend and its NBD export) in a process of its own, so a test can
SIGKILL it at an arbitrary point - an in-process backend cannot be killed without the test.

    python -m tests.integration.storage.upstairs_child --vcr-file VCR.json --socket S.nbd

Announces progress as JSON lines on stdout: ``{"event": "exported"}`` once the NBD socket
listens, ``{"event": "active", ...}`` once activation (with reconciliation) is done. SIGTERM
closes the backend cleanly; the process also dies with its parent (PR_SET_PDEATHSIG), so a
killed pytest leaves no upstairs behind. The backend's log goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import signal
import sys
from pathlib import Path

from sut.storage.backend import CrucibleBackend, RetryPolicy

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1:  # the parent died before prctl took effect
        sys.exit("upstairs_child: parent already gone")


def _announce(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def _serve(vcr_json: str, socket_path: Path) -> None:
    backend = CrucibleBackend(
        "child", vcr_json, socket_path, retry=RetryPolicy(connect_timeout_s=1.0, reconnect_delay_s=0.2)
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await backend.start_export()
        _announce("exported")
        await backend.activate()
        _announce("active", generation=backend.status()["generation"])
        await stop.wait()
    finally:
        await backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.integration.storage.upstairs_child")
    parser.add_argument("--vcr-file", type=Path, required=True)
    parser.add_argument("--socket", type=Path, required=True)
    args = parser.parse_args()
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    asyncio.run(_serve(args.vcr_file.read_text(), args.socket))


if __name__ == "__main__":
    main()
