"""Escape stripping of console output arriving in arbitrary pieces."""

from __future__ import annotations

import time

import pytest

from phd.core.errors import WaitTimeout
from phd.vm.serial import GuestPanic, SerialConsole


def _feed(pieces: list[bytes]) -> str:
    console = SerialConsole("ws://127.0.0.1:1/unused")
    return "".join(console._clean(p) for p in pieces)


def test_escapes_and_carriage_returns_are_stripped() -> None:
    assert _feed([b"root@tiny:~# \x1b[6n\r\nok\x1b[0m\n"]) == "root@tiny:~# \nok\n"


def test_an_escape_split_across_messages_is_still_stripped() -> None:
    assert _feed([b"a\x1b[", b"6", b"nb"]) == "ab"


def test_a_multibyte_character_split_across_messages_survives() -> None:
    text = "ü ok".encode()
    assert _feed([text[:1], text[1:]]) == "ü ok"


@pytest.mark.parametrize("line", [
    "[    3.1] Kernel panic - not syncing: VFS: Unable to mount root fs",
    "You are in emergency mode. After logging in, type \"journalctl -xb\"",
    "You are in rescue mode. After logging in, type \"journalctl -xb\"",
    "Give root password for maintenance",
    "Gave up waiting for root file system device.  Common problems:",
    "ALERT!  /dev/vda does not exist.  Dropping to a shell!",
    "UEFI Interactive Shell v2.2",
    "No bootable device.",
])
def test_a_failure_pattern_fails_a_wait_at_once(line: str) -> None:
    console = SerialConsole("ws://127.0.0.1:1/unused")
    console._text = f"booting...\n{line}\n"
    started = time.monotonic()
    with pytest.raises(GuestPanic, match="console shows"):
        console.wait_for("login: ", timeout_s=30.0)
    assert time.monotonic() - started < 1.0, "a failure pattern must not wait out the timeout"


@pytest.mark.parametrize(("line", "meaning"), [
    ("UEFI Interactive Shell v2.2", "UEFI firmware found nothing to boot and started its shell"),
    ("No bootable device.", "BIOS found nothing to boot"),
])
def test_a_firmware_giving_up_is_named_for_what_it_means(line: str, meaning: str) -> None:
    console = SerialConsole("ws://127.0.0.1:1/unused")
    console._text = f"BdsDxe: failed to load Boot0001 \"UEFI Misc Device\": Not Found\n{line}\n"
    with pytest.raises(GuestPanic, match=meaning):
        console.wait_for("login: ", timeout_s=30.0)


def test_a_firmware_that_moves_on_to_the_next_boot_option_is_not_a_failure() -> None:
    """One boot option failing is routine (the firmware tries the next); only giving up is."""
    console = SerialConsole("ws://127.0.0.1:1/unused")
    console._text = ("BdsDxe: failed to load Boot0001 \"UEFI PXEv4\": Not Found\n"
                     "BdsDxe: starting Boot0002 \"UEFI Misc Device\"\ntiny login: ")
    assert console.wait_for("login: ", timeout_s=1.0)


def test_ordinary_boot_output_is_not_a_failure() -> None:
    console = SerialConsole("ws://127.0.0.1:1/unused")
    console._text = "[ OK ] Reached target rescue.target\nrcu: Hierarchical SRCU implementation.\nlogin: "
    assert console.wait_for("login: ", timeout_s=1.0)


@pytest.mark.parametrize("line", [
    "[   32.0] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [systemd-udevd:120]",
    "[   60.1] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
])
def test_a_watchdog_warning_does_not_end_a_wait_but_a_timeout_names_it(line: str) -> None:
    """A starved TCG vCPU trips the guest's watchdog and then boots on: the wait goes on,
    and if it does time out, the error says the console showed the warning."""
    console = SerialConsole("ws://127.0.0.1:1/unused")
    console._text = f"booting...\n{line}\nlogin: "
    assert console.wait_for("login: ", timeout_s=1.0)
    console._text += f"\n{line}\n"
    with pytest.raises(WaitTimeout, match="the console also shows"):
        console.wait_for("# ", timeout_s=0.2)
