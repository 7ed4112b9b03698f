"""The server's ``--forward`` option: a loopback TCP port forwarded to the guest.

Its own module, standard library only, because cli.py parses it before anything heavy is
imported (serving.py); qemu.py writes it into the user-mode NIC's ``hostfwd``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["HostForward"]


@dataclass(frozen=True)
class HostForward:
    """A TCP port of the host (loopback) forwarded to the guest: the server's ``--forward``."""

    host_addr: str
    host_port: int
    guest_port: int

    @classmethod
    def parse(cls, text: str) -> HostForward:
        """``127.0.0.1:HOST_PORT:GUEST_PORT``; the host address must be IPv4 loopback."""
        parts = text.split(":")
        ok = len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit()
        if ok:
            try:
                addr = ipaddress.ip_address(parts[0])
                ok = addr.version == 4 and addr.is_loopback
            except ValueError:
                ok = False
        if not ok or not (0 < int(parts[1]) < 65536 and 0 < int(parts[2]) < 65536):
            raise ValueError(f"expected 127.x.y.z:HOST_PORT:GUEST_PORT (host forwards bind loopback only), "
                             f"got {text!r}")
        return cls(parts[0], int(parts[1]), int(parts[2]))
