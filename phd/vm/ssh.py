"""SSH into a guest with sshd: an ephemeral key per VM, a paramiko session, SFTP.

The framework owns the whole path: it generates an ed25519 key in the test directory,
installs the public half through the serial console (so no guest image carries a
framework key), forwards a 127.0.0.1 port to the guest's port 22 (QEMU user
networking) and polls until sshd accepts the key. One session per VM is reused for
every command (Firecracker's habit): a command costs a channel, not a handshake.
"""

from __future__ import annotations

import re
import select
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from phd.core.errors import HarnessError, SutError, SutTimeout
from phd.core.wait import wait_until
from phd.vm.status import StatusCheck, check_ok, status_check

__all__ = [
    "SshCommandError",
    "SshResult",
    "SshSession",
    "authorized_keys_command",
    "connect_when_ready",
    "generate_key",
]

LOOPBACK = "127.0.0.1"
_PUBLIC_KEY = re.compile(r"^ssh-ed25519 [A-Za-z0-9+/]+={0,2}( [A-Za-z0-9_.@-]+)?$")
_RECV = 1 << 16


@dataclass(frozen=True)
class SshResult:
    command: str
    status: int
    stdout: str
    stderr: str


class SshCommandError(SutError):
    def __init__(self, result: SshResult, expected: str) -> None:
        super().__init__(f"ssh command {result.command!r} exited {result.status} (expected {expected}); "
                         f"stdout:\n{result.stdout[-1000:]}\nstderr:\n{result.stderr[-1000:]}")
        self.result = result


def generate_key(path: Path, comment: str) -> str:
    """Write a new ed25519 private key (OpenSSH format, mode 0600) to ``path`` and its
    public half to ``path.pub``; return the public line (``ssh-ed25519 AAAA... comment``)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    line = f"{public} {comment}"
    path.touch(mode=0o600, exist_ok=False)  # never world-readable, not even for a moment
    path.write_bytes(private)
    path.with_name(path.name + ".pub").write_text(line + "\n")
    return line


def authorized_keys_command(public_key: str, home: str = "/root") -> str:
    """The shell command that makes ``public_key`` the only key sshd accepts for the user.

    The key is checked against the shape ``generate_key`` writes, so quoting it in single
    quotes is safe (it cannot contain a quote, a newline or a shell metacharacter).
    """
    if not _PUBLIC_KEY.match(public_key):
        raise HarnessError(f"refusing to install a malformed public key {public_key[:60]!r}")
    if not re.fullmatch(r"/[A-Za-z0-9_./-]*", home):
        raise HarnessError(f"refusing an unusual home directory {home!r}")
    ssh_dir = f"{home.rstrip('/')}/.ssh"
    # umask 077 in a subshell: the directory and the file are created private, and the
    # caller's shell keeps its umask.
    return (f"(umask 077 && mkdir -p {ssh_dir} && "
            f"printf '%s\\n' '{public_key}' > {ssh_dir}/authorized_keys)")


class _AcceptHostKey(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]
    """Accept the guest's host key: every VM of one image shares it, and the connection
    never leaves loopback, so there is nothing to verify it against."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        return None


class SshSession:
    """One SSH connection to a guest; commands and SFTP share it. A context manager."""

    def __init__(self, client: paramiko.SSHClient, port: int, user: str) -> None:
        self._client = client
        self._sftp: paramiko.SFTPClient | None = None
        self.port = port
        self.user = user

    @classmethod
    def connect(cls, port: int, key_path: Path, *, user: str = "root", timeout_s: float = 10.0,
                host: str = LOOPBACK) -> SshSession:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(_AcceptHostKey())
        try:
            client.connect(host, port=port, username=user,
                           pkey=paramiko.Ed25519Key.from_private_key_file(str(key_path)),
                           timeout=timeout_s, banner_timeout=timeout_s, auth_timeout=timeout_s,
                           allow_agent=False, look_for_keys=False)
        except BaseException:
            client.close()
            raise
        return cls(client, port, user)

    @property
    def active(self) -> bool:
        transport = self._client.get_transport()
        return transport is not None and bool(transport.is_active())

    def run(self, command: str, *, timeout_s: float = 60.0,
            check: StatusCheck = check_ok) -> SshResult:
        """Run ``command``; stdout and stderr exactly as sent (UTF-8), and the exit status.

        check: check_ok (status 0), check_err (non-zero) or ignore_status.
        """
        expect = status_check(check)
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise SutError(f"the SSH connection to 127.0.0.1:{self.port} is closed")
        deadline = time.monotonic() + timeout_s
        chan = transport.open_session(timeout=timeout_s)
        try:
            chan.exec_command(command)
            out, err = bytearray(), bytearray()
            # Read both streams as data arrives: a command that fills one stream's window
            # while we block on the other would otherwise never finish.
            while True:
                while chan.recv_ready():
                    out += chan.recv(_RECV)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(_RECV)
                # The exit status may arrive before the last output (sshd reports the exit
                # while it still drains the command's pipes): done means status AND end of
                # data (EOF or close) AND nothing left unread.
                finished = chan.exit_status_ready() and (chan.eof_received or chan.closed)
                if finished and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SutTimeout(f"ssh command {command!r} to finish", timeout_s,
                                      {"stdout": out[-500:].decode(errors="replace"),
                                       "stderr": err[-500:].decode(errors="replace")})
                # The channel's fileno turns readable on new data on either stream and on close.
                select.select([chan], [], [], min(remaining, 1.0))
            status = chan.recv_exit_status()
        finally:
            chan.close()
        result = SshResult(command, status, out.decode(errors="replace"), err.decode(errors="replace"))
        expected = expect.violated_by(status)
        if expected is not None:
            raise SshCommandError(result, expected)
        return result

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self._client.open_sftp()
        return self._sftp

    def put(self, local: Path, remote: str) -> None:
        """Copy a local file to ``remote`` in the guest (SFTP)."""
        self._sftp_client().put(str(local), remote)

    def get(self, remote: str, local: Path) -> None:
        """Copy ``remote`` from the guest to a local file (SFTP)."""
        self._sftp_client().get(remote, str(local))

    def close(self) -> None:
        """Close SFTP and the connection; safe to call twice."""
        try:
            if self._sftp is not None:
                self._sftp.close()
                self._sftp = None
        finally:
            self._client.close()

    def __enter__(self) -> SshSession:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def connect_when_ready(port: int, key_path: Path, *, user: str = "root", timeout_s: float = 120.0,
                       **kw: Any) -> SshSession:
    """Poll until sshd behind the forward accepts the key; report the last error on timeout.

    Until the guest's sshd listens, QEMU's forward accepts the TCP connection and then
    drops it, so "connected" proves nothing: only a completed authentication counts.
    """
    return wait_until(
        lambda: SshSession.connect(port, key_path, user=user, **kw),
        lambda session: True,
        what=f"sshd behind 127.0.0.1:{port} to accept the VM's key for {user}",
        timeout_s=timeout_s,
        interval_s=0.5,
        timeout_error=SutTimeout,  # the guest's sshd never took the key
    )
