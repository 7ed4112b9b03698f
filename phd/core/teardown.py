"""Teardown that runs every step and keeps every error with its traceback.

pytest's own habit (`_pytest/fixtures.py`): run all finalizers, then raise what failed. One
failure is raised as itself, with a note naming what was being torn down: its type stays
catchable (`except SutError`) and its traceback is the report. Several are raised as one
`BaseExceptionGroup` (an `ExceptionGroup` unless one of them is a KeyboardInterrupt), each
keeping its own traceback; pytest prints every one of them.

    teardown = Teardown(f"tearing down VM {name}")
    with teardown.step():
        console.close()
    with teardown.step():
        server.stop()
    teardown.finish()
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator, Sequence

__all__ = ["Teardown", "note_undo_failure", "raise_together"]


def note_undo_failure(exc: BaseException, what: str, failure: BaseException) -> None:
    """Undoing a failed start while `exc` propagates, `failure` happened too: `exc` stays the
    error (it is why we are undoing) and `failure` goes into a note on it, traceback and all,
    since nothing else will ever show it."""
    exc.add_note(f"and {what} failed too:\n" + "".join(traceback.format_exception(failure)).rstrip())


def raise_together(errors: Sequence[BaseException], what: str) -> None:
    """Raise nothing, the one error (noted with `what`), or a group of all of them in order.

    Also for work done side by side (downstairs started in threads): every error is kept
    with its own traceback instead of being flattened into one string.
    """
    if not errors:
        return
    if len(errors) == 1:
        errors[0].add_note(f"(while {what})")
        raise errors[0]
    # BaseExceptionGroup(...) is an ExceptionGroup when every member is an Exception.
    raise BaseExceptionGroup(f"{len(errors)} errors {what}", list(errors))


class Teardown:
    def __init__(self, what: str) -> None:
        self.what = what
        self.errors: list[BaseException] = []

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Run one cleanup step; what it raises is kept and the next step still runs.

        BaseException too: a Ctrl-C during one step must not leave the other resources
        behind; it is raised again (in the group) once every step has run.
        """
        try:
            yield
        except BaseException as exc:  # noqa: BLE001 - kept and raised by finish()
            self.errors.append(exc)

    def finish(self) -> None:
        """Raise nothing, the one error, or a group of all of them, in the order they happened."""
        errors, self.errors = self.errors, []
        raise_together(errors, self.what)
