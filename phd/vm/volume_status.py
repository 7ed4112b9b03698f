"""A Crucible disk's status as the server reports it: propolis-server 5.0.0's VolumeStatus.

``GET /instance/disk/{id}/status`` answers a tree, ``{"volume_info": {"volume": {"sub_volumes":
[{"upstairs": {...}}], "read_only_parent": ...}}}``, one upstairs per region with its
generation, state, whether a reconciliation or a live repair is in progress and, under
``targets``, one entry per downstairs whose ``state`` is the document's tagged status
(``{"type": "active"}``, ``{"type": "connecting", "mode": "offline", "state":
"wait_connect"}``, ...). :class:`VolumeStatus` reads that tree for a test: the figures a
test asserts on, and a one-line summary for failure messages. Whatever a server adds beyond
the document (the reference server's ``phd`` objects: connection attempts, last error, hash
mismatches) is in :attr:`DownstairsStatus.detail`; a server that adds nothing leaves it empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DownstairsStatus", "VolumeStatus"]


@dataclass(frozen=True)
class DownstairsStatus:
    target: str | None
    # The document's DownstairsInfoStatus: {"type": ...} (+ "mode" and "state" when connecting).
    state: dict[str, str]
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``active``, ``live_repair``, ``stopping`` or ``connecting``."""
        return self.state.get("type", "?")

    @property
    def mode(self) -> str | None:
        """While connecting: ``new``, ``offline``, ``faulted`` or ``replaced``."""
        return self.state.get("mode")

    @property
    def active(self) -> bool:
        return self.kind == "active"

    def describe(self) -> str:
        parts = [self.kind] + [self.state[k] for k in ("mode", "state") if k in self.state]
        text = f"{self.target}: {'/'.join(parts)}"
        failed, error = self.detail.get("failed_attempts"), self.detail.get("last_error")
        if failed:
            text += f", {failed} failed connects"
        if error:
            text += f", last error {str(error)[:120]!r}"
        return text


@dataclass(frozen=True, repr=False)
class VolumeStatus:
    tree: dict[str, Any]

    def __repr__(self) -> str:
        # What a wait's "last seen" and a failure message show: the summary, not the tree.
        return f"VolumeStatus({self})"

    @property
    def upstairs(self) -> list[dict[str, Any]]:
        """Every upstairs of the volume (one per region), depth first."""
        found: list[dict[str, Any]] = []

        def walk(info: Any) -> None:
            if not isinstance(info, dict):
                return
            if "upstairs" in info:
                found.append(info["upstairs"])
            volume = info.get("volume")
            if isinstance(volume, dict):
                for sub in volume.get("sub_volumes", []):
                    walk(sub)
                walk(volume.get("read_only_parent"))

        walk(self.tree.get("volume_info"))
        return found

    @property
    def generation(self) -> int:
        return max((int(up["generation"]) for up in self.upstairs), default=0)

    @property
    def state(self) -> str:
        """The upstairs state (``initializing``, ``go_active``, ``active``, ...); with several
        regions, the first one that is not active, else ``active``."""
        states = [str(up.get("state")) for up in self.upstairs]
        return next((s for s in states if s != "active"), "active" if states else "unknown")

    @property
    def active(self) -> bool:
        return self.state == "active"

    @property
    def reconcile_in_progress(self) -> bool:
        return any(bool(up.get("reconcile_in_progress")) for up in self.upstairs)

    @property
    def live_repair_in_progress(self) -> bool:
        return any(bool(up.get("live_repair_in_progress")) for up in self.upstairs)

    @property
    def downstairs(self) -> list[DownstairsStatus]:
        out = []
        for up in self.upstairs:
            for ds in up.get("targets", []):
                detail = ds.get("phd") if isinstance(ds.get("phd"), dict) else {}
                out.append(DownstairsStatus(ds.get("target_addr"), dict(ds.get("state", {})), detail))
        return out

    def target(self, address: str) -> DownstairsStatus | None:
        return next((ds for ds in self.downstairs if ds.target == address), None)

    def __str__(self) -> str:
        flags = [name for name, on in (("reconcile", self.reconcile_in_progress),
                                       ("live repair", self.live_repair_in_progress)) if on]
        head = f"volume {self.state}, generation {self.generation}"
        if flags:
            head += f", {' and '.join(flags)} in progress"
        return head + "; downstairs: " + "; ".join(ds.describe() for ds in self.downstairs)
