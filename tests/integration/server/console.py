"""Driving the raw server API with a real guest: specs, state waits, a logged-in console.

These tests drive the server's HTTP API directly (they test the API itself), and reuse the
framework's serial console and tiny-guest adapter for the guest side.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from phd.artifacts.store import GuestArtifact
from phd.vm.guest import TinyGuest
from phd.vm.serial import SerialConsole


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


def serial_url(base_url: str, query: str = "from_start=0") -> str:
    return base_url.replace("http://", "ws://", 1) + f"/instance/serial?{query}"


def open_guest(base_url: str, transcript: Path | None = None) -> TinyGuest:
    """A serial console reader (the framework's) with the tiny guest's login and commands."""
    console = SerialConsole(serial_url(base_url), transcript=transcript)
    console.connect()
    return TinyGuest(console)
