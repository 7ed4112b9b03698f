"""Driving the raw server API with a real guest: specs, state waits, a logged-in console.

These tests drive the server's HTTP API directly (they test the API itself), and reuse the
framework's serial console and tiny-guest adapter for the guest side.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from phd.artifacts.store import GuestArtifact
from phd.vm.guest import TinyGuest
from phd.vm.serial import SerialConsole
from tests import v5


def tiny_args(tiny: GuestArtifact) -> list[str]:
    """The server options that boot the tiny guest directly (v5 has no field for a kernel)."""
    return ["--kernel", str(tiny.kernel), "--initrd", str(tiny.initrd), "--cmdline", tiny.cmdline]


def tiny_spec(disks: dict[str, tuple[Path, str]], *, nic: bool = False) -> dict[str, Any]:
    """A v5 ensure body: com1, each disk (name -> (path, interface)) on PCI slots from 0x10 in
    order, and a virtio NIC when asked (its forwards are the server's --forward)."""
    components = [v5.serial()]
    for slot, (name, (path, interface)) in enumerate(disks.items(), start=0x10):
        components.append(v5.disk(name, v5.file_backend(path), interface=interface, slot=slot))
    if nic:
        components.append(v5.nic())
    return v5.ensure(v5.spec(*components, memory_mb=256), name="tiny")


def file_disk(path: Path, interface: str = "virtio") -> tuple[Path, str]:
    return path, interface


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
        answer = http.request("GET", "/instance/state-monitor", json={"gen": gen},
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
