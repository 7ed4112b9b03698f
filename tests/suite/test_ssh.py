"""SSH into guests with sshd: exact status/stdout/stderr, SFTP both ways, and proof that the
forward reaches THIS VM (a token written on its serial console is read back over SSH)."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import pytest

from phd import InstanceState, VmFactory, check_err, ignore_status
from phd.vm.ssh import SshCommandError

pytestmark = [pytest.mark.vm]


def test_ssh_commands_and_file_round_trip(vm_factory: VmFactory, phd_guest: str, tmp_path: Path) -> None:
    # By default a VM gets the SSH forward exactly when its guest runs sshd.
    vm = vm_factory.new_vm("ssh", guest=phd_guest)
    if not vm.supports_ssh:
        pytest.skip(f"guest {phd_guest} runs no sshd (its adapter says has_sshd = False); "
                    "SSH is tested on guests that do, e.g. --phd-guests debian")
    vm.launch()
    vm.wait_for_state(InstanceState.RUNNING, timeout_s=30.0)
    vm.wait_to_boot()
    token = secrets.token_hex(8)
    vm.run_shell_command(f"echo {token} > /root/phd-token")

    ssh = vm.ssh()
    # The forward leads to this VM, not to another test's VM on a neighbouring port.
    assert ssh.run("cat /root/phd-token").stdout == f"{token}\n"

    result = ssh.run("printf 'out\\n  two'; printf 'err\\n' >&2; exit 3", check=ignore_status)
    assert (result.status, result.stdout, result.stderr) == (3, "out\n  two", "err\n")
    assert ssh.run("true").status == 0
    with pytest.raises(SshCommandError, match="exited 1"):
        ssh.run("false")
    assert ssh.run("exit 5", check=check_err).status == 5
    # More output than one SSH window (2 MiB) on both streams at once must not deadlock.
    big = ssh.run("head -c 3000000 /dev/zero | tr '\\0' a; head -c 3000000 /dev/zero | tr '\\0' b >&2")
    assert (len(big.stdout), len(big.stderr)) == (3_000_000, 3_000_000)
    assert set(big.stdout) == {"a"} and set(big.stderr) == {"b"}

    # SFTP: put, checked inside the guest, then get back byte for byte.
    payload = os.urandom(1 << 20) + b"\x00\xff\r\n"
    local = tmp_path / "payload.bin"
    local.write_bytes(payload)
    ssh.put(local, "/root/payload.bin")
    digest = ssh.run("sha256sum /root/payload.bin").stdout.split()[0]
    assert digest == hashlib.sha256(payload).hexdigest()
    back = tmp_path / "back.bin"
    ssh.get("/root/payload.bin", back)
    assert back.read_bytes() == payload

    # The session is reused, and the console still works alongside it.
    assert vm.ssh() is ssh
    assert vm.run_shell_command("cat /root/phd-token").output == token
