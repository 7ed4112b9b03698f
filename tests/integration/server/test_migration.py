"""Live migration between two real servers, each with its own QEMU, over loopback.

The raw v5 API: the target's ``PUT /instance`` with a MigrationTarget init, the migration
status of both sides, the states each ends in, and the guest (the tiny one) checked on the
target through its serial console.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from phd.artifacts.store import GuestArtifact
from phd.vm.guest import TinyGuest
from phd.vm.serial import SerialConsole
from tests import v5

from .conftest import ServerProcess, serving
from .console import open_guest, serial_url, tiny_args, wait_for_state

pytestmark = [pytest.mark.integration, pytest.mark.vm]

MIGRATE_DEADLINE_S = 180.0


def injector(fail_exports: int = 0, fail_imports: int = 0) -> dict[str, Any]:
    return {"inject": {"type": "migration_failure_injector",
                       "component": {"fail_exports": fail_exports, "fail_imports": fail_imports}}}


def target_body(source: ServerProcess, migration_id: str,
                replace: dict[str, Any] | None = None) -> dict[str, Any]:
    init = {"migration_id": migration_id, "src_addr": source.base_url.removeprefix("http://"),
            "replace_components": replace or {}}
    return {"properties": v5.properties("target"), "init": {"method": "MigrationTarget", "value": init}}


@pytest.fixture
def servers(tmp_path: Path, tiny: GuestArtifact) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with serving(tmp_path / "a", *tiny_args(tiny)) as a, serving(tmp_path / "b", *tiny_args(tiny)) as b:
        yield a, b


def boot_source(http: httpx.Client, base_url: str, spec_extra: dict[str, Any] | None = None) -> TinyGuest:
    spec = v5.spec(v5.serial(), *([spec_extra] if spec_extra else []), memory_mb=256)
    assert http.put("/instance", json=v5.ensure(spec, name="source")).status_code == 201
    assert http.put("/instance/state", json="Run").status_code == 204
    wait_for_state(http, "Running")
    guest = open_guest(base_url)
    guest.login()
    return guest


def wait_migration(http: httpx.Client, direction: str, wanted: set[str],
                   timeout_s: float = MIGRATE_DEADLINE_S) -> dict[str, Any]:
    """Poll GET /instance/migration-status until ``migration_<direction>`` is in ``wanted``."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = http.get("/instance/migration-status").json()
        record = last.get(f"migration_{direction}")
        if record is not None and record["state"] in wanted:
            return last
        time.sleep(0.1)  # a poll interval, not synchronisation: the condition is checked above
    raise AssertionError(f"migration_{direction} never reached {wanted}; last status {last}")


def test_migration_moves_the_running_guest(servers: tuple[ServerProcess, ServerProcess]) -> None:
    source, target = servers
    with source.client(timeout=30) as src, target.client(timeout=60) as dst:
        guest = boot_source(src, source.base_url)
        guest.run("echo kept-in-ram > /tmp/marker")
        # A counter that runs through the migration: its value can only grow. Each value is
        # renamed into place: `echo > /tmp/count` truncates first, so a read could see "".
        guest.run("echo 0 > /tmp/count; (i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; "
                  "mv /tmp/count.new /tmp/count; sleep 0.2; done) &")
        before = int(guest.run("cat /tmp/count").output)
        history_before = src.get("/instance/serial/history", params={"from_start": 0}).json()
        guest.console.close()

        migration_id = str(uuid.uuid4())
        answer = dst.put("/instance", json=target_body(source, migration_id))
        assert answer.status_code == 201, answer.text
        assert answer.json() == {"migrate": {"migration_id": migration_id}}
        status = wait_migration(dst, "in", {"Finish", "Error"})
        assert status["migration_in"] == {"id": migration_id, "state": "Finish"}, status
        wait_for_state(dst, "Running", timeout_s=30)
        # The source let go of the guest: Destroyed, its migration out finished.
        wait_for_state(src, "Destroyed", timeout_s=60)
        assert src.get("/instance/migration-status").json()["migration_out"] == {
            "id": migration_id, "state": "Finish"}

        # The target's serial history begins with the source's, offsets and all.
        history_after = dst.get("/instance/serial/history", params={"from_start": 0}).json()
        assert history_after["data"][:len(history_before["data"])] == history_before["data"]
        assert history_after["last_byte_offset"] >= history_before["last_byte_offset"]

        offset = history_after["last_byte_offset"]
        console = SerialConsole(serial_url(target.base_url, f"from_start={offset}"))
        console.connect()
        moved = TinyGuest(console)
        try:
            assert moved.run("cat /tmp/marker").output == "kept-in-ram"
            first = int(moved.run("cat /tmp/count").output)
            assert first >= before
            deadline = time.monotonic() + 30
            while int(moved.run("cat /tmp/count").output) <= first:
                assert time.monotonic() < deadline, "the guest's counter stopped after the migration"
        finally:
            console.close()


@pytest.mark.parametrize("side", ["import", "export"])
def test_failed_migration_leaves_the_source_running(
        servers: tuple[ServerProcess, ServerProcess], side: str) -> None:
    source, target = servers
    with source.client(timeout=30) as src, target.client(timeout=60) as dst:
        # The source has the injector so a target can replace it (as in Propolis).
        guest = boot_source(src, source.base_url, injector(fail_exports=1 if side == "export" else 0))
        guest.run("echo still-here > /tmp/marker")
        replace = {"inject": {"component": "MigrationFailureInjector",
                              "spec": {"fail_exports": 0, "fail_imports": 1 if side == "import" else 0}}}
        migration_id = str(uuid.uuid4())
        answer = dst.put("/instance", json=target_body(source, migration_id, replace))
        assert answer.status_code == 201, answer.text
        status = wait_migration(dst, "in", {"Finish", "Error"})
        assert status["migration_in"]["state"] == "Error", status
        wait_for_state(dst, "Failed", timeout_s=60)
        out = wait_migration(src, "out", {"Finish", "Error"})["migration_out"]
        assert out == {"id": migration_id, "state": "Error"}
        wait_for_state(src, "Running", timeout_s=30)
        assert guest.run("cat /tmp/marker").output == "still-here"
        guest.console.close()


def test_target_with_unreachable_source_is_refused(servers: tuple[ServerProcess, ServerProcess]) -> None:
    source, target = servers
    with target.client(timeout=60) as dst:
        # The source server has no instance: it refuses the upgrade.
        answer = dst.put("/instance", json=target_body(source, str(uuid.uuid4())))
        assert answer.status_code == 400, answer.text
        assert answer.json()["error_code"] == "MigrationSyncFailed"
        body = target_body(source, str(uuid.uuid4()))
        body["init"]["value"]["src_addr"] = "localhost:1"
        answer = dst.put("/instance", json=body)
        assert answer.status_code == 400, answer.text
        assert "src_addr" in answer.json()["message"]


def test_a_source_that_cannot_migrate_refuses_the_target(
        servers: tuple[ServerProcess, ServerProcess]) -> None:
    """A source whose instance never ran has nothing to migrate: the target's ensure is 400
    naming why, nothing is created on the target, and the source is untouched."""
    source, target = servers
    with source.client(timeout=30) as src, target.client(timeout=60) as dst:
        spec = v5.spec(v5.serial(), memory_mb=128)
        assert src.put("/instance", json=v5.ensure(spec, name="source")).status_code == 201
        answer = dst.put("/instance", json=target_body(source, str(uuid.uuid4())))
        assert answer.status_code == 400, answer.text
        body = answer.json()
        assert body["error_code"] == "MigrationSyncFailed" and "has not been started" in body["message"], body
        assert dst.get("/instance").status_code == 404
        assert src.get("/instance").json()["instance"]["state"] == "Creating"
        assert src.get("/instance/migration-status").json() == {"migration_in": None, "migration_out": None}
        # A plain GET of the websocket route is refused with the reason.
        plain = src.get(f"/instance/migrate/{uuid.uuid4()}/start")
        assert plain.status_code == 400 and plain.json()["error_code"] == "WebsocketRequired"
