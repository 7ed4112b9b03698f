"""A Crucible backend's status as propolis-server 5.0.0's ``VolumeStatus`` tree.

``{"volume_info": {"volume": {"sub_volumes": [{"upstairs": {...}}, ...],
"read_only_parent": ...}}}``: one upstairs per region (its ids, generation, whether a
reconciliation or a live repair is in progress, its state) and, under ``targets``, one
``DownstairsInfo`` per downstairs with the document's state: ``{"type": "active"}``,
``{"type": "live_repair"}``, ``{"type": "stopping"}`` or ``{"type": "connecting", "mode":
new|offline|faulted|replaced, "state": wait_connect|negotiating|wait_quorum|reconcile|
live_repair_ready}``.

The document leaves ``DownstairsInfo`` and the upstairs object open, so each also carries
what this storage knows beyond it, under the names it has always had: a downstairs'
``target`` and ``state`` as the storage names them (``"phd"`` object: connection attempts,
last error, backlog, replayed jobs, hash mismatches, ...), an upstairs' ``activation`` and
last ``error``. A read-only parent that is a file (not a volume) has no VolumeInfo of its
own: ``read_only_parent`` is null, and ``phd.read_only_parent`` says whether there is one.
"""

from __future__ import annotations

from typing import Any

__all__ = ["downstairs_info", "upstairs_state", "volume_status"]

_UPSTAIRS_STATE = {
    "inactive": "initializing",
    "activating": "go_active",
    "active": "active",
    "failed": "disabled",
    "closed": "disabled",
}


def upstairs_state(activation: str) -> str:
    return _UPSTAIRS_STATE.get(activation, "initializing")


def _status(state: str, activation: str) -> dict[str, str]:
    if state == "active":
        return {"type": "active"}
    if state == "repairing":
        # During activation a copy that missed writes is reconciled; afterwards it is live-repaired.
        if activation == "activating":
            return {"type": "connecting", "mode": "new", "state": "reconcile"}
        return {"type": "live_repair"}
    if state == "disabled":
        return {"type": "stopping"}
    mode = state if state in ("offline", "faulted") else "new"
    negotiation = {"negotiating": "negotiating", "wait_quorum": "wait_quorum"}.get(state, "wait_connect")
    return {"type": "connecting", "mode": mode, "state": negotiation}


def downstairs_info(ds: dict[str, Any], activation: str) -> dict[str, Any]:
    target = ds.get("target")
    extra = {key: value for key, value in ds.items() if key not in ("target", "state")}
    return {
        "state": _status(str(ds.get("state")), activation),
        "target_addr": target,
        # The repair port is the downstairs port + 4000 (Crucible's convention, ours too).
        "repair_addr": _repair_addr(target),
        "region_id": None,
        "target": target,
        "phd": {"state": ds.get("state"), **extra},
    }


def _repair_addr(target: object) -> str | None:
    if not isinstance(target, str) or ":" not in target:
        return None
    host, _, port = target.rpartition(":")
    return f"{host}:{int(port) + 4000}" if port.isdigit() and int(port) + 4000 < 65536 else None


def volume_status(status: dict[str, Any]) -> dict[str, object]:
    """``status``: the storage's (``CrucibleBackend.status()``, with its ``regions``)."""
    sub_volumes = []
    for region in status.get("regions", []):
        activation = str(region["activation"])
        sub_volumes.append({"upstairs": {
            "upstairs_id": region["upstairs_id"],
            "session_id": region["session_id"],
            "generation": region["generation"],
            "block_size": region["block_size"],
            "read_only": region["read_only"],
            "encrypted": region["encrypted"],
            "state": upstairs_state(activation),
            "reconcile_in_progress": region["reconcile_in_progress"],
            "live_repair_in_progress": region["live_repair_in_progress"],
            "targets": [downstairs_info(ds, activation) for ds in region["downstairs"]],
            "activation": activation,
        }})
    return {"volume_info": {"volume": {
        "sub_volumes": sub_volumes,
        "read_only_parent": None,
        "phd": {"activation": status.get("activation"), "error": status.get("error"),
                "read_only_parent": bool(status.get("read_only_parent"))},
    }}}
