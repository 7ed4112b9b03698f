"""Guest OS adapters: how to log in on the serial console and run a framed command.

A command is framed by markers that the guest prints with `printf`, so the typed echo
(which contains `%s`, not the number) can never be mistaken for output, and the exit
status travels with the end marker. No prompt regex is needed to find the output.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from phd.core.errors import SutError
from phd.vm.serial import SerialConsole
from phd.vm.status import StatusCheck, check_ok, status_check

__all__ = ["AlpineGuest", "CommandResult", "DebianGuest", "GuestAdapter", "GuestCommandError",
           "TinyGuest", "adapter_for"]


@dataclass(frozen=True)
class CommandResult:
    command: str
    status: int
    output: str


class GuestCommandError(SutError):
    def __init__(self, result: CommandResult, expected: str) -> None:
        super().__init__(f"guest command {result.command!r} exited {result.status} "
                         f"(expected {expected}); output:\n{result.output[-2000:]}")
        self.result = result


class GuestAdapter:
    """Base adapter: subclasses give the prompts and the login sequence."""

    name = "generic"
    login_prompt = "login: "
    user = "root"
    shell_prompt = "# "
    boot_timeout_s = 300.0  # PHD's cap for the whole login sequence
    has_sshd = False  # the image runs sshd: its VMs get an SSH forward and `TestVm.ssh()` works

    def __init__(self, console: SerialConsole) -> None:
        self.console = console
        self._seq = itertools.count(1)

    def continued_on(self, console: SerialConsole) -> GuestAdapter:
        """This logged-in shell, reached through another console (the guest migrated to
        another server). Command numbers go on from this adapter's, so no frame marker of
        the carried-over history can be taken for a new command's."""
        moved = type(self)(console)
        moved._seq = self._seq
        return moved

    def login(self, timeout_s: float | None = None) -> None:
        timeout = self.boot_timeout_s if timeout_s is None else timeout_s
        self.console.wait_for(self.login_prompt, timeout)
        self.console.send(self.user + "\n")
        self.console.wait_for(self.shell_prompt, 60.0)
        # A wide terminal keeps long commands from wrapping into the output.
        self.run("stty cols 9999 2>/dev/null; true")

    def run(self, command: str, *, timeout_s: float = 60.0,
            check: StatusCheck = check_ok) -> CommandResult:
        """Run `command` in the guest shell; `check` says what its exit status must be
        (check_ok: 0, check_err: non-zero, ignore_status: anything)."""
        expect = status_check(check)
        n = next(self._seq)
        # One line: the shell echoes it whole before any output, so nothing interleaves.
        # The command runs under `eval` so that any command the shell accepts on its own
        # line frames too: one ending in `&`, say, would be a syntax error before `;`.
        quoted = "'" + command.replace("'", "'\\''") + "'"
        framed = f"printf 'PHD_BEGIN_%s\\n' {n}; eval {quoted}; printf 'PHD_END_%s_%s\\n' {n} $?\n"
        self.console.send(framed)
        self.console.wait_for(re.compile(rf"PHD_BEGIN_{n}\n"), timeout_s)
        end = self.console.wait_for(re.compile(rf"(?s)(.*?)PHD_END_{n}_(\d+)\n"), timeout_s)
        output, status = end.group(1), int(end.group(2))
        self.console.wait_for(self.shell_prompt, timeout_s)
        result = CommandResult(command, status, output.replace("\r", "").rstrip("\n"))
        expected = expect.violated_by(status)
        if expected is not None:
            raise GuestCommandError(result, expected)
        return result


class TinyGuest(GuestAdapter):
    """The busybox initramfs guest of `guests/tiny`."""

    name = "tiny"
    login_prompt = "tiny login: "
    shell_prompt = "root@tiny:~# "
    boot_timeout_s = 120.0


class AlpineGuest(GuestAdapter):
    """Alpine's minirootfs as an initramfs (`guests/alpine`): busybox getty/login, ash.

    The hostname is `localhost` and `/etc/profile` sets PS1='\\h:\\w\\$ ', as on PHD's
    Alpine image, so the prompts are PHD's Alpine adapter's.
    """

    name = "alpine"
    login_prompt = "localhost login: "
    shell_prompt = "localhost:~# "
    boot_timeout_s = 120.0


class DebianGuest(GuestAdapter):
    """Debian 12 of `guests/debian`: systemd's serial getty on ttyS0 (it prints the issue
    banner, then the prompt), bash as root's shell (PHD's Debian prompts), and sshd."""

    name = "debian"
    login_prompt = "debian login: "
    shell_prompt = "root@debian:~# "
    has_sshd = True


_ADAPTERS: dict[str, type[GuestAdapter]] = {"tiny": TinyGuest, "alpine": AlpineGuest,
                                            "debian": DebianGuest}


def adapter_for(guest: str) -> type[GuestAdapter]:
    try:
        return _ADAPTERS[guest]
    except KeyError:
        raise SutError(f"no guest adapter for {guest!r}; known: {sorted(_ADAPTERS)}") from None
