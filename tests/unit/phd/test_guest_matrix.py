"""`phd_guest`: a test that takes it runs once per guest of --phd-guests (pytester)."""

from __future__ import annotations

import pytest

from phd.vm.guest import DebianGuest, TinyGuest, adapter_for

pytest_plugins = ["pytester"]

TEST_FILE = """
def test_guest(phd_guest):
    print("GUEST", phd_guest)

def test_plain():
    pass
"""


def test_matrix_from_the_option(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TEST_FILE)
    result = pytester.runpytest("--collect-only", "-q", "--phd-guests", "debian, tiny")
    assert result.ret == 0
    ids = [line for line in result.outlines if "::" in line]
    assert ids == ["test_matrix_from_the_option.py::test_guest[debian]",
                   "test_matrix_from_the_option.py::test_guest[tiny]",
                   "test_matrix_from_the_option.py::test_plain"]


def test_matrix_from_the_environment_and_default(pytester: pytest.Pytester,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(TEST_FILE)
    monkeypatch.delenv("PHD_GUESTS", raising=False)
    monkeypatch.setenv("PHD_GUEST", "alpine")
    result = pytester.runpytest("--collect-only", "-q")
    assert "test_matrix_from_the_environment_and_default.py::test_guest[alpine]" in result.outlines
    monkeypatch.setenv("PHD_GUESTS", "tiny,debian")
    result = pytester.runpytest("--collect-only", "-q")
    assert [line for line in result.outlines if "test_guest[" in line] == [
        "test_matrix_from_the_environment_and_default.py::test_guest[tiny]",
        "test_matrix_from_the_environment_and_default.py::test_guest[debian]"]


def test_debian_adapter() -> None:
    assert adapter_for("debian") is DebianGuest
    assert (DebianGuest.login_prompt, DebianGuest.shell_prompt) == ("debian login: ", "root@debian:~# ")
    assert DebianGuest.has_sshd and not TinyGuest.has_sshd
