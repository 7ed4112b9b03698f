"""The real server process over real HTTP (no guest boots in these tests)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from phd.vm.client import InstanceState, ServerClient
from sut.server.cli import build_parser
from tests import v5

from .conftest import ServerProcess, qemu_pids_for, start_server

pytestmark = pytest.mark.integration


def ensure_body(disk: Path | None = None) -> dict[str, Any]:
    """A v5 ensure body: com1, and a file disk d0 (backend d0-backend) when given."""
    spec = v5.spec(v5.serial(), v5.disk("d0", v5.file_backend(disk)) if disk is not None else {})
    return v5.ensure(spec, name="t")


JSON = "application/json"
MONITOR = "/instance/state-monitor"
HISTORY = "/instance/serial/history"


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
        "/instance/disk/{id}/vcr",
        "/instance/disk/{id}/status",
        "/instance/spec",
        "/instance/nmi",
        "/instance/migration-status",
    ):
        assert path in doc["paths"], path


@pytest.mark.parametrize(
    ("content", "content_type", "needles"),
    [
        pytest.param(
            b"{not json", JSON, ["body: not valid json", "(char 1)", "property name"], id="invalid-json"
        ),
        pytest.param(b'{"properties": {"name": "x"}}', JSON, ["init: field required"], id="missing-init"),
        pytest.param(
            b'{"properties": {"id": "nope", "name": "x", "description": "", "metadata": {}},'
            b' "init": {"method": "Spec", "value": {"spec": {}}}}',
            JSON,
            ["properties.id:", "uuid", "(got 'nope')"],
            id="bad-uuid",
        ),
        pytest.param(
            b'{"properties": {}}', "text/plain", ["content-type: application/json", "text/plain"],
            id="wrong-content-type",
        ),
        pytest.param(
            b'{"properties": {}}', None, ["content-type: application/json", "no content-type"],
            id="no-content-type",
        ),
        pytest.param(b"", JSON, ["body: a json body is required"], id="empty"),
        pytest.param(b"[1, 2]", JSON, ["body:", "valid dictionary", "got a json array"], id="array"),
    ],
)
def test_malformed_ensure_is_400_json(
    server: ServerProcess, content: bytes, content_type: str | None, needles: list[str]
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    with server.client() as http:
        response = http.put("/instance", content=content, headers=headers)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error_code"] == "BadRequest"
    for needle in needles:
        assert needle in body["message"].lower(), (needle, body["message"])


def _valid_body(disk: Path) -> dict[str, Any]:
    return ensure_body(disk)


def _spec(body: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = body["init"]["value"]["spec"]
    return spec


@pytest.mark.parametrize(
    ("mutate", "needles"),
    [
        pytest.param(
            lambda b: _spec(b)["board"].update(cpus=10**19),
            ["spec.board.cpus:", "less than or equal to 32"],
            id="huge",
        ),
        pytest.param(
            lambda b: _spec(b)["board"].update(memory_mb=-1),
            ["spec.board.memory_mb:", "greater than", "-1"],
            id="negative",
        ),
        pytest.param(
            lambda b: _spec(b)["board"].update(cpus=1.5), ["spec.board.cpus:", "integer", "1.5"], id="float"
        ),
        pytest.param(
            lambda b: _spec(b)["board"].update(turbo=True),
            ["spec.board.turbo: extra inputs are not permitted"],
            id="unknown-board",
        ),
        pytest.param(
            lambda b: _spec(b)["components"]["d0-backend"]["component"].update(cache="none"),
            ["d0-backend", "cache: extra inputs are not permitted"],
            id="unknown-backend-field",
        ),
        pytest.param(
            lambda b: _spec(b)["components"]["d0-backend"]["component"].update(path="disk.img"),
            ["d0-backend", "must be absolute"],
            id="relative-path",
        ),
        pytest.param(
            lambda b: _spec(b)["components"].update({"../x": _spec(b)["components"]["com1"]}),
            ["invalid component key"],
            id="traversal-name",
        ),
        pytest.param(
            lambda b: b["init"].update(method="MigrationTarget", value={
                "migration_id": str(uuid.uuid4()), "src_addr": "127.0.0.1:1",
                "replace_components": {"d0-backend": {"component": "Bogus", "spec": {}}}}),
            ["replace_components", "bogus"],
            id="migration-target-bad-replacement",
        ),
        pytest.param(
            # Nothing listens on port 1: the source cannot be reached, so nothing is created.
            lambda b: b["init"].update(method="MigrationTarget", value={
                "migration_id": str(uuid.uuid4()), "replace_components": {}, "src_addr": "127.0.0.1:1"}),
            ["127.0.0.1:1"],
            id="migration-target-unreachable-source",
        ),
    ],
)
def test_spec_errors_name_field_and_reason(
    server: ServerProcess, some_file: Path, mutate: Callable[[dict[str, Any]], None], needles: list[str]
) -> None:
    body = _valid_body(some_file)
    mutate(body)
    with server.client() as http:
        response = http.put("/instance", json=body)
        assert response.status_code == 400, response.text
        message = response.json()["message"].lower()
        for needle in needles:
            assert needle in message, (needle, message)
        # Control: the same body without the mutation is accepted.
        assert http.put("/instance", json=_valid_body(some_file)).status_code == 201


def _raw_body(disk: str, properties_extra: str = "") -> bytes:
    # Raw text: these bodies hold what a JSON encoder refuses to write (lone surrogates,
    # Infinity) but a JSON decoder accepts.
    properties = (f'{{"id": "{uuid.uuid4()}", "name": "t", "description": "d"{properties_extra}, '
                  f'"metadata": {json.dumps(v5.properties()["metadata"])}}}')
    spec = json.dumps(v5.spec(v5.disk("d0", v5.file_backend("@DISK@")))).replace("@DISK@", disk)
    init = f'{{"method": "Spec", "value": {{"spec": {spec}}}}}'
    return f'{{"properties": {properties}, "init": {init}}}'.encode()


@pytest.mark.parametrize(
    ("make_body", "needles"),
    [
        pytest.param(
            lambda k: _raw_body(k + "k" * 300),
            ["d0-backend.component.path", "file name too long"],
            id="name-too-long",
        ),
        pytest.param(
            lambda k: _raw_body("/\\ud800"), ["d0-backend.component.path", "/\\ud800 is not valid utf-8"],
            id="surrogate-path",
        ),
        pytest.param(
            lambda k: _raw_body(k, ', "description": "\\ud800"'),
            ["properties.description:", "valid string", "\\ud800"],
            id="surrogate-extra",
        ),
        pytest.param(
            lambda k: _raw_body(k, ', "size": 1e400'),
            ["body:", "1e400", "not a finite float"],
            id="infinite-extra",
        ),
        pytest.param(
            lambda k: _raw_body(k, ', "size": ' + "9" * 5000), ["body:", "5000 digits"], id="5000-digit-int"
        ),
    ],
)
def test_bodies_that_broke_the_server_are_400(
    server: ServerProcess, some_file: Path, make_body: Callable[[str], bytes], needles: list[str]
) -> None:
    # Regressions (fuzz findings): a path component over NAME_MAX made Path.is_file()
    # raise (500); a lone surrogate in a path could not go into pydantic's error (500);
    # an extra property that cannot be written back as JSON created the instance, then
    # failed its 201 and every later GET /instance (500).
    with server.client() as http:
        body = make_body(str(some_file))
        response = http.put("/instance", content=body, headers={"content-type": JSON})
        assert response.status_code == 400, response.text
        message = response.json()["message"].lower()
        for needle in needles:
            assert needle in message, (needle, message)
        assert http.get("/instance").status_code == 404, "a rejected body created an instance"
    assert not [line for line in server.log_lines() if line.get("msg") == "unhandled error in request"]


def test_properties_are_echoed(server: ServerProcess, some_file: Path) -> None:
    body = _valid_body(some_file)
    body["properties"]["description"] = "Propolis carries more descriptive fields"
    with server.client() as http:
        assert http.put("/instance", json=body).status_code == 201
        echoed = http.get("/instance").json()["instance"]["properties"]
        spec = http.get("/instance/spec").json()
    assert echoed == body["properties"]
    # GET /instance/spec gives back the spec as it was sent.
    assert spec["spec"] == {"type": "Present", "value": _spec(body)} and spec["state"] == "Creating"


@pytest.mark.parametrize(
    ("path", "params", "needles"),
    [
        pytest.param(
            HISTORY, {"from_start": "-5"}, ["query.from_start:", "greater than or equal"], id="from-start"
        ),
        pytest.param(HISTORY, {"most_recent": "x"}, ["query.most_recent:", "integer", "'x'"], id="text"),
        pytest.param(HISTORY, {"max_bytes": "-1"}, ["query.max_bytes:", "greater than"], id="max-bytes"),
        pytest.param(
            HISTORY, {"from_start": "0", "most_recent": "1"}, ["from_start, most_recent:", "not both"],
            id="both",
        ),
    ],
)
def test_query_errors_name_field_and_reason(
    server: ServerProcess, path: str, params: dict[str, str], needles: list[str]
) -> None:
    # Parameters are checked before the instance is looked up: no instance needed.
    with server.client() as http:
        response = http.get(path, params=params)
    assert response.status_code == 400, response.text
    assert response.json()["error_code"] == "BadRequest"
    message = response.json()["message"].lower()
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        pytest.param(None, ["a json body is required"], id="no-body"),
        pytest.param({"gen": -1}, ["gen:", "greater than or equal"], id="negative"),
        pytest.param({"gen": 2**64}, ["gen:", "less than or equal to 18446744073709551615"], id="huge"),
        pytest.param({"gen": "1e3"}, ["gen:", "valid integer", "'1e3'"], id="text"),
        pytest.param({"gen": 1.5}, ["gen:", "integer", "1.5"], id="float"),
        pytest.param([1], ["valid dictionary"], id="array"),
    ],
)
def test_state_monitor_body_errors_name_field_and_reason(server: ServerProcess, body: Any,
                                                         needles: list[str]) -> None:
    # The body is checked before the instance is looked up: no instance needed.
    with server.client() as http:
        response = http.request("GET", MONITOR, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error_code"] == "BadRequest"
    message = response.json()["message"].lower()
    for needle in needles:
        assert needle in message, (needle, message)


# A literal ".." never reaches the server (the client resolves dot segments); "%2E%2E" is
# decoded to "..". Any string is a backend id in v5: an unknown one is 404, never a file path.
@pytest.mark.parametrize(
    "bad_id", ["%2E%2E", "d0", "d0-backend.bak", "%00-backend", "-backend", "a" * 40 + "-backend"]
)
def test_unknown_backend_id_is_404(server: ServerProcess, some_file: Path, bad_id: str) -> None:
    with server.client() as http:
        assert http.put("/instance", json=ensure_body(some_file)).status_code == 201
        for response in (
            http.get(f"/instance/disk/{bad_id}/status"),
            http.put(f"/instance/disk/{bad_id}/vcr", json={"vcr_json": "{}"}),
        ):
            assert response.status_code == 404, response.text
            assert response.json()["error_code"] == "NoSuchBackend"
        # A file backend has no volume status either (VolumeStatus is Crucible's).
        assert http.get("/instance/disk/d0-backend/status").status_code == 404


def test_slash_in_backend_id_is_no_route(server: ServerProcess) -> None:
    # %2F is decoded before routing, so this is another path, not a backend id.
    with server.client() as http:
        response = http.get("/instance/disk/..%2F..%2Fetc%2Fpasswd/status")
    assert response.status_code == 404
    assert response.json()["error_code"] == "NotFound"
    assert "/etc/passwd" in response.json()["message"]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/instance", "GET, PUT"),
        ("POST", "/instance/state", "PUT"),
        ("PUT", "/openapi.json", "GET, HEAD"),
    ],
)
def test_405_names_every_allowed_method(server: ServerProcess, method: str, path: str, allow: str) -> None:
    # Regression (fuzz finding): the 405 had no Allow header, and Starlette's own listed
    # only the first route of a path (GET for /instance, where PUT is allowed too).
    with server.client() as http:
        response = http.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert response.json()["error_code"] == "MethodNotAllowed"
    assert allow in response.json()["message"]


def test_openapi_documents_errors_and_no_422(server: ServerProcess) -> None:
    # Regression (fuzz finding): the document promised 422 (the server answers 400) and
    # none of 403/404/409/410/424, and described every answer as a free-form object.
    with server.client() as http:
        doc = http.get("/openapi.json").json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            errors = {code: r for code, r in responses.items() if code >= "400"}
            assert errors, f"{method} {path} documents no error answer"
            for code, answer in errors.items():
                assert answer["content"]["application/json"]["schema"] == error_ref, (method, path, code)
            ok = [r for code, r in responses.items() if code.startswith("2") and code != "204"]
            for answer in ok:
                schema = answer["content"]["application/json"]["schema"]
                # A bare ReplaceResult string, or the document's "null" answers (NMI, snapshot).
                documented = "$ref" in schema or "enum" in schema or schema in ({}, {"type": "null"})
                assert documented, (method, path)
    assert doc["paths"]["/instance/state"]["put"]["responses"].keys() >= {"204", "400", "403", "424"}


def test_what_v5_has_no_field_for_is_a_command_line_option(tmp_path: Path, some_file: Path) -> None:
    """The kernel and the host forwards are the server's command line (ours, after
    propolis-server's run <BOOTROM> <IP:PORT>): a bad one exits 2 naming the option."""
    missing = _server_cli(tmp_path, "--kernel", str(tmp_path / "no-such-vmlinuz"))
    assert missing.returncode == 2 and "--kernel" in missing.stderr and "no-such-vmlinuz" in missing.stderr
    forward = _server_cli(tmp_path, "--forward", "0.0.0.0:2222:22")
    assert forward.returncode == 2 and "loopback" in forward.stderr
    initrd = _server_cli(tmp_path, "--initrd", str(some_file))
    assert initrd.returncode == 2 and "need --kernel" in initrd.stderr
    no_bootrom = subprocess.run([sys.executable, "-m", "sut.server", "run", str(tmp_path / "nope.bin"),
                                 "127.0.0.1:0"], capture_output=True, text=True, timeout=30, check=False)
    assert no_bootrom.returncode == 2 and "nope.bin" in no_bootrom.stderr


def test_propolis_server_command_line_serves(tmp_path: Path, some_file: Path) -> None:
    """run <BOOTROM> <IP:PORT> [VNC] with propolis-server's own flags: it serves (on loopback),
    with a data dir of its own making."""
    log = tmp_path / "run.log"
    from phd.core.process import ManagedProcess

    from .conftest import listening_port

    argv = [sys.executable, "-m", "sut.server", "run", str(some_file), "127.0.0.1:0", "127.0.0.1:5900",
            "--log-level", "info", "--metric-addr", "disable", "--kernel", str(some_file),
            "--allow-path", str(tmp_path),
            "--forward", "127.0.0.1:2222:22"]
    process = ManagedProcess(argv, name="run form", log_path=log, ready_timeout_s=20, stop_timeout_s=30,
                             ready=lambda proc: listening_port(proc.output()) is not None).start()
    try:
        port = listening_port(process.output())
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert http.get("/instance").status_code == 404
            assert http.put("/instance", json=ensure_body(some_file)).status_code == 201
            assert http.get("/instance").json()["instance"]["state"] == "Creating"
        started = next(json.loads(line) for line in log.read_text().splitlines() if "server starting" in line)
        assert started["bootrom"] == str(some_file.resolve()) and started["forwards"] == ["127.0.0.1:2222:22"]
    finally:
        assert process.stop(30) == 0


def test_lifecycle_without_qemu_and_424_after_destroyed(server: ServerProcess, some_file: Path) -> None:
    with server.client() as http:
        assert http.get("/instance").status_code == 404
        assert http.get("/instance").json()["error_code"] == "NoInstance"
        created = http.put("/instance", json=ensure_body(some_file))
        assert created.status_code == 201
        assert created.json() == {"migrate": None}
        assert http.get("/instance").json()["instance"]["state"] == "Creating"
        again = http.put("/instance", json=ensure_body(some_file))
        assert again.status_code == 409
        bad_state = http.put("/instance/state", json="Jump")
        assert bad_state.status_code == 400
        reboot = http.put("/instance/state", json="Reboot")
        assert reboot.status_code == 403
        assert "not been started" in reboot.json()["message"]
        # Stop while Creating: Stopped then Destroyed, no QEMU ever started.
        assert http.put("/instance/state", json="Stop").status_code == 204
        final = http.request("GET", "/instance/state-monitor", json={"gen": 3}).json()
        assert final == {"gen": 3, "state": "Destroyed",
                         "migration": {"migration_in": None, "migration_out": None}}
        for requested in ("Run", "Stop", "Reboot"):
            response = http.put("/instance/state", json=requested)
            assert response.status_code == 424, requested
            assert response.json()["error_code"] == "NoLiveInstance"
        vcr = http.put("/instance/disk/d0-backend/vcr", json={"vcr_json": "{}"})
        assert vcr.status_code == 404  # a file backend has no VCR
        nmi = http.post("/instance/nmi")
        assert nmi.status_code == 400 and nmi.json()["error_code"] == "NotRunning"
        malformed_vcr = http.put("/instance/disk/d0-backend/vcr", json={"vcr": 1})
        assert malformed_vcr.status_code == 400
    assert qemu_pids_for(server.data_dir) == []


def test_sigint_is_ignored_and_sigterm_exits_zero(server: ServerProcess) -> None:
    server.process.signal(signal.SIGINT)
    with server.client() as http:
        assert http.get("/openapi.json").status_code == 200
    assert server.stop() == 0
    assert any(line.get("msg") == "server stopped" for line in server.log_lines())


def test_listens_on_loopback_by_default(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--data-dir", str(tmp_path)])
    assert args.listen == ("127.0.0.1", 0)
    assert args.long_poll_max_s == 60.0


def _server_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The server's command line with bad arguments: it must exit at once, never serve."""
    return subprocess.run([sys.executable, "-m", "sut.server", "--data-dir", str(data_dir), *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                          check=False)


def test_unknown_regression_exits_2_listing_valid_names(tmp_path: Path) -> None:
    result = _server_cli(tmp_path, "--regression", "nope")
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


def test_long_poll_is_bounded_and_the_client_polls_on(tmp_path: Path, some_file: Path) -> None:
    # Regression (fuzz finding): GET /instance/state-monitor?gen=N for an N that never
    # comes held the request forever; a fuzzer (or a client gone away) saw a hang.
    bound_s = 0.5
    srv = start_server(tmp_path, "--long-poll-max-s", str(bound_s))
    client = ServerClient(srv.base_url)
    try:
        with srv.client() as http:
            assert http.put("/instance", json=ensure_body(some_file)).status_code == 201
            started = time.monotonic()
            answer = http.request("GET", "/instance/state-monitor", json={"gen": 50})
            waited = time.monotonic() - started
        assert answer.status_code == 200
        assert answer.json() == {"gen": 1, "state": "Creating",
                                 "migration": {"migration_in": None, "migration_out": None}}
        assert bound_s * 0.8 <= waited < bound_s + 3.0, waited

        requests: list[httpx.Request] = []
        client._http.event_hooks["request"].append(requests.append)
        started = time.monotonic()
        assert client.state_monitor(50, timeout_s=3 * bound_s) == (InstanceState.CREATING, 1)
        waited = time.monotonic() - started
        # It kept polling past one server bound, and stopped at its own timeout.
        assert len(requests) >= 3, requests
        assert 3 * bound_s * 0.9 <= waited < 3 * bound_s + 3.0, waited

        requests.clear()
        assert client.state_monitor(1, timeout_s=30) == (InstanceState.CREATING, 1)
        # Every request the client sent has the state monitor's v5 shape: a GET with a JSON body.
        assert all(r.method == "GET" and json.loads(r.content) == {"gen": 1} for r in requests)
        assert len(requests) == 1

        # A final state is answered at once and ends the polling, whatever gen was asked.
        client.put_state("Stop")
        started = time.monotonic()
        state, gen = client.state_monitor(50, timeout_s=30)
        assert (state, gen) == (InstanceState.DESTROYED, 3)
        assert time.monotonic() - started < 10.0
    finally:
        client.close()
        assert srv.close() == 0


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_bad_long_poll_max_exits_2(tmp_path: Path, value: str) -> None:
    result = _server_cli(tmp_path, f"--long-poll-max-s={value}")
    assert result.returncode == 2
    assert "--long-poll-max-s" in result.stderr and "positive number of seconds" in result.stderr


@pytest.mark.parametrize(
    "query", ["from_start=-1", "most_recent=-5", "from_start=0&most_recent=1", "from_start=x"]
)
def test_serial_websocket_rejects_bad_offsets(server: ServerProcess, some_file: Path, query: str) -> None:
    ws_base = server.base_url.replace("http://", "ws://", 1) + "/instance/serial"
    with server.client() as http:
        assert http.put("/instance", json=ensure_body(some_file)).status_code == 201
    # Closed before the handshake completes: the client sees the HTTP refusal.
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{ws_base}?{query}", open_timeout=10).close()
    assert refused.value.response.status_code == 403
    # Control: the same session with a valid offset is accepted.
    connect(f"{ws_base}?from_start=0", open_timeout=10).close()
