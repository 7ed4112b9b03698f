"""phd's folders are layers (README "Layout"): each imports at run time only from itself and
the layers below it. Imports under ``if TYPE_CHECKING:`` are annotations and may look up."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PHD = Path(__file__).resolve().parents[3] / "phd"
# Each folder and what it may import at run time, besides itself.
BELOW = {
    "core": set(),
    "artifacts": {"core"},
    "storage": {"core"},
    "vm": {"core", "artifacts", "storage"},
}


def _runtime_imports(path: Path) -> set[str]:
    """Modules of phd that ``path`` imports when it runs (anywhere, including in functions)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            skipped |= {id(inner) for inner in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "phd" or node.module.startswith("phd."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("phd.")}
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "top"


@pytest.mark.parametrize("folder", sorted(BELOW))
def test_a_layer_imports_only_itself_and_the_layers_below(folder: str) -> None:
    allowed = BELOW[folder] | {folder}
    wrong = {f"{path.relative_to(PHD.parent)} imports {module}"
             for path in sorted((PHD / folder).glob("*.py"))
             for module in _runtime_imports(path) if _layer(module) not in allowed}
    assert not wrong, "\n".join(sorted(wrong))


def test_every_module_lives_in_a_layer_or_is_a_known_top_level_one() -> None:
    top = {p.name for p in PHD.glob("*.py")}
    assert top == {"__init__.py", "cli.py", "config.py", "framework.py", "plugin.py"}
    folders = {p.name for p in PHD.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(BELOW)
