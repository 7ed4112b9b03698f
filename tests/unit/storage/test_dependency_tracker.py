"""The upstairs' DependencyTracker against a flat model of the same rule: buckets must only
make it faster, never change which jobs a new job waits for."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from sut.storage.upstairs import DependencyTracker


@dataclass
class _Job:
    job_id: int
    first: int
    last: int
    write: bool


class FlatModel:
    """Every job since the last flush in one list; no buckets, no shortcuts."""

    def __init__(self) -> None:
        self.jobs: list[_Job] = []
        self.barrier: int | None = None

    def add(self, job_id: int, first: int, last: int, write: bool) -> tuple[int, ...]:
        deps = {j.job_id for j in self.jobs if j.first <= last and first <= j.last and (write or j.write)}
        if write:  # a write that covers an earlier job replaces it
            self.jobs = [j for j in self.jobs if not (first <= j.first and j.last <= last)]
        self.jobs.append(_Job(job_id, first, last, write))
        if self.barrier is not None:
            deps.add(self.barrier)
        return tuple(sorted(deps))

    def done(self, job_id: int) -> None:
        self.jobs = [j for j in self.jobs if j.job_id != job_id]

    def flush(self, job_id: int) -> tuple[int, ...]:
        deps = {j.job_id for j in self.jobs}
        if self.barrier is not None:
            deps.add(self.barrier)
        self.jobs, self.barrier = [], job_id
        return tuple(sorted(deps))


OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "read", "done", "flush"]),
        st.integers(0, 60),  # first block
        st.integers(0, 20),  # length - 1
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None, database=None)
@given(OPS, st.sampled_from([1, 4, 16, 256]))
def test_buckets_give_the_flat_rules_answers(ops: list[tuple[str, int, int]], bucket: int) -> None:
    tracker, model = DependencyTracker(bucket=bucket), FlatModel()
    reads: list[tuple[int, int, int]] = []
    for n, (op, first, extra) in enumerate(ops):
        job_id, last = 1000 + n, first + extra
        if op == "write":
            assert tracker.write(job_id, first, last) == model.add(job_id, first, last, True)
        elif op == "read":
            assert tracker.read(job_id, first, last) == model.add(job_id, first, last, False)
            reads.append((job_id, first, last))
        elif op == "done" and reads:
            rid, rfirst, rlast = reads.pop(first % len(reads))
            tracker.done(rid, rfirst, rlast)
            model.done(rid)
        elif op == "flush":
            assert tracker.flush(job_id) == model.flush(job_id)
            reads.clear()
        assert len(tracker) == len(model.jobs)
