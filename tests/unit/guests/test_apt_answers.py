"""apt-cache's answers kept per apt state (guests/common/debian.py): asked once per state,
asked again when the state changes, and never a wrong or failed answer because of the store.
The integration side is every guest cache check of the suite, which reads real apt-cache
through this path (tests/integration/guests/test_tiny_build_concurrency.py among them)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from guests.common import debian


@pytest.fixture
def fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """An apt-cache on PATH that counts its calls and answers from a file; apt's state is a
    folder of this test's; the store is another."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    answer = tmp_path / "answer"
    answer.write_text("Candidate: 1.0\n")
    script = bin_dir / "apt-cache"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\ncat {answer}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    state = tmp_path / "apt-state"
    (state / "lists").mkdir(parents=True)
    (state / "lists" / "main_Packages").write_text("Package: a\n")
    monkeypatch.setattr(debian, "APT_STATE", (state, tmp_path / "no-such-cache.bin"))
    monkeypatch.setenv(debian.ANSWER_DIR_ENV, str(tmp_path / "answers"))
    return calls, state


def _calls(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def test_asked_once_per_state_and_question(fake_apt: tuple[Path, Path]) -> None:
    calls, _ = fake_apt
    assert debian.candidate_version("busybox") == "1.0"
    assert debian.candidate_version("busybox") == "1.0"
    assert _calls(calls) == ["policy busybox"]
    assert debian.candidate_version("zlib") == "1.0"  # another question is asked
    assert _calls(calls) == ["policy busybox", "policy zlib"]


def test_a_new_apt_state_asks_again(fake_apt: tuple[Path, Path], tmp_path: Path) -> None:
    calls, state = fake_apt
    debian.candidate_version("busybox")
    lists = state / "lists" / "main_Packages"
    lists.write_text("Package: a\nVersion: 2\n")  # as apt-get update would
    (tmp_path / "answer").write_text("Candidate: 2.0\n")
    assert debian.candidate_version("busybox") == "2.0"
    (state / "lists" / "new_Packages").write_text("")  # a new source
    debian.candidate_version("busybox")
    os.utime(lists, ns=(1, 1))  # the same size, another mtime
    debian.candidate_version("busybox")
    assert len(_calls(calls)) == 4


def test_an_unwritable_store_still_answers(fake_apt: tuple[Path, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls, _ = fake_apt
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(debian.ANSWER_DIR_ENV, str(blocker / "answers"))  # cannot be a folder
    assert debian.candidate_version("busybox") == "1.0"
    assert debian.candidate_version("busybox") == "1.0"
    assert len(_calls(calls)) == 2


def test_a_failing_apt_cache_is_not_remembered(fake_apt: tuple[Path, Path], tmp_path: Path) -> None:
    calls, _ = fake_apt
    script = tmp_path / "bin" / "apt-cache"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\necho 'E: no lists' >&2\nexit 100\n")
    with pytest.raises(debian.DebianError, match="E: no lists"):
        debian.candidate_version("busybox")
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\necho 'Candidate: 3.0'\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    assert debian.candidate_version("busybox") == "3.0"
    assert len(_calls(calls)) == 2


def test_a_stored_answer_that_is_not_text_is_asked_again(fake_apt: tuple[Path, Path], tmp_path: Path) -> None:
    calls, _ = fake_apt
    debian.candidate_version("busybox")
    (stored,) = (tmp_path / "answers").iterdir()
    stored.write_bytes(b"\xff\xfe")
    assert debian.candidate_version("busybox") == "1.0"
    assert len(_calls(calls)) == 2


def test_old_answers_are_removed(fake_apt: tuple[Path, Path], tmp_path: Path) -> None:
    answers = tmp_path / "answers"
    answers.mkdir()
    old = answers / "old.txt"
    old.write_text("x")
    os.utime(old, (1, 1))
    debian.candidate_version("busybox")
    assert not old.exists() and len(list(answers.iterdir())) == 1
