"""A typed client of the server API: propolis-server 5.0.0's.

Only transport and status mapping live here; what a test means by "launch" or
"wait for Running" lives in `phd.vm.testvm`. Every request goes through the request log
(`phd.vm.conformance`): checked against propolis-server's OpenAPI document where it is at
hand, and recorded when `PHD_REQUEST_LOG` names a file.
"""

from __future__ import annotations

import enum
import functools
import json
import ssl
import time
from typing import Any

import httpx

from phd.core.errors import ServerError
from phd.vm.conformance import NO_BODY, RequestLog, default_log
from phd.vm.volume_status import VolumeStatus

__all__ = ["InstanceState", "ServerClient"]


class InstanceState(enum.StrEnum):
    CREATING = "Creating"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    REBOOTING = "Rebooting"
    MIGRATING = "Migrating"
    REPAIRING = "Repairing"
    FAILED = "Failed"
    DESTROYED = "Destroyed"


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every client of this process. The API is plain HTTP on loopback, but
    httpx builds a context (loading the CA bundle) for each new client unless it is given one:
    20-50 ms of CPU per VM, on the path from launch to the guest's first instruction."""
    return ssl.create_default_context()


class ServerClient:
    def __init__(self, base_url: str, timeout_s: float = 10.0, requests: RequestLog | None = None) -> None:
        self.base_url = base_url
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s, verify=_tls_context())
        self._requests = requests or default_log()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, expect: tuple[int, ...], json_body: Any = None,
                params: dict[str, Any] | None = None, timeout_s: float | None = None) -> httpx.Response:
        kwargs: dict[str, Any] = {}
        if timeout_s is not None:
            kwargs["timeout"] = timeout_s
        self._requests.sent(method, path, params, NO_BODY if json_body is None else json_body)
        if json_body is not None:
            # httpx's request() sends a body with any method (the state monitor is a GET with one).
            kwargs["content"] = json.dumps(json_body).encode()
            kwargs["headers"] = {"content-type": "application/json"}
        resp = self._http.request(method, path, params=params, **kwargs)
        if resp.status_code not in expect:
            raise ServerError(method, path, resp.status_code, resp.text)
        return resp

    # --- instance ---------------------------------------------------------------------
    def ensure(self, properties: dict[str, Any], spec: dict[str, Any]) -> None:
        """``PUT /instance`` with ``{properties, init: {method: "Spec", value: {spec}}}``."""
        init = {"method": "Spec", "value": {"spec": spec}}
        self.request("PUT", "/instance", expect=(201,), json_body={"properties": properties, "init": init})

    def ensure_migration_target(self, properties: dict[str, Any], migration_id: str, src_addr: str,
                                replace_components: dict[str, Any]) -> dict[str, Any]:
        """``PUT /instance`` with a ``MigrationTarget`` init: the server takes the instance
        from the source server at `src_addr` ("127.0.0.1:PORT"). Returns the ensure answer,
        ``{"migrate": {"migration_id"}}``."""
        init = {"method": "MigrationTarget", "value": {
            "migration_id": migration_id, "src_addr": src_addr, "replace_components": replace_components}}
        body: dict[str, Any] = self.request("PUT", "/instance", expect=(201,),
                                            json_body={"properties": properties, "init": init}).json()
        return body

    def migration_status(self) -> dict[str, Any]:
        """``GET /instance/migration-status``: ``{migration_in, migration_out}``, each
        ``{id, state}`` or null."""
        body: dict[str, Any] = self.request("GET", "/instance/migration-status", expect=(200,)).json()
        return body

    def get(self) -> dict[str, Any]:
        body: dict[str, Any] = self.request("GET", "/instance", expect=(200,)).json()["instance"]
        return body

    def spec(self) -> dict[str, Any]:
        """``GET /instance/spec``: ``{properties, spec: {type, value}, state}``."""
        body: dict[str, Any] = self.request("GET", "/instance/spec", expect=(200,)).json()
        return body

    def state(self) -> tuple[InstanceState, int]:
        """The current state and its generation (a state monitor call for generation 0,
        which is always reached: it answers at once)."""
        body = self.request("GET", "/instance/state-monitor", expect=(200,), json_body={"gen": 0}).json()
        return InstanceState(body["state"]), int(body["gen"])

    def nmi(self) -> None:
        self.request("POST", "/instance/nmi", expect=(200,))

    def put_state(self, requested: str) -> None:
        self.request("PUT", "/instance/state", expect=(204,), json_body=requested)

    def state_monitor(self, gen: int, timeout_s: float) -> tuple[InstanceState, int]:
        """Long-poll until the state generation reaches `gen`, a final state, or `timeout_s`.

        The server bounds one long-poll (``--long-poll-max-s``) and then answers the
        current, older generation; this polls again until `timeout_s` has passed and
        then returns the last answer (generation below `gen`). Raises
        ``httpx.TimeoutException`` only if the server answered nothing in time.
        """
        deadline = time.monotonic() + timeout_s
        last: tuple[InstanceState, int] | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 and last is not None:
                return last
            try:
                body = self.request("GET", "/instance/state-monitor", expect=(200,),
                                    json_body={"gen": gen}, timeout_s=max(remaining, 0.001)).json()
            except httpx.TimeoutException:
                if last is None:
                    raise
                return last
            last = InstanceState(body["state"]), int(body["gen"])
            # A final state never changes again: the server answers it at once, so
            # polling on would only spin until the deadline.
            if last[1] >= gen or last[0] in (InstanceState.DESTROYED, InstanceState.FAILED):
                return last

    # --- disks ------------------------------------------------------------------------
    def replace_vcr(self, backend_id: str, vcr: dict[str, Any], timeout_s: float) -> str:
        """The ReplaceResult: ``started``, ``started_already``, ``completed_already``,
        ``missing`` or ``vcr_matches``."""
        resp = self.request("PUT", f"/instance/disk/{backend_id}/vcr", expect=(200,),
                            json_body={"vcr_json": json.dumps(vcr)}, timeout_s=timeout_s)
        result: str = resp.json()
        return result

    def disk_status(self, backend_id: str) -> VolumeStatus:
        body: dict[str, Any] = self.request(
            "GET", f"/instance/disk/{backend_id}/status", expect=(200,)).json()
        return VolumeStatus(body)

    # --- serial -----------------------------------------------------------------------
    def serial_history(self, from_start: int | None = 0, max_bytes: int | None = None, *,
                       most_recent: int | None = None) -> tuple[bytes, int]:
        """``GET /instance/serial/history``: the bytes from offset `from_start` (or the last
        `most_recent` bytes) and the offset just past them."""
        params: dict[str, Any] = {"from_start": from_start} if most_recent is None else {
            "most_recent": most_recent}
        if max_bytes is not None:
            params["max_bytes"] = max_bytes
        body = self.request("GET", "/instance/serial/history", expect=(200,), params=params).json()
        return bytes(body["data"]), int(body["last_byte_offset"])

    def serial_ws_url(self, from_start: int = 0) -> str:
        self._requests.sent("GET", "/instance/serial", {"from_start": from_start}, NO_BODY)
        return self.base_url.replace("http://", "ws://", 1) + f"/instance/serial?from_start={from_start}"
