"""The regression switches: one table of the historical bugs the reference system re-creates.

``--regression NAME`` re-creates one known bug on purpose so the suite can prove it catches it.
Every reader takes the names from this table: the server's command line and state driver
(``sut.server.regressions``), the storage backend (``sut.storage.backend``), ``ci/regressions``,
the meta test's expectations (``tests/meta/test_regressions_caught.py``) and the README's table
(``tests/unit/test_regression_table.py`` holds those last two to this one). It lives beside
both halves of the reference system, not inside either: the storage must not import the server.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "ALL_REGRESSIONS",
    "BLOCKING_START",
    "FAILED_MIGRATION_STOPS_SOURCE",
    "MIGRATION_SAME_GENERATION",
    "MULTI_TARGET_REPLACE",
    "NO_GENERATION_FENCE",
    "NO_READ_HASH_CHECK",
    "NO_REPLAY",
    "REGRESSIONS",
    "SERVER_REGRESSIONS",
    "SOURCE_RUNS_AFTER_MIGRATION",
    "STOP_IGNORED_WHILE_STARTING",
    "STORAGE_REGRESSIONS",
    "VCR_DENIED_AFTER_STOP",
    "VCR_DENIED_WHILE_STARTING",
    "Regression",
    "Side",
]


class Side(enum.Enum):
    """Which half of the reference system implements a switch."""

    SERVER = "server"  # sut.server: the state driver and the request queue
    STORAGE = "storage"  # sut.storage: the server hands these to the backend unchanged


@dataclass(frozen=True)
class Regression:
    name: str
    side: Side
    bug: str  # the bug re-created, worded as in the README's table (which a test compares)


BLOCKING_START = "blocking-start"
VCR_DENIED_WHILE_STARTING = "vcr-denied-while-starting"
VCR_DENIED_AFTER_STOP = "vcr-denied-after-stop"
STOP_IGNORED_WHILE_STARTING = "stop-ignored-while-starting"
MULTI_TARGET_REPLACE = "multi-target-replace"
NO_GENERATION_FENCE = "no-generation-fence"
NO_READ_HASH_CHECK = "no-read-hash-check"
NO_REPLAY = "no-replay"
MIGRATION_SAME_GENERATION = "migration-same-generation"
FAILED_MIGRATION_STOPS_SOURCE = "failed-migration-stops-source"
SOURCE_RUNS_AFTER_MIGRATION = "source-runs-after-migration"

REGRESSIONS: tuple[Regression, ...] = (
    Regression(BLOCKING_START, Side.SERVER,
               "the state driver reads no request until block backends are active (the livelock "
               "of Propolis issue 841)"),
    Regression(VCR_DENIED_WHILE_STARTING, Side.SERVER,
               "VCR replacement refused until the VM is Running"),
    Regression(VCR_DENIED_AFTER_STOP, Side.SERVER,
               "a VCR replacement queued after a stop is refused (Propolis PR 879)"),
    Regression(STOP_IGNORED_WHILE_STARTING, Side.SERVER,
               "a stop during startup is deferred until startup ends"),
    Regression(MULTI_TARGET_REPLACE, Side.STORAGE,
               "storage accepts a replacement that changes two targets (two copies in flux at once)"),
    Regression(NO_GENERATION_FENCE, Side.STORAGE,
               "the activation-time generation fence is skipped"),
    Regression(NO_READ_HASH_CHECK, Side.STORAGE,
               "the upstairs hands out a read's data without checking each block's hash (bit rot "
               "on one copy reaches the guest)"),
    Regression(NO_REPLAY, Side.STORAGE,
               "a downstairs back from an outage resumes after `LastFlush` without the writes it "
               "missed"),
    Regression(MIGRATION_SAME_GENERATION, Side.SERVER,
               "a migration target activates its Crucible disks at the source's generation, "
               "ignoring the replacement VCR, so the source's upstairs is not fenced"),
    Regression(FAILED_MIGRATION_STOPS_SOURCE, Side.SERVER,
               "a failed migration out stops the source instead of resuming its guest"),
    Regression(SOURCE_RUNS_AFTER_MIGRATION, Side.SERVER,
               "the source resumes its guest after a successful migration out (two copies run)"),
)

ALL_REGRESSIONS = frozenset(r.name for r in REGRESSIONS)
SERVER_REGRESSIONS = frozenset(r.name for r in REGRESSIONS if r.side is Side.SERVER)
STORAGE_REGRESSIONS = frozenset(r.name for r in REGRESSIONS if r.side is Side.STORAGE)
