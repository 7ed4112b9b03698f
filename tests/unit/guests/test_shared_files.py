"""Each recipe's input hash covers the guests/common/ modules it imports, and only those.

A recipe lists them in ``SHARED_FILES``; an edit of one rebuilds every guest that imports it,
a move or rename of the folder rebuilds none (the key is on contents). ``recipe.py`` is the
build protocol (cache, lock, swap): it shapes no guest and is in no key.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from guests.alpine import build as alpine_build
from guests.common.recipe import COMMON_DIR, shared_digest
from guests.debian import build as debian_build
from guests.tiny import build as tiny_build

RECIPES = {"tiny": tiny_build, "alpine": alpine_build, "debian": debian_build}
PROTOCOL = "recipe.py"


def _common_imports(source: Path) -> set[str]:
    """File names in guests/common/ that `source` imports (``from guests.common[.x] import y``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module == "guests.common" or node.module.startswith("guests.common.")):
            if node.module == "guests.common":
                found |= {f"{alias.name}.py" for alias in node.names}
            else:
                found.add(node.module.removeprefix("guests.common.").replace(".", "/") + ".py")
    return found


def _imported_closure(recipe_dir: Path) -> set[str]:
    """The guests/common/ files a recipe imports, directly or through each other."""
    todo = set().union(*(_common_imports(path) for path in recipe_dir.glob("*.py")))
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo |= _common_imports(COMMON_DIR / name)
    return seen


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shared_files_are_the_common_modules_the_recipe_imports(name: str) -> None:
    module: ModuleType = RECIPES[name]
    imported = _imported_closure(module.RECIPE_DIR)
    assert PROTOCOL in imported, "every recipe builds through guests/common/recipe.py"
    assert set(module.SHARED_FILES) == imported - {PROTOCOL}
    assert all((COMMON_DIR / f).is_file() for f in module.SHARED_FILES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_an_edit_of_a_shared_file_changes_the_key(name: str, tmp_path: Path) -> None:
    module: ModuleType = RECIPES[name]
    common = tmp_path / "common"
    shutil.copytree(COMMON_DIR, common, ignore=shutil.ignore_patterns("__pycache__"))
    first = module.recipe_files_digest(module.RECIPE_DIR, common)
    assert first == module.recipe_files_digest()  # the copy is the same files
    for shared in module.SHARED_FILES:
        original = (common / shared).read_bytes()
        (common / shared).write_bytes(original + b"# edited\n")
        assert module.recipe_files_digest(module.RECIPE_DIR, common) != first, shared
        (common / shared).write_bytes(original)
    (common / PROTOCOL).write_bytes((common / PROTOCOL).read_bytes() + b"# edited\n")
    assert module.recipe_files_digest(module.RECIPE_DIR, common) == first


def test_the_shared_digest_is_on_contents_not_names(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("one\n")
    (tmp_path / "b.py").write_text("two\n")
    first = shared_digest(["a.py", "b.py"], tmp_path)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "x.py").write_text("two\n")
    (moved / "y.py").write_text("one\n")
    assert shared_digest(["x.py", "y.py"], moved) == first
    (moved / "y.py").write_text("three\n")
    assert shared_digest(["x.py", "y.py"], moved) != first
