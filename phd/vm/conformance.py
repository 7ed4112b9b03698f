"""Requests and answers checked against propolis-server's own OpenAPI document (issue 15).

The server API is propolis-server 5.0.0's; the document is Oxide's, published with that
release, and it is not part of this project: it is read where the CI machine keeps it,
``../shared/propolis/propolis-server-5.0.0.json`` beside the checkout, or wherever
``PHD_PROPOLIS_OPENAPI`` points. Without it nothing is checked, and the conformance tests
skip with :data:`HOW_TO`.

:class:`ApiDocument` answers one question for a request or an answer: which operation of the
document it is, and what about it the document does not allow (one line per violation, empty
when it conforms). OpenAPI 3.0 schemas become JSON Schema here (``nullable`` is the only
difference that matters for this document); validation is jsonschema-rs (a schemathesis
dependency, so present wherever the test extra is installed).

:class:`RequestLog` is the framework client's recorder: every request a
:class:`phd.client.ServerClient` sends goes through it, is checked, and is appended to a JSON
lines file when ``PHD_REQUEST_LOG`` names one. A request the document does not allow fails at
once (``HarnessError`` naming the operation and the violation): the framework, not the server,
broke the contract.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phd.core.errors import HarnessError

__all__ = ["DOC_ENV", "DOC_NAME", "HOW_TO", "LOG_ENV", "ApiDocument", "LogCheck", "NoBody", "RequestLog",
           "check_log", "find_document"]

DOC_NAME = "propolis-server-5.0.0.json"
DOC_ENV = "PHD_PROPOLIS_OPENAPI"
LOG_ENV = "PHD_REQUEST_LOG"
HOW_TO = (f"propolis-server's OpenAPI document {DOC_NAME} is not here: put it in ../shared/propolis/ "
          f"beside the checkout (openapi/propolis-server/ in github.com/oxidecomputer/propolis, "
          f"5.0.0), or point {DOC_ENV} at it")


class NoBody:
    """The request had no body (distinct from a JSON ``null`` body)."""


NO_BODY = NoBody()


def find_document(start: Path | None = None) -> Path | None:
    """``$PHD_PROPOLIS_OPENAPI``, else ``<dir>/../shared/propolis/<DOC_NAME>`` for the checkout
    holding this package or ``start`` (or any of their parents); None when absent."""
    env = os.environ.get(DOC_ENV)
    if env:
        path = Path(env)
        return path if path.is_file() else None
    bases = [Path(__file__).resolve().parent]
    if start is not None:
        bases.insert(0, start.resolve())
    for base in bases:
        for folder in (base, *base.parents):
            candidate = folder.parent / "shared" / "propolis" / DOC_NAME
            if candidate.is_file():
                return candidate
    return None


def _json_schema(node: Any) -> Any:
    """OpenAPI 3.0 schema -> JSON Schema: ``nullable: true`` also admits null."""
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    operation_id: str
    spec: Mapping[str, Any]

    @property
    def label(self) -> str:
        return f"{self.method} {self.template} ({self.operation_id})"


class ApiDocument:
    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document
        self.version = str(document.get("info", {}).get("version", "?"))
        self._components = _json_schema(document.get("components", {}))
        self._validators: dict[str, Any] = {}
        self._operations: list[tuple[re.Pattern[str], Operation]] = []
        for template, methods in document.get("paths", {}).items():
            pattern = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$")
            for method, spec in methods.items():
                op = Operation(method.upper(), template, str(spec.get("operationId", "?")), spec)
                self._operations.append((pattern, op))

    @classmethod
    def load(cls, path: Path) -> ApiDocument:
        return cls(json.loads(path.read_text()))

    def operations(self) -> Iterator[Operation]:
        for _, op in self._operations:
            yield op

    def operation(self, method: str, path: str) -> Operation | None:
        path = path.split("?", 1)[0]
        for pattern, op in self._operations:
            if op.method == method.upper() and pattern.match(path):
                return op
        return None

    def _errors(self, schema: Mapping[str, Any], instance: object) -> list[str]:
        import jsonschema_rs  # a schemathesis dependency; imported only when checking

        key = json.dumps(schema, sort_keys=True)
        validator = self._validators.get(key)
        if validator is None:
            root = {"allOf": [_json_schema(schema)], "components": self._components}
            # 2020-12: its "uuid" format tells the two variants of a SpecKey apart.
            validator = jsonschema_rs.Draft202012Validator(root, validate_formats=True)
            self._validators[key] = validator
        out = []
        for error in validator.iter_errors(instance):
            where = "/".join(str(p) for p in error.instance_path) or "(root)"
            out.append(f"{where}: {error.message[:300]}")
        return out

    def request_violations(self, method: str, path: str, query: Mapping[str, object] | None = None,
                           body: object = NO_BODY) -> list[str]:
        op = self.operation(method, path)
        if op is None:
            return [f"{method} {path}: no such operation in propolis-server {self.version}"]
        out = []
        params = {p["name"]: p for p in op.spec.get("parameters", []) if p.get("in") == "query"}
        for name, value in (query or {}).items():
            if name not in params:
                out.append(f"query parameter {name!r} is not one of {sorted(params) or 'none'}")
                continue
            schema = params[name].get("schema", {})
            if schema.get("type") == "integer":
                try:
                    value = int(str(value))
                except ValueError:
                    out.append(f"query parameter {name!r}: {value!r} is not an integer")
                    continue
            out += [f"query {name}: {e}" for e in self._errors(schema, value)]
        request_body = op.spec.get("requestBody")
        if request_body is None:
            if not isinstance(body, NoBody):
                out.append("the operation takes no body, one was sent")
        elif isinstance(body, NoBody):
            if request_body.get("required"):
                out.append("the operation requires a JSON body, none was sent")
        else:
            schema = request_body["content"]["application/json"]["schema"]
            out += [f"body {e}" for e in self._errors(schema, body)]
        return out

    def response_violations(self, method: str, path: str, status: int, content_type: str | None,
                            body: object = NO_BODY) -> list[str]:
        op = self.operation(method, path)
        if op is None:
            return [f"{method} {path}: no such operation in propolis-server {self.version}"]
        responses = op.spec.get("responses", {})
        spec = responses.get(str(status)) or responses.get(f"{str(status)[0]}XX")
        if spec is None:
            return [f"status {status} is not one of {sorted(responses)}"]
        ref = spec.get("$ref")
        if ref is not None:
            spec = self.document["components"]["responses"][ref.rsplit("/", 1)[1]]
        content = spec.get("content")
        if not content:
            empty = isinstance(body, NoBody) or body in (b"", "")
            return [] if empty else ["a body where none is documented"]
        media = (content_type or "").split(";", 1)[0].strip()
        if media not in content:
            return [f"content type {content_type!r} is not one of {sorted(content)}"]
        return [f"body {e}" for e in self._errors(content[media]["schema"], body)]


@dataclass
class LogCheck:
    """What :func:`check_log` found in a request log."""

    requests: int
    per_operation: dict[str, int]
    violations: list[str]
    unreadable: list[str]

    def missing(self, expected: set[str]) -> list[str]:
        return sorted(expected - set(self.per_operation))


def check_log(document: ApiDocument, lines: Iterator[str]) -> LogCheck:
    """Every record of a request log (``PHD_REQUEST_LOG``'s JSON lines) against the document:
    the operation each is, and every violation named with its operation. A line that is not a
    record (a torn or foreign line) is listed, not fatal, so one bad line cannot hide the rest."""
    per_operation: dict[str, int] = {}
    violations: list[str] = []
    unreadable: list[str] = []
    requests = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            method, where, query = str(record["method"]), str(record["path"]), record.get("query") or {}
            if not isinstance(query, dict):
                raise TypeError("query is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            unreadable.append(f"line {number}: {exc}: {line[:120]!r}")
            continue
        requests += 1
        op = document.operation(method, where)
        label = op.label if op else f"{method} {where}"
        key = op.operation_id if op else label
        per_operation[key] = per_operation.get(key, 0) + 1
        for problem in document.request_violations(method, where, query, record.get("body", NO_BODY)):
            violations.append(f"{label}: {problem}")
    return LogCheck(requests, per_operation, violations, unreadable)


class RequestLog:
    """Checks (and optionally records) every request of the framework's clients."""

    def __init__(self, document: ApiDocument | None, log_path: Path | None = None) -> None:
        self.document = document
        self.log_path = log_path
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls) -> RequestLog:
        """The document where find_document() finds it (and jsonschema-rs, from the test
        extra, is installed: an install of phd alone checks nothing); PHD_REQUEST_LOG's file."""
        path = find_document()
        try:
            import jsonschema_rs  # noqa: F401 - only whether it is there
        except ImportError:
            path = None
        log = os.environ.get(LOG_ENV)
        return cls(ApiDocument.load(path) if path else None, Path(log) if log else None)

    def sent(self, method: str, path: str, query: Mapping[str, object] | None, body: object) -> None:
        if self.log_path is not None:
            record: dict[str, object] = {"method": method, "path": path, "query": dict(query or {})}
            if not isinstance(body, NoBody):
                record["body"] = body
            # One write() of the whole line on an O_APPEND descriptor: several processes (xdist
            # workers of one stage) may share the file, and such appends do not interleave.
            data = (json.dumps(record) + "\n").encode()
            with self._lock:
                fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
        if self.document is None:
            return
        violations = self.document.request_violations(method, path, query, body)
        if violations:
            op = self.document.operation(method, path)
            label = op.label if op else f"{method} {path}"
            raise HarnessError(f"the framework sent a request that propolis-server "
                               f"{self.document.version} does not allow: {label}: " + "; ".join(violations))


_default: RequestLog | None = None


def default_log() -> RequestLog:
    """The process's request log (the document found once, ``PHD_REQUEST_LOG`` read once)."""
    global _default
    if _default is None:
        _default = RequestLog.from_environment()
    return _default
