"""Serial console client over the server's websocket.

A reader thread appends every byte the guest prints to one buffer (and a transcript file);
waits match against the text after a cursor, so a wait never matches output that an
earlier step already consumed (PHD matches the LAST occurrence for the same reason).
Failure patterns (kernel panic, oops) end a wait at once with the last console lines.
"""

from __future__ import annotations

import codecs
import re
import threading
import time
from pathlib import Path

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from phd.core.errors import HarnessError, SutError, SutTimeout

__all__ = ["GuestPanic", "SerialConsole"]

# CSI / OSC escape sequences and stray carriage returns, so prompts match as printed text.
_ESCAPES = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][A-Za-z0-9]|\r")

_MAX_ESCAPE = 32  # longer than any escape a guest sends; a lone ESC is not held forever

# A wait fails at once, with the last console lines, when one of these shows: waiting out a
# boot timeout on a guest that can no longer reach its prompt helps nobody.
DEFAULT_FAILURE_PATTERNS = (
    re.compile(r"Kernel panic - not syncing"),
    re.compile(r"\bOops: "),
    re.compile(r"You are in (emergency|rescue) mode"),
    re.compile(r"Give root password for maintenance"),
    re.compile(r"Gave up waiting for root file system device"),
    re.compile(r"Dropping to a shell!"),
    # The firmware tried every boot option and none started: OVMF then runs its UEFI shell,
    # SeaBIOS stops. The guest never gets to its kernel, so no later prompt can come.
    re.compile(r"UEFI Interactive Shell"),
    re.compile(r"No bootable device\."),
)
# What a failure pattern means, where the pattern alone would not say it.
_MEANINGS = {
    "UEFI Interactive Shell": "the UEFI firmware found nothing to boot and started its shell "
                              "(is the boot disk attached, bootable and readable?)",
    "No bootable device\\.": "the BIOS found nothing to boot (is the boot disk attached and bootable?)",
}

# Watchdog reports that mean "this vCPU did not run for a while". Under TCG on a busy host
# they come from the HOST starving the vCPU threads, and the guest carries on, so they do not
# end a wait; a wait that then times out names them, since a real hang shows them too.
DEFAULT_WARNING_PATTERNS = (
    re.compile(r"BUG: soft lockup"),
    re.compile(r"rcu_\w+ detected stalls"),
)


class GuestPanic(SutError):
    """A failure pattern appeared on the console."""


class SerialConsole:
    def __init__(self, ws_url: str, transcript: Path | None = None) -> None:
        self.ws_url = ws_url
        self.transcript_path = transcript
        self._text = ""  # escape-stripped, decoded console output so far
        self._pending = b""  # an escape sequence split across two messages, held back
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._cursor = 0  # offset into _text before which waits do not look
        self._cond = threading.Condition()
        self._ws: ClientConnection | None = None
        self._thread: threading.Thread | None = None
        self._closed_reason: str | None = None
        self._transcript = transcript.open("ab") if transcript else None

    def connect(self) -> None:
        try:
            self._ws = connect(self.ws_url, open_timeout=10, max_size=None)
        except Exception as exc:
            raise HarnessError(f"cannot open serial console {self.ws_url}: {exc}") from exc
        self._thread = threading.Thread(target=self._reader, name="phd-serial", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        assert self._ws is not None
        reason = "closed by server"
        try:
            for msg in self._ws:
                self._feed(msg.encode() if isinstance(msg, str) else bytes(msg))
        except ConnectionClosed as exc:
            reason = f"closed: {exc}"
        except Exception as exc:  # noqa: BLE001 - reported to whoever waits next
            reason = f"reader failed: {exc!r}"
        with self._cond:
            self._closed_reason = reason
            self._cond.notify_all()

    def _clean(self, data: bytes) -> str:
        """Strip escapes from new output only (the buffer grows for the whole boot, so
        re-cleaning it per message would be quadratic); hold back an unfinished escape."""
        data = self._pending + data
        self._pending = b""
        cut = data.rfind(b"\x1b")
        if cut != -1 and len(data) - cut < _MAX_ESCAPE and not _ESCAPES.match(data, cut):
            data, self._pending = data[:cut], data[cut:]
        return self._decoder.decode(_ESCAPES.sub(b"", data))

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._transcript is not None:
            self._transcript.close()
            self._transcript = None

    def _feed(self, data: bytes) -> None:
        """Bytes from the guest's serial port: to the transcript as they came, cleaned into
        the text that waits match (a subclass may read them from elsewhere than the server)."""
        if self._transcript:
            self._transcript.write(data)
            self._transcript.flush()
        with self._cond:
            self._text += self._clean(data)
            self._cond.notify_all()

    # --- reading --------------------------------------------------------------------
    @property
    def text(self) -> str:
        with self._cond:
            return self._text

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.text.splitlines()[-lines:])

    def wait_for(self, pattern: str | re.Pattern[str], timeout_s: float, *,
                 failure_patterns: tuple[re.Pattern[str], ...] = DEFAULT_FAILURE_PATTERNS,
                 consume: bool = True) -> re.Match[str]:
        """Wait until `pattern` appears after the cursor; move the cursor past it."""
        rx = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                window = self._text[self._cursor:]
                for bad in failure_patterns:
                    if bad.search(window):
                        meaning = _MEANINGS.get(bad.pattern)
                        raise GuestPanic(f"console shows {bad.pattern!r}{f': {meaning}' if meaning else ''}; "
                                         f"last lines:\n{self._tail_locked()}")
                match = rx.search(window)
                if match:
                    if consume:
                        self._cursor += match.end()
                    return match  # positions are relative to the window
                if self._closed_reason is not None:
                    raise SutError(f"serial console {self._closed_reason} while waiting for "
                                   f"{rx.pattern!r}; last lines:\n{self._tail_locked()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    warnings = [w.pattern for w in DEFAULT_WARNING_PATTERNS if w.search(self._text)]
                    seen = f" (the console also shows {', '.join(warnings)})" if warnings else ""
                    raise SutTimeout(f"console text {rx.pattern!r}{seen}", timeout_s, self._tail_locked())
                self._cond.wait(remaining)

    def _tail_locked(self, lines: int = 20) -> str:
        return "\n".join(self._text.splitlines()[-lines:])

    # --- writing --------------------------------------------------------------------
    def send(self, text: str) -> None:
        if self._ws is None:
            raise HarnessError("serial console is not connected")
        self._ws.send(text.encode())

