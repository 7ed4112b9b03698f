"""The README's complete test example stays in step with the API: it is taken from the
README, compiled and executed (which imports every name it uses and defines the test).
Running it for real takes a VM; it was run when written, and `pytest` on a copy runs it."""

from __future__ import annotations

import inspect
from pathlib import Path

README = Path(__file__).resolve().parents[3] / "README.md"
MARKER = "# tests/suite/test_my_feature.py"


def _example() -> str:
    text = README.read_text()
    start = text.index(MARKER)
    return text[start:text.index("```", start)]


def test_the_readme_example_imports_and_defines_a_test() -> None:
    namespace: dict[str, object] = {}
    exec(compile(_example(), "README.md example", "exec"), namespace)
    test = namespace["test_data_survives_reboot_and_successor"]
    assert callable(test)
    assert list(inspect.signature(test).parameters) == ["vm_factory", "disk_factory", "phd_guest"]
