"""Talking to a guest booted through the raw server API: state waits and a serial session.

These tests drive the server without the framework's VM handle on purpose (they test the
server's API itself), so they need a small console of their own.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect
from websockets.sync.connection import Connection

from phd.artifacts import GuestArtifact

BOOT_DEADLINE_S = 120.0
COMMAND_DEADLINE_S = 60.0
PROMPT = b"root@tiny:~# "


def tiny_spec(
    tiny: GuestArtifact, disks: dict[str, Any], nics: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "properties": {"id": str(uuid.uuid4()), "name": "tiny"},
        "spec": {
            "board": {"cpus": 1, "memory_mib": 256},
            "boot": {"kernel": str(tiny.kernel), "initrd": str(tiny.initrd), "cmdline": tiny.cmdline},
            "disks": disks,
            "nics": nics or {},
        },
    }


def file_disk(path: Path, interface: str = "virtio") -> dict[str, Any]:
    return {"interface": interface, "backend": {"type": "file", "path": str(path)}}


def wait_for_state(http: httpx.Client, state: str, after_gen: int = 0, timeout_s: float = 60.0) -> int:
    """Follow the state monitor until ``state`` is current after ``after_gen``; returns its gen.

    The monitor answers with the CURRENT state once gen >= N, so a state left
    again within a poll can be skipped; exact sequences are checked against
    the server's log of published states instead.
    """
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    gen = after_gen + 1
    while time.monotonic() < deadline:
        answer = http.get("/instance/state-monitor", params={"gen": gen},
                          timeout=max(1.0, deadline - time.monotonic())).json()
        if answer["gen"] < gen:  # a bounded long-poll answered with nothing new
            continue
        seen.append(f"{answer['gen']}:{answer['state']}")
        if answer["state"] == state:
            return int(answer["gen"])
        if answer["state"] in ("Destroyed", "Failed"):
            break
        gen = int(answer["gen"]) + 1
    raise AssertionError(f"state {state} not published after gen {after_gen}; saw {seen}")


class SerialSession:
    """One websocket reader of the serial console that remembers everything it saw."""

    def __init__(self, base_url: str, query: str = "from_start=0") -> None:
        self.url = base_url.replace("http://", "ws://", 1) + f"/instance/serial?{query}"
        self.ws: Connection = connect(self.url)
        self.seen = bytearray()

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> SerialSession:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def expect(self, needle: bytes, *, after: int = 0, timeout_s: float = COMMAND_DEADLINE_S) -> int:
        """Read until ``needle`` appears at or after offset ``after``; returns the offset past it."""
        deadline = time.monotonic() + timeout_s
        while (index := self.seen.find(needle, after)) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = bytes(self.seen[-600:]).decode(errors="replace")
                raise AssertionError(f"no {needle!r} on the serial console; last output:\n{tail}")
            try:
                frame = self.ws.recv(timeout=remaining)
            except TimeoutError:
                continue
            assert isinstance(frame, bytes), "serial frames must be binary"
            self.seen += frame
        return index + len(needle)

    def login(self, *, after: int = 0) -> int:
        end = self.expect(b"login: ", after=after, timeout_s=BOOT_DEADLINE_S)
        self.ws.send(b"root\n")
        end = self.expect(PROMPT, after=end)
        # As PHD does: a wide terminal, so a long command line is echoed on
        # one line and never wrapped into the output.
        self.run("stty cols 9999")
        return end

    def run(self, command: str, *, timeout_s: float = COMMAND_DEADLINE_S) -> str:
        """Type ``command``; return its output (between the echo and the next prompt).

        A unique end marker carries the exit status, so output is never confused
        with an earlier prompt and a failing command fails the test.
        """
        token = uuid.uuid4().hex[:8]
        start = len(self.seen)
        # The marker is split by empty quotes in what is typed, so the echoed
        # command line never matches it; only the output does.
        typed = f"{command}; echo \"=={token[:4]}\"\"{token[4:]} rc=$?==\""
        self.ws.send(typed.encode() + b"\n")
        end = self.expect(f"=={token} rc=".encode(), after=start, timeout_s=timeout_s)
        rc_end = self.expect(b"==", after=end)
        rc = int(self.seen[end:rc_end - 2])
        # Wait for the next prompt too, so the next command starts clean.
        self.expect(PROMPT, after=rc_end)
        text = bytes(self.seen[start:end]).decode(errors="replace").replace("\r", "")
        # The output starts on the line after the echo of what was typed.
        echo = text.find(typed[-20:])
        body = text[text.index("\n", echo) + 1:] if echo >= 0 and "\n" in text[echo:] else text
        body = body.removesuffix(f"=={token} rc=")
        if rc != 0:
            raise AssertionError(f"guest command {command!r} exited {rc}; output:\n{body}")
        return body.strip()
