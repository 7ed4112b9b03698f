"""The framework's request bodies against propolis-server 5.0.0's document, without a VM, and
the request log that checks (and records) every request a client sends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from phd.artifacts.store import GuestArtifact
from phd.core.errors import HarnessError
from phd.storage.crucible import CrucibleDisk
from phd.vm.conformance import HOW_TO, NO_BODY, ApiDocument, RequestLog, check_log, find_document
from phd.vm.server import ServerProcess
from phd.vm.testvm import FileDisk, TestVm, VmConfig


@pytest.fixture(scope="module")
def document() -> ApiDocument:
    path = find_document()
    if path is None:
        pytest.skip(HOW_TO)
    return ApiDocument.load(path)


def _vm(tmp_path: Path, ssh_port: int | None) -> TestVm:
    guest = GuestArtifact("debian", tmp_path / "vmlinuz", tmp_path / "initrd.img", "console=ttyS0",
                          "debian login: ", "root@debian:~# ", disk=tmp_path / "disk.raw", guest_os="debian")
    bootrom = tmp_path / "bios.bin"
    bootrom.write_bytes(b"")
    server = ServerProcess(["true"], 1, tmp_path / "run", None, bootrom=bootrom)
    return TestVm(VmConfig("vm", ssh_port=ssh_port), server, guest, tmp_path)


class _Crucible(CrucibleDisk):
    """A Crucible disk as far as the spec goes: its VCR (no downstairs)."""

    def __init__(self) -> None:
        self.name = "data"

    def vcr(self) -> dict[str, object]:
        return {"type": "volume", "id": "00000000-0000-0000-0000-000000000001", "block_size": 512,
                "sub_volumes": [], "read_only_parent": None}

    def attached_to(self, vm: object) -> None:
        pass


def test_the_ensure_body_of_every_kind_of_vm_conforms(document: ApiDocument, tmp_path: Path) -> None:
    vm = _vm(tmp_path, ssh_port=34567)
    vm.attach(FileDisk("vm.boot0", tmp_path / "boot.qcow2", "qcow2", 1 << 30), device="boot0")
    vm.attach(_Crucible(), device="data0")
    vm.attach(FileDisk("more", tmp_path / "more.raw", "raw", 1 << 30), device="data1", interface="nvme")
    body = {"properties": vm.properties(), "init": {"method": "Spec", "value": {"spec": vm.spec()}}}
    assert document.request_violations("PUT", "/instance", None, body) == []
    for requested in ("Run", "Stop", "Reboot"):
        assert document.request_violations("PUT", "/instance/state", None, requested) == []
    assert document.request_violations("GET", "/instance/state-monitor", None, {"gen": 3}) == []
    vcr = {"vcr_json": "{}"}
    assert document.request_violations("PUT", "/instance/disk/data0-backend/vcr", None, vcr) == []
    assert document.request_violations("GET", "/instance/serial", {"from_start": 0}) == []


def test_the_old_dialect_is_named_as_a_violation(document: ApiDocument) -> None:
    old = {"properties": {"id": "00000000-0000-0000-0000-000000000001", "name": "vm"},
           "spec": {"board": {"cpus": 1, "memory_mib": 64}, "boot": {"kernel": "/k"}}}
    problems = document.request_violations("PUT", "/instance", None, old)
    assert any('"init" is a required property' in p for p in problems), problems
    monitor = document.request_violations("GET", "/instance/state-monitor", {"gen": 1}, NO_BODY)
    assert monitor == ["query parameter 'gen' is not one of none",
                       "the operation requires a JSON body, none was sent"]
    assert document.request_violations("DELETE", "/instance", None) == [
        "DELETE /instance: no such operation in propolis-server 5.0.0"]


def test_answers_are_checked_too(document: ApiDocument) -> None:
    error = {"message": "no instance", "request_id": "abc", "error_code": "NoInstance"}
    answer = document.response_violations
    assert answer("GET", "/instance", 404, "application/json", error) == []
    assert answer("GET", "/instance", 404, "application/json", {"error": "x"}) != []
    assert answer("PUT", "/instance/disk/d/vcr", 200, "application/json", "started") == []
    assert answer("PUT", "/instance/disk/d/vcr", 200, "application/json", "Started") != []


def test_the_request_log_records_and_refuses_with_the_operation(tmp_path: Path) -> None:
    document = ApiDocument({"info": {"version": "9.9.9"}, "paths": {"/thing/{id}": {"put": {
        "operationId": "thing_put", "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}}}}}}}})
    log = RequestLog(document, tmp_path / "requests.jsonl")
    log.sent("PUT", "/thing/7", None, {"n": 1})
    refused = r"9\.9\.9 does not allow: PUT /thing/\{id\} \(thing_put\): body n"
    with pytest.raises(HarnessError, match=refused):
        log.sent("PUT", "/thing/7", None, {"n": "one"})
    records = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert records == [{"method": "PUT", "path": "/thing/7", "query": {}, "body": {"n": 1}},
                       {"method": "PUT", "path": "/thing/7", "query": {}, "body": {"n": "one"}}]
    # Without a document nothing is checked (and the suite runs as before).
    RequestLog(None).sent("PUT", "/thing/7", None, {"n": "one"})


def _thing_document() -> ApiDocument:
    return ApiDocument({"info": {"version": "9.9.9"}, "paths": {"/thing/{id}": {"put": {
        "operationId": "thing_put", "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}}}}}}}})


def test_a_log_check_counts_operations_and_names_violations_and_torn_lines() -> None:
    lines = [json.dumps({"method": "PUT", "path": "/thing/1", "query": {}, "body": {"n": 1}}),
             json.dumps({"method": "PUT", "path": "/thing/2", "query": {}, "body": {"n": "two"}}),
             json.dumps({"method": "GET", "path": "/nowhere", "query": {}}),
             "",
             '{"method": "PUT", "pa',  # torn
             json.dumps([1, 2]),  # not a record
             json.dumps({"method": "PUT", "path": "/thing/3", "query": "x=1"}),  # query not an object
             json.dumps({"method": "PUT", "path": "/thing/4", "query": {}, "body": {"n": 10**40}})]
    found = check_log(_thing_document(), iter(lines))
    assert found.requests == 4
    assert found.per_operation == {"thing_put": 3, "GET /nowhere": 1}
    assert [v.split(":")[0] for v in found.violations] == ["PUT /thing/{id} (thing_put)", "GET /nowhere"]
    assert [u.split(":")[0] for u in found.unreadable] == ["line 5", "line 6", "line 7"]
    assert found.missing({"thing_put", "thing_get"}) == ["thing_get"]


def test_processes_appending_to_one_log_never_tear_a_line(tmp_path: Path) -> None:
    # xdist workers of one stage share the log: each record is one O_APPEND write.
    log = tmp_path / "requests.jsonl"
    script = ("import sys; from pathlib import Path; from phd.vm.conformance import RequestLog\n"
              "r = RequestLog(None, Path(sys.argv[1]))\n"
              "for i in range(300):\n"
              "    r.sent('PUT', f'/thing/{i}', None, {'n': i, 'pad': sys.argv[2] * 3000})\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(log), c]) for c in "abc"]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    found = check_log(_thing_document(), iter(log.read_text().splitlines()))
    assert found.unreadable == [] and found.requests == 900 and found.violations == []


def test_the_conformance_stage_fails_on_a_violation_a_missing_operation_or_no_log(
        tmp_path: Path, document: ApiDocument, capsys: pytest.CaptureFixture[str]) -> None:
    from ci.conformance import SUITE_OPERATIONS, main

    assert main([str(tmp_path / "absent.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().out
    log = tmp_path / "requests.jsonl"
    ensure = {"method": "PUT", "path": "/instance", "query": {}, "body": {"bogus": 1}}
    log.write_text(json.dumps(ensure) + "\n")
    assert main([str(log), "--partial"]) == 1
    out = capsys.readouterr().out
    assert "2 violations of the document" in out and "init" in out and "instance_ensure" in out
    log.write_text(json.dumps({"method": "GET", "path": "/instance/state-monitor", "query": {},
                               "body": {"gen": 0}}) + "\n")
    assert main([str(log), "--partial"]) == 0
    assert main([str(log)]) == 1
    out = capsys.readouterr().out
    assert "the suite never sent" in out
    assert all(op in out for op in SUITE_OPERATIONS - {"instance_state_monitor"})
