"""The real server process over real HTTP (no guest boots in these tests)."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .conftest import ServerProcess, qemu_pids_for, start_server

pytestmark = pytest.mark.integration


def ensure_body(kernel: Path, disk: Path | None = None) -> dict[str, object]:
    spec: dict[str, object] = {
        "board": {"cpus": 1, "memory_mib": 128},
        "boot": {"kernel": str(kernel), "cmdline": "console=ttyS0"},
    }
    if disk is not None:
        spec["disks"] = {"d0": {"interface": "virtio", "backend": {"type": "file", "path": str(disk)}}}
    return {"properties": {"id": str(uuid.uuid4()), "name": "t"}, "spec": spec}


@pytest.fixture
def some_file(tmp_path: Path) -> Path:
    path = tmp_path / "kernel-stand-in"
    path.write_bytes(b"\0" * 512)
    return path


def test_openapi_document_lists_contract_paths(server: ServerProcess) -> None:
    with server.client() as http:
        doc = http.get("/openapi.json").json()
    for path in (
        "/instance",
        "/instance/state",
        "/instance/state-monitor",
        "/instance/serial/history",
        "/instance/disk/{backend_id}/vcr",
        "/instance/disk/{backend_id}/status",
    ):
        assert path in doc["paths"], path


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"{not json", "json"),
        (b'{"properties": {"name": "x"}}', "spec"),
        (b'{"properties": {"id": "nope", "name": "x"}, "spec": {"boot": {"kernel": "/k"}}}', "id"),
    ],
    ids=["invalid-json", "missing-spec", "bad-uuid"],
)
def test_malformed_ensure_is_400_json(server: ServerProcess, content: bytes, needle: str) -> None:
    with server.client() as http:
        response = http.put("/instance", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "BadRequest"
    assert needle in body["message"].lower()


def test_missing_kernel_path_names_the_field(server: ServerProcess, tmp_path: Path) -> None:
    with server.client() as http:
        response = http.put("/instance", json=ensure_body(tmp_path / "no-such-vmlinuz"))
    assert response.status_code == 400
    message = response.json()["message"]
    assert "boot" in message and "kernel" in message and "no-such-vmlinuz" in message


def test_non_loopback_forward_is_rejected(server: ServerProcess, some_file: Path) -> None:
    body = ensure_body(some_file)
    body["spec"]["nics"] = {  # type: ignore[index]
        "net0": {"type": "user", "forwards": [{"host": "0.0.0.0:2222", "guest_port": 22}]}
    }
    with server.client() as http:
        response = http.put("/instance", json=body)
    assert response.status_code == 400
    assert "127.0.0.0/8" in response.json()["message"]


def test_lifecycle_without_qemu_and_424_after_destroyed(server: ServerProcess, some_file: Path) -> None:
    with server.client() as http:
        assert http.get("/instance").status_code == 404
        assert http.get("/instance").json()["error"] == "NoInstance"
        created = http.put("/instance", json=ensure_body(some_file))
        assert created.status_code == 201
        assert created.json()["instance"]["state"] == "Creating"
        again = http.put("/instance", json=ensure_body(some_file))
        assert again.status_code == 409
        bad_state = http.put("/instance/state", json="Jump")
        assert bad_state.status_code == 400
        reboot = http.put("/instance/state", json="Reboot")
        assert reboot.status_code == 403
        assert "not been started" in reboot.json()["message"]
        # Stop while Creating: Stopped then Destroyed, no QEMU ever started.
        assert http.put("/instance/state", json="Stop").status_code == 204
        final = http.get("/instance/state-monitor", params={"gen": 3}).json()
        assert final == {"gen": 3, "state": "Destroyed"}
        for requested in ("Run", "Stop", "Reboot"):
            response = http.put("/instance/state", json=requested)
            assert response.status_code == 424, requested
            assert response.json()["error"] == "NoLiveInstance"
        vcr = http.put("/instance/disk/d0-backend/vcr", json={"vcr_json": "{}"})
        assert vcr.status_code == 404
        malformed_vcr = http.put("/instance/disk/d0-backend/vcr", json={"vcr": 1})
        assert malformed_vcr.status_code == 400
    assert qemu_pids_for(server.data_dir) == []


def test_sigint_is_ignored_and_sigterm_exits_zero(server: ServerProcess) -> None:
    server.proc.send_signal(signal.SIGINT)
    with server.client() as http:
        assert http.get("/openapi.json").status_code == 200
    assert server.stop() == 0
    assert any(line.get("msg") == "server stopped" for line in server.log_lines())


def test_unknown_regression_exits_2_listing_valid_names(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sut.server", "--data-dir", str(tmp_path), "--regression", "nope"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "nope" in result.stderr
    for name in ("blocking-start", "vcr-denied-while-starting", "no-generation-fence"):
        assert name in result.stderr


def test_valid_regressions_are_accepted(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--regression", "blocking-start", "--regression", "multi-target-replace")
    try:
        started = [line for line in srv.log_lines() if line.get("msg") == "server starting"]
        assert started[0]["regressions"] == ["blocking-start", "multi-target-replace"]
    finally:
        assert srv.close() == 0
