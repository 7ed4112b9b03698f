"""What a guest command's exit status must be: the one vocabulary of console and SSH commands.

PHD chains `.check_err()` / `.ignore_status()` on a command; here the same names are values
passed as `check=`, e.g. `vm.run_shell_command("false", check=check_err)`. The default,
`check_ok`, makes any non-zero status fail the test with the command's output.
"""

from __future__ import annotations

import enum

__all__ = ["StatusCheck", "check_err", "check_ok", "ignore_status", "status_check"]


class StatusCheck(enum.Enum):
    OK = "check_ok"  # the status must be 0
    ERR = "check_err"  # the status must be non-zero
    IGNORE = "ignore_status"  # any status; the caller reads result.status

    def violated_by(self, status: int) -> str | None:
        """What the status should have been, when `status` breaks this expectation."""
        if self is StatusCheck.OK and status != 0:
            return "0"
        if self is StatusCheck.ERR and status == 0:
            return "non-zero"
        return None


check_ok = StatusCheck.OK
check_err = StatusCheck.ERR
ignore_status = StatusCheck.IGNORE


def status_check(value: object) -> StatusCheck:
    """`check=` takes a StatusCheck only (check_ok, check_err, ignore_status from phd); a
    string or anything else is a TypeError that names the enum and its values."""
    if isinstance(value, StatusCheck):
        return value
    names = ", ".join(f"phd.{member.value}" for member in StatusCheck)
    raise TypeError(f"check={value!r} is not a phd.StatusCheck; pass one of {names}")
