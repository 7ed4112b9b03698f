"""sweep_leftovers against docker-py's own container listing, over a fake engine API in which
another session removes its container between the list and the inspect of it."""

from __future__ import annotations

import os
from typing import Any

import docker.errors
from docker.models.containers import ContainerCollection

from phd.storage.downstairs import sweep_leftovers


class _Api:
    """The few engine calls a listing and a removal make; ``gone`` vanished after the list."""

    def __init__(self, containers: dict[str, dict[str, str]], gone: set[str]) -> None:
        self.containers_by_id = containers
        self.gone = gone
        self.removed: list[str] = []

    def containers(self, **_filters: Any) -> list[dict[str, str]]:
        return [{"Id": cid} for cid in self.containers_by_id]

    def inspect_container(self, cid: str) -> dict[str, Any]:
        if cid in self.gone:
            raise docker.errors.NotFound(f"No such container: {cid}")
        return {"Id": cid, "Name": f"/{cid}", "Config": {"Labels": self.containers_by_id[cid]}}

    def remove_container(self, cid: str, **_options: Any) -> None:
        self.removed.append(cid)


class _Volumes:
    def list(self, **_filters: Any) -> list[Any]:
        return []


class _Client:
    def __init__(self, api: _Api) -> None:
        self.api = api
        self.containers = ContainerCollection(client=self)
        self.volumes = _Volumes()


def test_a_container_removed_by_another_session_during_the_sweep_is_no_error() -> None:
    dead_owner = {"phd.session": "old", "phd.host": os.uname().nodename, "phd.pid": "0"}
    other = {"phd.session": "other", "phd.host": os.uname().nodename, "phd.pid": "0"}
    api = _Api({"left-over": dead_owner, "racing": other}, gone={"racing"})
    assert sweep_leftovers(_Client(api), keep_session="mine") == ["left-over"]
    assert api.removed == ["left-over"]
