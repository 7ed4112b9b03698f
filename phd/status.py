"""What a guest command's exit status must be: the one vocabulary of console and SSH commands.

PHD chains `.check_err()` / `.ignore_status()` on a command; here the same names are values
passed as `check=`, e.g. `vm.run_shell_command("false", check=check_err)`. The default,
`check_ok`, makes any non-zero status fail the test with the command's output.
"""

from __future__ import annotations

import enum

from phd.errors import HarnessError

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


def status_check(value: StatusCheck | str) -> StatusCheck:
    """Accept the enum or its name as text ("check_err"); anything else is a clear error."""
    if isinstance(value, StatusCheck):
        return value
    try:
        return StatusCheck(value)
    except ValueError:
        names = ", ".join(member.value for member in StatusCheck)
        raise HarnessError(f"check={value!r} is not an exit-status expectation; use one of "
                           f"{names} (phd.check_ok, ...)") from None
