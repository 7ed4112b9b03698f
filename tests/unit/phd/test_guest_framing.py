"""The guest adapter's framing, against a scripted console (the real path is the suite)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from phd.vm.guest import GuestCommandError, TinyGuest
from phd.vm.status import check_err, ignore_status


class ScriptedConsole:
    """Answers each framed command like a shell would: echo, output, end marker, prompt."""

    def __init__(self, outputs: list[tuple[str, int]]) -> None:
        self.outputs = outputs
        self.buffer = ""
        self.sent: list[str] = []

    def send(self, text: str) -> None:
        self.sent.append(text)
        n = re.search(r"PHD_BEGIN_%s\\n' (\d+);", text)
        if n:
            out, status = self.outputs.pop(0)
            # the echo of the typed line contains the format string, never the real marker
            self.buffer += text.replace("\n", "\r\n")
            self.buffer += f"PHD_BEGIN_{n.group(1)}\n{out}PHD_END_{n.group(1)}_{status}\nroot@tiny:~# "

    def wait_for(self, pattern: object, timeout_s: float) -> re.Match[str]:
        rx = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        assert isinstance(rx, re.Pattern)
        m = rx.search(self.buffer)
        assert m, f"{rx.pattern!r} not in {self.buffer!r}"
        self.buffer = self.buffer[m.end():]
        return m


def test_output_and_status_are_exact() -> None:
    guest = TinyGuest(ScriptedConsole([("hello\nworld\n", 0)]))  # type: ignore[arg-type]
    result = guest.run("echo hello; echo world")
    assert result.output == "hello\nworld"
    assert result.status == 0


def test_non_zero_status_fails_by_default_and_can_be_expected() -> None:
    guest = TinyGuest(ScriptedConsole([("", 3), ("", 3), ("", 0)]))  # type: ignore[arg-type]
    with pytest.raises(GuestCommandError, match="exited 3"):
        guest.run("false")
    assert guest.run("false", check=check_err).status == 3
    with pytest.raises(GuestCommandError, match="expected non-zero"):
        guest.run("true", check=check_err)


def test_ignore_status_returns_any_status() -> None:
    guest = TinyGuest(ScriptedConsole([("x\n", 9)]))  # type: ignore[arg-type]
    assert guest.run("exit 9", check=ignore_status).status == 9


@pytest.mark.parametrize("check", ["check_ok", "ok", True, None])
def test_check_takes_only_the_enum_and_anything_else_fails_before_anything_is_sent(
        check: object) -> None:
    console = ScriptedConsole([])
    guest = TinyGuest(console)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"is not a phd.StatusCheck; pass one of "
                                        r"phd.check_ok, phd.check_err, phd.ignore_status"):
        guest.run("true", check=check)  # type: ignore[arg-type]
    assert console.sent == []


@pytest.mark.parametrize("shell", [["/bin/sh"], ["busybox", "sh"], ["bash"]])
@pytest.mark.parametrize(("command", "output", "status"), [
    ("echo 'it'\"'\"'s quoted'; exit_with() { return 4; }; exit_with", "it's quoted", 4),
    ("sleep 0 & echo started", "started", 0),
    ("true &", "", 0),
    ("echo a | tr a b; false", "b", 1),
])
def test_the_framed_line_runs_in_real_shells(shell: list[str], command: str, output: str,
                                             status: int) -> None:
    """The exact line the adapter types, run by real shells (the guests' are busybox ash
    and bash): markers, output and status come out right, even for quotes and a trailing &."""
    if shutil.which(shell[0]) is None:
        pytest.skip(f"{shell[0]} is not installed here")
    console = ScriptedConsole([(output + "\n", status)])
    TinyGuest(console).run(command, check=ignore_status)  # type: ignore[arg-type]
    line = console.sent[0]
    done = subprocess.run(shell, input=line, capture_output=True, text=True, timeout=30, check=False)
    body = output + "\n" if output else ""
    assert done.stdout == f"PHD_BEGIN_1\n{body}PHD_END_1_{status}\n", done.stderr
