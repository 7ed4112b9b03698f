"""A real HTTP server on 127.0.0.1 serving files, for tests of downloads (no network)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # request lines would clutter the test output


@contextlib.contextmanager
def serve_files(root: Path, files: dict[str, bytes]) -> Iterator[str]:
    """Write `files` under `root` and serve them; yields the base URL (no trailing slash).
    The server is shut down and its thread joined on the way out."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    handler = functools.partial(_QuietHandler, directory=str(root))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            thread.join(timeout=10)
