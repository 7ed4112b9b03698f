"""Conformance: a bounded schemathesis fuzz of the real server against propolis-server
5.0.0's own OpenAPI document (issue 15, item 2).

The document is Oxide's, read from ``../shared/propolis/`` beside the checkout (or
``PHD_PROPOLIS_OPENAPI``); without it the fuzz tests skip with the how-to. Every answer
must be as the document says (status code, content type, body schema: the Error body for
every 4xx), no 5xx, no hang, in three situations of one server: no instance; an instance in
Creating (a file disk and a crucible disk whose targets never answer); and that instance
after ``Run`` with a kernel that is not one (the server's --kernel; QEMU refuses it, the VM
goes Failed). The hostile-values test at the end needs no document.

Each operation gets schemathesis's deterministic coverage cases (boundaries, missing and
wrong-typed fields, unsupported methods and media types) and then a Hypothesis run of
positive and negative cases. The server runs with a short ``--long-poll-max-s`` so a
long-poll for a generation that never comes answers promptly instead of looking like a hang
(most fuzzed generations are far ahead of the instance's).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, CheckContext, GenerationMode
from schemathesis.core.errors import UnsupportedSchema

from phd.vm.conformance import HOW_TO, find_document
from sut.storage.vcr import dump_vcr, region_volume
from tests import v5

from .conftest import ServerProcess, qemu_pids_for, start_server

pytestmark = pytest.mark.integration

Operation = APIOperation[Any, Any, Any, Any]

LONG_POLL_MAX_S = 0.1
# The slowest legitimate answer is a long-poll that runs to the server's bound; the slack
# is for a loaded 2-core machine. A slower answer is a finding, not noise.
RESPONSE_BOUND_S = LONG_POLL_MAX_S + 4.0
# The client gives up later than the bound, so a hang fails the test with the request
# that hung instead of blocking the run.
REQUEST_TIMEOUT_S = RESPONSE_BOUND_S + 5.0
# Generated cases per operation and mode, after the deterministic coverage cases (which
# run whatever this says). The generation is most of the time: 50 cost about 50 s of a PR
# run for both situations, so a PR run takes 10 and the nightly (ci/nightly.py) sets
# PHD_FUZZ_EXAMPLES to 200 to go deeper.
EXAMPLES_PER_MODE = int(os.environ.get("PHD_FUZZ_EXAMPLES", "10"))
FINAL_STATE_DEADLINE_S = 30.0

ENSURE = "PUT /instance"
STATE_PUT = "PUT /instance/state"
FILE_DISK, CRUCIBLE_DISK = "d0", "c0"
# Generated backend ids almost never name a real disk: these runs reach the disks.
KNOWN_BACKENDS = {"id": f"{FILE_DISK}-backend"}, {"id": f"{CRUCIBLE_DISK}-backend"}
VOLUME_STATUS, VCR_PUT = "GET /instance/disk/{id}/status", "PUT /instance/disk/{id}/vcr"
DISK_OPERATIONS = [VOLUME_STATUS, VCR_PUT, "POST /instance/disk/{id}/snapshot/{snapshot_id}"]
# The websocket upgrades (serial console, migration) answer 101 only to a websocket client;
# a plain request gets a documented 4XX Error, which the fuzz checks like any other answer.

CONFIG = schemathesis.Config.from_dict(
    {
        "checks": {
            # The server validates meaning, not only shape (a kernel path must exist, Run
            # needs a live instance): a schema-valid request may rightly get 400 or 424.
            "positive_data_acceptance": {"enabled": False},
            # No 5xx, not even a documented one (the CONTRACT: never 500).
            "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx"]},
            "max_response_time": RESPONSE_BOUND_S,
        },
    }
)

SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES_PER_MODE,
    deadline=None,  # time is bounded per request by max_response_time instead
    database=None,  # nothing written into the repository
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


def error_body_shape(ctx: CheckContext, response: schemathesis.Response, case: Case[Any]) -> bool | None:
    """Beyond the document's schema (which requires only message and request_id): every
    error of this server names its error_code and says something."""
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError as exc:
        shown = response.content[:200]
        raise AssertionError(f"{response.status_code} without a JSON body: {shown!r}") from exc
    assert isinstance(body, dict), f"error body is not an object: {body!r}"
    assert isinstance(body.get("error_code"), str) and body["error_code"], f"no error code: {body!r}"
    assert isinstance(body.get("message"), str) and body["message"], f"no message: {body!r}"
    return None


def assert_healthy(server: ServerProcess) -> None:
    assert server.process.alive(), f"server exited; log:\n{server.log_path.read_text()}"
    unhandled = [line for line in server.log_lines() if line.get("msg") == "unhandled error in request"]
    assert not unhandled, f"the server logged unhandled errors: {unhandled}"


@dataclass
class Fuzzer:
    """Runs cases against one server and keeps what it saw, for the test's own assertions."""

    server: ServerProcess
    schema: schemathesis.BaseSchema
    session: requests.Session = field(default_factory=requests.Session)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    created: list[Case[Any]] = field(default_factory=list)
    not_generated: list[str] = field(default_factory=list)

    def operations(self, *, only: Iterable[str] = (), skip: Iterable[str] = ()) -> Iterator[Operation]:
        wanted, unwanted = set(only), set(skip)
        for methods in self.schema.values():
            for operation in methods.values():
                if (not wanted or operation.label in wanted) and operation.label not in unwanted:
                    yield operation

    def fuzz(self, operations: Iterable[Operation], path_parameters: dict[str, str] | None = None) -> None:
        for operation in operations:
            fixed = path_parameters if operation.path_parameters else None
            self._coverage(operation, fixed)
            # Nothing to make invalid in a request without (unfixed) parameters or body.
            free = [p for p in operation.iter_parameters() if not (fixed and p.name in fixed)]
            negatable = bool(free) or bool(operation.body)
            modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if negatable else [])
            for mode in modes:
                strategy = operation.as_strategy(mode, path_parameters=fixed)

                @SETTINGS
                @given(case=strategy)
                def run(case: Case[Any]) -> None:
                    self.check(case)

                try:
                    run()
                except (hypothesis.errors.Unsatisfiable, UnsupportedSchema) as exc:
                    # A limit of the generator on this document (a path id that no generated
                    # string satisfies, a "not" schemathesis cannot negate), not an answer of
                    # the server: the coverage cases above still ran. Shown with the output.
                    self.not_generated.append(f"{operation.label} {mode.value}: {type(exc).__name__}")

    def _coverage(self, operation: Operation, path_parameters: dict[str, str] | None) -> None:
        cases = self.schema.iter_coverage_cases(
            operation,
            generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
            generation_config=self.schema.config.generation_for(operation=operation),
        )
        for case in cases:
            if path_parameters and case.path_parameters:
                case.path_parameters = {**case.path_parameters, **path_parameters}
            self.check(case)

    def check(self, case: Case[Any]) -> None:
        response = case.call(base_url=self.server.base_url, session=self.session, timeout=REQUEST_TIMEOUT_S)
        self.statuses[(case.operation.label, response.status_code)] += 1
        if case.operation.label == ENSURE and response.status_code == 201:
            self.created.append(case)
        case.validate_response(response, additional_checks=[error_body_shape])

    def assert_server_healthy(self) -> None:
        assert_healthy(self.server)

    def close(self) -> None:
        # Shown with the captured output of a failing test: what the fuzz reached.
        print("answers per operation and status:", dict(sorted(self.statuses.items())))
        print("not generated (coverage cases only):", self.not_generated)
        self.session.close()


@pytest.fixture
def fuzz_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server with a short long-poll, whose --kernel is not a kernel (QEMU refuses it)."""
    kernel = tmp_path / "not-a-kernel"
    kernel.write_bytes(b"\0" * 512)  # QEMU rejects it: "invalid kernel header"
    server = start_server(tmp_path, "--long-poll-max-s", str(LONG_POLL_MAX_S), "--kernel", str(kernel))
    try:
        yield server
    finally:
        code = server.close()
        assert code == 0, f"server exit code {code}; log:\n{server.log_path.read_text()}"


@pytest.fixture
def fuzzed(fuzz_server: ServerProcess) -> Iterator[Fuzzer]:
    path = find_document()
    if path is None:
        pytest.skip(HOW_TO)
    document = json.loads(path.read_text())
    fuzzer = Fuzzer(fuzz_server, schemathesis.openapi.from_dict(document, config=CONFIG))
    try:
        yield fuzzer
    finally:
        fuzzer.close()


@pytest.fixture
def dead_targets() -> Iterator[list[str]]:
    """Three loopback addresses that refuse connections (bound, never listening)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        yield [f"127.0.0.1:{sock.getsockname()[1]}" for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def test_fuzz_without_instance(fuzzed: Fuzzer) -> None:
    # PUT /instance last: a fuzzed spec may name an existing file as the kernel and
    # create an instance, which would change the situation for the other operations.
    fuzzed.fuzz(fuzzed.operations(skip=[ENSURE]))
    fuzzed.fuzz(fuzzed.operations(only=[ENSURE]))
    fuzzed.assert_server_healthy()
    if fuzzed.created:
        # A firmware-boot spec needs no file, so the fuzzer may well create one:
        # then the server must hold exactly that instance, still Creating.
        with fuzzed.server.client() as http:
            instance = http.get("/instance").json()["instance"]
        first = cast(dict[str, Any], fuzzed.created[0].body)
        assert instance["properties"]["id"] == str(uuid.UUID(first["properties"]["id"]))
        assert instance["state"] == "Creating"
    else:
        assert fuzzed.statuses[("GET /instance", 404)] > 0
    assert fuzzed.statuses[(STATE_PUT, 424)] > 0, "Run/Stop/Reboot never reached the no-instance check"
    assert fuzzed.statuses[(ENSURE, 400)] > 0


def test_fuzz_creating_then_failed(fuzzed: Fuzzer, tmp_path: Path, dead_targets: list[str]) -> None:
    kernel = tmp_path / "not-a-kernel"
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 65536)
    vcr = dump_vcr(
        region_volume(str(uuid.uuid4()), dead_targets, block_size=512, blocks_per_extent=64, extent_count=2)
    )
    spec = v5.spec(v5.serial(), v5.disk(FILE_DISK, v5.file_backend(disk)),
                   v5.disk(CRUCIBLE_DISK, v5.crucible_backend(vcr), interface="nvme", slot=0x11))
    with fuzzed.server.client() as http:
        created = http.put("/instance", json=v5.ensure(spec, name="fuzz"))
        assert created.status_code == 201, created.text

        # Creating: everything but state changes, with generated and with real backend ids.
        fuzzed.fuzz(fuzzed.operations(skip=[STATE_PUT]))
        for known in KNOWN_BACKENDS:
            fuzzed.fuzz(fuzzed.operations(only=DISK_OPERATIONS), known)
        assert http.get("/instance").json()["instance"]["state"] == "Creating"
        fuzzed.assert_server_healthy()

        # Run launches QEMU with the bogus kernel: the VM must fail promptly and cleanly.
        assert http.put("/instance/state", json="Run").status_code == 204
        final = wait_for_final_state(http)
        assert final["state"] == "Failed", final
        assert qemu_pids_for(fuzzed.server.data_dir) == []
        # The argv QEMU refused is in the log, one line, for whoever debugs the failure.
        launches = [line for line in fuzzed.server.log_lines() if line.get("msg") == "launching qemu"]
        assert len(launches) == 1, launches
        argv = launches[0]["argv"]
        assert isinstance(argv, list)
        # QEMU gets the checked file by descriptor; the log says which file each one is.
        fd = argv[argv.index("-kernel") + 1].removeprefix("/proc/self/fd/")
        fds = launches[0]["fds"]
        assert isinstance(fds, dict) and fds[fd] == str(kernel), fds

        # Failed is final: every operation, state changes included, must still answer sanely.
        fuzzed.fuzz(fuzzed.operations())
        for known in KNOWN_BACKENDS:
            fuzzed.fuzz(fuzzed.operations(only=DISK_OPERATIONS), known)
        assert http.request("GET", "/instance/state-monitor", json={"gen": final["gen"]}).json() == final
        # Generated ensure bodies are almost never valid v5 specs (400 first): a valid one is 409.
        again = http.put("/instance", json=v5.ensure(spec, name="fuzz"))
        assert again.status_code == 409 and again.json()["error_code"] == "InstanceExists", again.text
    fuzzed.assert_server_healthy()
    assert fuzzed.statuses[(VOLUME_STATUS, 200)] > 0
    assert fuzzed.statuses[(VCR_PUT, 400)] > 0
    assert fuzzed.statuses[(STATE_PUT, 403)] > 0, "state changes after Failed were never denied"


def wait_for_final_state(http: httpx.Client) -> dict[str, Any]:
    """Follow the (bounded) state monitor until Failed or Destroyed; report the last answer."""
    deadline = time.monotonic() + FINAL_STATE_DEADLINE_S
    last: dict[str, Any] = http.request("GET", "/instance/state-monitor", json={"gen": 0}).json()
    while last["state"] not in ("Failed", "Destroyed"):
        if time.monotonic() > deadline:
            raise AssertionError(f"no final state within {FINAL_STATE_DEADLINE_S}s; last answer: {last}")
        wanted = {"gen": last["gen"] + 1}
        last = http.request("GET", "/instance/state-monitor", json=wanted, timeout=REQUEST_TIMEOUT_S).json()
    return last


# --- hostile values (issue 12): big integers, deep nesting, long strings, anywhere -----------

PLACEHOLDER = '"__HOSTILE__"'
HOSTILE_SETTINGS = hypothesis.settings(SETTINGS, max_examples=150)


def _hostile_values() -> st.SearchStrategy[str]:
    """JSON texts that once cost a 500, a blocked loop or unbounded memory."""
    big_int = st.integers(min_value=21, max_value=6000).map(lambda n: "9" * n)
    negative_big = big_int.map(lambda t: "-" + t)
    deep = st.integers(min_value=33, max_value=50_000).flatmap(
        lambda d: st.sampled_from(["[" * d + "]" * d, '{"a":' * d + "1" + "}" * d]))
    long_string = st.integers(min_value=1000, max_value=300_000).map(lambda n: json.dumps("x," * n))
    floats = st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "1" + "0" * 400 + ".5"])
    return st.one_of(big_int, negative_big, deep, long_string, floats)


def _paths(value: object, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out += _paths(child, (*prefix, i))
    return out


def _with_placeholder(original: Any, path: tuple[str | int, ...]) -> str:
    doc: Any = json.loads(json.dumps(original))
    holder: Any = doc
    for part in path[:-1]:
        holder = holder[part]
    holder[path[-1]] = "__HOSTILE__"
    return json.dumps(doc)


def test_fuzz_hostile_values_anywhere(fuzz_server: ServerProcess, dead_targets: list[str]) -> None:
    """Every field of an ensure body, of a VCR inside it and of a VCR replacement gets a
    hostile value: still no 5xx, every error in the CONTRACT's shape, the server keeps serving."""
    vcr = json.loads(dump_vcr(region_volume(str(uuid.uuid4()), dead_targets, block_size=512,
                                            blocks_per_extent=64, extent_count=2)))
    ensure = v5.ensure(v5.spec(v5.disk(CRUCIBLE_DISK, v5.crucible_backend(json.dumps(vcr))), memory_mb=64),
                       name="fuzz")
    statuses: Counter[int] = Counter()

    def content_of(kind: str, path: tuple[str | int, ...], value: str) -> str:
        if kind == "body":
            return _with_placeholder(ensure, path).replace(PLACEHOLDER, value)
        inner = _with_placeholder(vcr, path).replace(PLACEHOLDER, value)
        if kind == "vcr":
            return json.dumps({"vcr_json": inner})
        body: dict[str, Any] = json.loads(json.dumps(ensure))
        components = body["init"]["value"]["spec"]["components"]
        components[f"{CRUCIBLE_DISK}-backend"]["component"]["request_json"] = inner
        return json.dumps(body)

    with fuzz_server.client(timeout=REQUEST_TIMEOUT_S) as http:

        def fuzz(targets: list[tuple[str, str, tuple[str | int, ...]]]) -> None:
            @HOSTILE_SETTINGS
            @given(where=st.sampled_from(targets), value=_hostile_values())
            def run(where: tuple[str, str, tuple[str | int, ...]], value: str) -> None:
                url, kind, path = where
                started = time.monotonic()
                response = http.put(url, content=content_of(kind, path, value),
                                    headers={"content-type": "application/json"})
                statuses[response.status_code] += 1
                assert response.status_code < 500, (response.status_code, response.text[:500])
                assert time.monotonic() - started < RESPONSE_BOUND_S, "a hostile value was slow to refuse"
                if response.status_code >= 400:
                    answer = response.json()
                    assert isinstance(answer, dict) and answer.get("error_code") and answer.get("message"), (
                        response.text[:500])

            run()

        # No instance yet: a hostile ensure body, or a hostile VCR inside a valid one. A long
        # string in a free-form field (a VCR's cert_pem, say) is within the limits: that
        # ensure may succeed, and the later ones then answer 409.
        fuzz([("/instance", "body", p) for p in _paths(ensure)]
             + [("/instance", "request_json", p) for p in _paths(vcr)])
        # An instance in Creating: hostile replacement VCRs.
        if http.get("/instance").status_code == 404:
            assert http.put("/instance", json=ensure).status_code == 201
        fuzz([(f"/instance/disk/{CRUCIBLE_DISK}-backend/vcr", "vcr", p) for p in _paths(vcr)])
        assert http.get("/instance").json()["instance"]["state"] == "Creating"
    print("hostile statuses:", dict(statuses))
    assert_healthy(fuzz_server)
    assert statuses[400] > 0 and set(statuses) <= {201, 400, 409, 413}, statuses
