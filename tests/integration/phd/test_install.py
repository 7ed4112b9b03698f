"""phd works from a plain `pip install` (no checkout, no editable install): a fresh venv
outside the repository gets the package, and a suite test run from a folder outside the
repository boots the tiny guest through the installed reference server.

The suite test uses the session's artifact cache (--phd-artifact-dir, by default
~/.cache/phd/artifacts): the installed tiny recipe has the same files, so the same input
hash, and its build is reused instead of made again; the test checks that first, so a
packaging mistake fails here rather than rebuilding the shared cache from other files.
About 30 s here with a warm pip cache (install ~20 s, the suite test ~10 s); a cold cache
downloads every dependency. Offline (no package index) it skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guests.tiny.build import recipe_files_digest as tiny_files_digest
from phd.config import PhdConfig
from sut.storage.image.build import image_tag

INSTALL_TIMEOUT_S = 900
# pytest-timeout's 600 s default (pyproject) is too short for a cold pip cache.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(3 * INSTALL_TIMEOUT_S)]

REPO = Path(__file__).resolve().parents[3]
SMOKE = REPO / "tests" / "suite" / "test_smoke.py"
# Top-level entries of the checkout that are not sources (a copy is installed, so that pip's
# in-tree build writes its build/ and egg-info there, not into the checkout).
NOT_SOURCES = {".git", ".venv", "results", "build", "dist", ".mypy_cache", ".ruff_cache",
               ".hypothesis", ".pytest_cache", "allure-results", ".phd-tmp", ".cache-dev"}
OFFLINE_SIGNS = ("Temporary failure in name resolution", "NewConnectionError",
                 "No matching distribution found", "Network is unreachable")

DIGEST_SCRIPT = ("from guests.tiny.build import RECIPE_DIR, recipe_files_digest; "
                 "print(RECIPE_DIR); print(recipe_files_digest())")
WHERE_TEST = '''
import sys
from pathlib import Path


def test_everything_comes_from_the_installed_package(phd_config):
    import guests
    import phd
    import sut

    venv = Path(sys.prefix)
    for module in (phd, sut, guests):
        assert Path(module.__file__).is_relative_to(venv), module.__file__
    assert phd_config.manifest.is_relative_to(venv), phd_config.manifest
    assert phd_config.repo_root.is_relative_to(venv), phd_config.repo_root
    assert phd_config.server_cmd[0] == sys.executable
'''


def _ignore_non_sources(folder: str, names: list[str]) -> set[str]:
    ignored = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    if Path(folder) == REPO:
        ignored |= NOT_SOURCES & set(names)
    return ignored


def _env() -> dict[str, str]:
    """This environment without what would point the child at the checkout or another venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PHD_MANIFEST", "PYTEST_ADDOPTS")
           and not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=_env(), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _tail(proc: subprocess.CompletedProcess[str], lines: int = 60) -> str:
    return "\n".join((proc.stdout + proc.stderr).splitlines()[-lines:])


def test_installed_package_runs_a_suite_test_outside_the_repo(
        tmp_path_factory: pytest.TempPathFactory, phd_config: PhdConfig) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (run ci/bootstrap)")
    work = tmp_path_factory.mktemp("install")
    assert not work.resolve().is_relative_to(REPO), f"{work} is inside the checkout"
    timings: dict[str, float] = {}

    started = time.monotonic()
    source = work / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=_ignore_non_sources)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                   stdin=subprocess.DEVNULL, capture_output=True)
    python = venv / "bin" / "python"
    # Not editable: the wheel's files are all the venv gets. --no-compile: byte-compiling every
    # dependency costs a quarter of the install and proves nothing here.
    install = _run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", str(source)], work,
                   INSTALL_TIMEOUT_S)
    if install.returncode != 0 and any(sign in install.stderr for sign in OFFLINE_SIGNS):
        pytest.skip(f"pip cannot reach the package index here: {_tail(install, 5)}")
    assert install.returncode == 0, f"pip install {source} failed:\n{_tail(install)}"
    timings["copy + venv + pip install"] = time.monotonic() - started
    shutil.rmtree(source)  # the venv must not need it

    project = work / "project"
    project.mkdir()
    # The installed tiny recipe (its folder and the guests/common/ modules it imports) is file
    # for file the checkout's: same input hash, so the build in the shared cache is reused.
    digest = _run([str(python), "-c", DIGEST_SCRIPT], project, 60)
    assert digest.returncode == 0, _tail(digest)
    installed_recipe, installed_digest = digest.stdout.split()
    assert Path(installed_recipe).is_relative_to(venv), installed_recipe
    assert installed_digest == tiny_files_digest(), (
        "the installed guests/tiny or guests/common differs from the checkout's (a file missing "
        "from the package data, or an exec bit lost): its build would not be the cached one")

    # The downstairs image is built from the installed sut (its Dockerfile is package data)
    # and gets the tag the checkout's sources give: the image already built is reused.
    tag = _run([str(python), "-m", "sut.storage.image", "tag"], project, 60)
    assert tag.returncode == 0, _tail(tag)
    assert tag.stdout.strip() == image_tag(), "the installed sut's downstairs image is not the checkout's"

    shutil.copy(SMOKE, project / "test_smoke.py")
    (project / "test_where.py").write_text(WHERE_TEST)
    started = time.monotonic()
    run = _run([str(python), "-m", "pytest", "-p", "no:cacheprovider", "-rA",
                "test_where.py", "test_smoke.py::test_boot_to_shell_and_run_commands",
                "--phd-guest", "tiny", f"--phd-artifact-dir={phd_config.artifact_dir}",
                f"--phd-tmp-dir={work / 'phd-tmp'}", "--phd-output-mode", "file"],
               project, INSTALL_TIMEOUT_S)
    timings["suite test from the install"] = time.monotonic() - started
    sys.stderr.write("\n" + "".join(f"phd install test: {k}: {v:.1f} s\n" for k, v in timings.items()))
    assert run.returncode == 0, f"the suite test failed from the installed package:\n{_tail(run)}"
    assert "2 passed" in run.stdout, _tail(run)
