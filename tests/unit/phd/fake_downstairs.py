"""Fake downstairs for the framework's unit tests: the real `_Lifecycle` rules over simulated
primitives (no process, no Docker), and a member factory of them for a `DownstairsSet`."""

from __future__ import annotations

from phd.core.errors import HarnessError
from phd.core.ports import BlackHole
from phd.storage.crucible import CrucibleDisk
from phd.storage.downstairs import DsState, _Lifecycle
from phd.storage.dsc import DownstairsSet, RegionGeometry

# A disk's geometry as DiskFactory makes the default one: 1 GiB in 64 MiB extents.
DISK_GEOMETRY = RegionGeometry.of_size(1 << 30, block_size=512, extent_bytes=64 << 20)


class FakeDs(_Lifecycle):
    """Simulates a downstairs: `_sim` is what the real process/container would report."""

    def __init__(self, i: int, port: int, *, fail_on: str = "", name: str | None = None,
                 events: list[str] | None = None) -> None:
        super().__init__()
        self.name = name or f"ds{i}"
        self.events = events
        self.host_port = port
        self.fail_on = fail_on
        self._sim: DsState = DsState.NEW
        self.region: tuple[str, int, int, int, bool] | None = None
        self.calls: list[str] = []

    def _fail(self, what: str) -> None:
        self.calls.append(what)
        if self.fail_on == what:
            raise HarnessError(f"{self.name}: simulated {what} failure")

    def _observe(self) -> DsState:
        return self._sim

    def _create_region(self, uuid: str, block_size: int, extent_size: int, extent_count: int,
                       encrypted: bool) -> None:
        self._fail("create")
        self.region = (uuid, block_size, extent_size, extent_count, encrypted)

    def _launch(self) -> None:
        self._fail("launch")
        self._sim = DsState.RUNNING

    def _terminate(self, *, paused: bool) -> None:
        self._fail("terminate-paused" if paused else "terminate")
        self._sim = DsState.STOPPED

    def _sigkill(self, *, paused: bool) -> None:
        self._fail("sigkill")
        self._sim = DsState.STOPPED

    def _freeze(self) -> None:
        self._fail("freeze")
        self._sim = DsState.PAUSED

    def _thaw(self) -> None:
        self._fail("thaw")
        self._sim = DsState.RUNNING

    def _teardown(self) -> None:
        if self.events is not None:
            self.events.append(f"destroy {self.name}")
        self._fail("teardown")
        self._sim = DsState.STOPPED

    def logs(self) -> str:
        return ""


def now(ds: FakeDs) -> DsState:
    """The state, read afresh (a plain `ds.state` would be narrowed by mypy after an assert)."""
    return ds.state


class Fakes:
    """A member factory; `by_port` names members `ds<port>`, `events` records their teardown."""

    def __init__(self, fail: dict[int, str] | None = None, *, by_port: bool = False,
                 events: list[str] | None = None) -> None:
        self.made: list[FakeDs] = []
        self.fail = fail or {}
        self.by_port = by_port
        self.events = events

    def __call__(self, i: int, port: int) -> FakeDs:
        ds = FakeDs(i, port, fail_on=self.fail.get(i, ""), name=f"ds{port}" if self.by_port else None,
                    events=self.events)
        self.made.append(ds)
        return ds




def fake_disk(name: str = "d", ports: tuple[int, ...] = (4001, 4002, 4003, 4004, 4005), *,
              holes: list[BlackHole] | None = None, geometry: RegionGeometry = DISK_GEOMETRY,
              fakes: Fakes | None = None, **kwargs: object) -> tuple[CrucibleDisk, Fakes]:
    """A CrucibleDisk on an opened set of fake downstairs on `ports` (the first three serve;
    the rest are there for spares)."""
    made = fakes or Fakes(by_port=True)
    dss = DownstairsSet(made, list(ports), count=3, geometry=geometry).open()
    return CrucibleDisk(name, dss, holes or [], **kwargs), made  # type: ignore[arg-type]
