"""The SSH key the framework makes per VM, the console command that installs it, and the
session's command read loop."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import paramiko
import pytest

from phd.core.errors import HarnessError, WaitTimeout
from phd.vm.ssh import SshSession, authorized_keys_command, generate_key
from phd.vm.status import ignore_status


def test_generated_key_is_private_and_loads_in_paramiko(tmp_path: Path) -> None:
    key_path = tmp_path / "vm.ssh_ed25519"
    public = generate_key(key_path, comment="phd-vm")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert public.startswith("ssh-ed25519 AAAA") and public.endswith(" phd-vm")
    assert (tmp_path / "vm.ssh_ed25519.pub").read_text() == public + "\n"
    key = paramiko.Ed25519Key.from_private_key_file(str(key_path))
    assert f"{key.get_name()} {key.get_base64()} phd-vm" == public
    # A second key for another VM is a different key.
    assert generate_key(tmp_path / "other", comment="phd-vm") != public


def test_an_existing_key_file_is_never_overwritten(tmp_path: Path) -> None:
    generate_key(tmp_path / "k", comment="a")
    with pytest.raises(FileExistsError):
        generate_key(tmp_path / "k", comment="b")


def test_install_command_text() -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG0= phd-vm"
    assert authorized_keys_command(key) == (
        "(umask 077 && mkdir -p /root/.ssh && "
        "printf '%s\\n' 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG0= phd-vm' > /root/.ssh/authorized_keys)")


def test_install_command_works_in_a_real_shell(tmp_path: Path) -> None:
    public = generate_key(tmp_path / "k", comment="phd-vm")
    home = tmp_path / "home"
    home.mkdir()
    subprocess.run(["sh", "-c", authorized_keys_command(public, home=str(home))], check=True)
    ssh_dir = home / ".ssh"
    assert (ssh_dir / "authorized_keys").read_text() == public + "\n"
    assert stat.S_IMODE(ssh_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((ssh_dir / "authorized_keys").stat().st_mode) == 0o600


@pytest.mark.parametrize("bad", [
    "ssh-rsa AAAAB3NzaC1yc2E phd",
    "ssh-ed25519 AAAA' ; rm -rf / ; echo '",
    "ssh-ed25519 AAAA phd\nrm -rf /",
    "ssh-ed25519 AAAA $(reboot)",
])
def test_malformed_keys_are_refused(bad: str) -> None:
    with pytest.raises(HarnessError, match="malformed public key"):
        authorized_keys_command(bad)


def test_unusual_home_is_refused() -> None:
    with pytest.raises(HarnessError, match="unusual home"):
        authorized_keys_command("ssh-ed25519 AAAA phd", home="/root; reboot")


# --- SshSession.run's read loop, against a scripted channel ------------------------------------
class ScriptedChannel:
    """Delivers its script one event per wait of the read loop, the way a busy sshd does:
    the exit status first, then the rest of stderr, then EOF."""

    def __init__(self, events: list[tuple[str, bytes | int]]) -> None:
        self.events = events
        self.out = b""
        self.err = b""
        self.status: int | None = None
        self.eof_received = False
        self.closed = False
        self._r, self._w = os.pipe()
        os.write(self._w, b"x")  # always "readable": select never waits here

    def _advance(self) -> None:
        if self.events:
            kind, value = self.events.pop(0)
            if kind == "out":
                self.out += value  # type: ignore[operator]
            elif kind == "err":
                self.err += value  # type: ignore[operator]
            elif kind == "status":
                self.status = value  # type: ignore[assignment]
            elif kind == "eof":
                self.eof_received = True

    def exec_command(self, command: str) -> None:
        pass

    def recv_ready(self) -> bool:
        return bool(self.out)

    def recv(self, n: int) -> bytes:
        chunk, self.out = self.out[:n], self.out[n:]
        return chunk

    def recv_stderr_ready(self) -> bool:
        return bool(self.err)

    def recv_stderr(self, n: int) -> bytes:
        chunk, self.err = self.err[:n], self.err[n:]
        return chunk

    def exit_status_ready(self) -> bool:
        return self.status is not None

    def recv_exit_status(self) -> int:
        assert self.status is not None
        return self.status

    def fileno(self) -> int:
        # select() asks for the fd each time the loop waits: the next event "arrives".
        self._advance()
        return self._r

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


class FakeClient:
    def __init__(self, chan: ScriptedChannel) -> None:
        self.chan = chan

    def get_transport(self) -> FakeClient:
        return self

    def is_active(self) -> bool:
        return True

    def open_session(self, timeout: float) -> ScriptedChannel:
        return self.chan


def test_output_after_the_exit_status_is_not_lost() -> None:
    chan = ScriptedChannel([("out", b"out\n"), ("status", 3), ("err", b"late "), ("err", b"stderr"),
                            ("eof", 0)])
    session = SshSession(FakeClient(chan), port=1, user="root")
    result = session.run("cmd", check=ignore_status)
    assert (result.status, result.stdout, result.stderr) == (3, "out\n", "late stderr")


def test_a_command_that_never_ends_times_out_with_what_it_printed() -> None:
    chan = ScriptedChannel([("out", b"partial")])
    session = SshSession(FakeClient(chan), port=1, user="root")
    with pytest.raises(WaitTimeout, match="partial"):
        session.run("sleep forever", timeout_s=0.2)
