"""VolumeStatus: the reference server's tree (sut.server.volume_status) from the storage's
status, the document's schema, and the framework's view of it (phd.VolumeStatus)."""

from __future__ import annotations

from typing import Any

import pytest

from phd import VolumeStatus
from phd.vm.conformance import ApiDocument, find_document
from sut.server.volume_status import volume_status

UP = "00000000-0000-0000-0000-00000000000a"


def _storage(activation: str, states: list[str], **region: Any) -> dict[str, Any]:
    """What CrucibleBackend.status() says: one region, three downstairs."""
    def one(i: int, state: str) -> dict[str, Any]:
        refused = state == "connecting"
        return {"target": f"127.0.0.1:{4000 + i}", "state": state, "failed_attempts": 3 if refused else 0,
                "last_error": "connection refused" if refused else None, "repairs_done": 0,
                "hash_mismatches": 0}

    downstairs = [one(i, state) for i, state in enumerate(states)]
    info = {"upstairs_id": UP, "session_id": UP, "generation": 2, "block_size": 512, "read_only": False,
            "encrypted": False, "activation": activation, "reconcile_in_progress": False,
            "live_repair_in_progress": False, "downstairs": downstairs, **region}
    return {"activation": activation, "error": None, "read_only_parent": False, "downstairs": downstairs,
            "regions": [info]}


def test_a_start_blocked_on_one_target_reads_as_such() -> None:
    status = VolumeStatus(volume_status(_storage("activating", ["connecting", "wait_quorum", "wait_quorum"])))
    assert (status.state, status.generation, status.active) == ("go_active", 2, False)
    first, second, _ = status.downstairs
    assert (first.target, first.kind, first.mode) == ("127.0.0.1:4000", "connecting", "new")
    assert first.detail["failed_attempts"] == 3 and first.state["state"] == "wait_connect"
    assert second.state == {"type": "connecting", "mode": "new", "state": "wait_quorum"}
    assert status.target("127.0.0.1:4001") == second and status.target("127.0.0.1:9") is None
    shown = repr(status)
    assert shown.startswith("VolumeStatus(volume go_active, generation 2; downstairs: 127.0.0.1:4000: "
                            "connecting/new/wait_connect, 3 failed connects, last error 'connection refused'")


def test_repairs_and_faults_map_to_the_documents_states() -> None:
    status = VolumeStatus(volume_status(_storage("active", ["active", "repairing", "offline"],
                                                 live_repair_in_progress=True)))
    assert [ds.kind for ds in status.downstairs] == ["active", "live_repair", "connecting"]
    assert status.downstairs[2].mode == "offline" and status.live_repair_in_progress
    reconciling = VolumeStatus(volume_status(_storage("activating", ["repairing", "wait_quorum", "faulted"],
                                                      reconcile_in_progress=True)))
    assert reconciling.downstairs[0].state == {"type": "connecting", "mode": "new", "state": "reconcile"}
    assert reconciling.downstairs[2].mode == "faulted" and reconciling.reconcile_in_progress
    assert "reconcile in progress" in str(reconciling)
    fenced = VolumeStatus(volume_status(_storage("failed", ["disabled"] * 3)))
    assert fenced.state == "disabled" and {ds.kind for ds in fenced.downstairs} == {"stopping"}


@pytest.mark.parametrize("states", [["connecting", "new", "negotiating"], ["active", "repairing", "offline"],
                                    ["faulted", "disabled", "wait_quorum"]])
def test_every_tree_conforms_to_the_document(states: list[str]) -> None:
    path = find_document()
    if path is None:
        pytest.skip("propolis-server's OpenAPI document is not here (see phd.vm.conformance.HOW_TO)")
    document = ApiDocument.load(path)
    for activation in ("inactive", "activating", "active", "failed", "closed"):
        tree = volume_status(_storage(activation, states))
        violations = document.response_violations("GET", "/instance/disk/d/status", 200,
                                                  "application/json", tree)
        assert violations == [], (activation, states, violations)
