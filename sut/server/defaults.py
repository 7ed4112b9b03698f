"""The server's defaults, in a module that imports nothing.

``python -m sut.server`` parses its arguments and binds its listening socket before it loads
the HTTP stack and the VM machinery (cli.py); the parser's defaults therefore live here, and
api.py and limits.py take them from here too.
"""

from __future__ import annotations

# Longest one GET /instance/state-monitor waits before it answers the current state.
DEFAULT_LONG_POLL_MAX_S = 60.0
# Request body limits (limits.BodyLimitMiddleware) and connection limits (limits.GuardedH11Protocol).
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 10.0
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 128
