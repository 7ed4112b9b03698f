"""Escape stripping of console output arriving in arbitrary pieces."""

from __future__ import annotations

from phd.serial import SerialConsole


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
