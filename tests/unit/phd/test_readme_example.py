"""The README's complete test example stays in step with the API without a VM: it is taken
from the README, compiled and executed (which imports every name it uses and defines the
test). tests/suite/test_readme_example.py runs the same block for real in the suite."""

from __future__ import annotations

import inspect

from tests.suite import test_readme_example as suite_copy


def test_the_readme_example_imports_and_defines_a_test() -> None:
    namespace: dict[str, object] = {}
    exec(compile(suite_copy.readme_example(), "README.md example", "exec"), namespace)
    test = namespace["test_data_survives_reboot_and_successor"]
    assert callable(test)
    assert list(inspect.signature(test).parameters) == ["vm_factory", "disk_factory", "phd_guest"]


def test_the_suite_collects_the_readme_example_with_its_markers() -> None:
    assert callable(getattr(suite_copy, "test_data_survives_reboot_and_successor", None))
    marks = {mark.name for mark in suite_copy.pytestmark}  # type: ignore[attr-defined]
    assert {"vm", "crucible"} <= marks
