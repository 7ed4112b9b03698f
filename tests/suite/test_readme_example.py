"""The README's complete test example, run for real: its code block is taken from README.md
and executed as this module's body, so its `pytestmark` and its test are collected here with
the real fixtures (once per guest of --phd-guests). Change the README and this runs the
change; tests/unit/phd/test_readme_example.py checks, without a VM, that the block is there."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "# tests/suite/test_my_feature.py"


def readme_example() -> str:
    """The Python block of "Writing a test" that starts with MARKER, up to its closing fence."""
    text = README.read_text()
    start = text.index(MARKER)
    return text[start:text.index("```", start)]


exec(compile(readme_example(), str(README), "exec"), globals())

# Per PR on tiny: the example's reboot and successor are three boots, two minutes on debian
# (a guest-agnostic test); debian runs it in the nightly.
pytestmark = [*globals().get("pytestmark", []), pytest.mark.pr_guests("tiny")]  # noqa: F821
