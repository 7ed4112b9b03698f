"""No code under sut/ or phd/ runs a command through a shell (style: argv lists only).

A shell turns a path or an id with a space, quote or ``;`` into a different command; the
framework and the reference system build every subprocess from an argv list instead.
The scan is on the AST, so strings and comments that mention these names do not count,
and an aliased import (``import os as o; o.system(...)``) does.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SCANNED = ("sut", "phd")

# Functions that always hand their command to /bin/sh.
SHELL_FUNCTIONS = {
    "os": {"system", "popen"},
    "subprocess": {"getoutput", "getstatusoutput"},
    "asyncio": {"create_subprocess_shell"},
}
# Methods that run a shell whatever object they are called on (asyncio event loops).
SHELL_METHODS = {"create_subprocess_shell", "subprocess_shell"}


@dataclass(frozen=True)
class Finding:
    path: Path
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _aliases(tree: ast.AST) -> tuple[dict[str, str], dict[str, str]]:
    """(local name -> module) for ``import m [as x]``, (local name -> m.f) for ``from m import f``."""
    modules: dict[str, str] = {}
    functions: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in SHELL_FUNCTIONS:
                    modules[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module in SHELL_FUNCTIONS:
            for alias in node.names:
                if alias.name in SHELL_FUNCTIONS[node.module]:
                    functions[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return modules, functions


def _shell_kwarg(call: ast.Call) -> bool:
    # Anything but a literal False may turn the shell on (shell=True, shell=flag, **kwargs aside).
    return any(
        kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False)
        for kw in call.keywords
    )


def scan_source(source: str, path: Path) -> list[Finding]:
    tree = ast.parse(source, filename=str(path))
    modules, functions = _aliases(tree)
    findings = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if _shell_kwarg(node):
            findings.append(Finding(path, node.lineno, "shell= other than False"))
        if isinstance(func, ast.Attribute):
            if isinstance(func.value, ast.Name) and func.attr in SHELL_FUNCTIONS.get(
                modules.get(func.value.id, ""), set()
            ):
                findings.append(Finding(path, node.lineno, f"{modules[func.value.id]}.{func.attr}()"))
            elif func.attr in SHELL_METHODS:
                findings.append(Finding(path, node.lineno, f".{func.attr}()"))
        elif isinstance(func, ast.Name) and func.id in functions:
            findings.append(Finding(path, node.lineno, f"{functions[func.id]}()"))
    return findings


def scan_tree(root: Path) -> list[Finding]:
    findings = []
    for path in sorted(root.rglob("*.py")):
        findings.extend(scan_source(path.read_text(encoding="utf-8"), path))
    return findings


@pytest.mark.parametrize("top", SCANNED)
def test_no_shell_under(top: str) -> None:
    root = REPO / top
    sources = list(root.rglob("*.py"))
    assert sources, f"nothing to scan under {root}: the scan would pass vacuously"
    findings = scan_tree(root)
    assert not findings, "run commands from an argv list, never through a shell:\n" + "\n".join(
        map(str, findings)
    )


PLANTED = '''\
import os
import os as operating_system
import subprocess
from os import system as run
from subprocess import getoutput
import asyncio

subprocess.run("ls", shell=True)
subprocess.Popen(["ls"], shell=use_shell)
os.system("ls")
operating_system.popen("ls")
run("ls")
getoutput("ls")
asyncio.create_subprocess_shell("ls")
loop.subprocess_shell(factory, "ls")
'''

CLEAN = '''\
import platform
import subprocess

subprocess.run(["ls", "-l"], check=True, shell=False)
subprocess.run(["echo", "os.system('x'); shell=True"])  # only a string
platform.system()
sys_info = {"system": 1}
# os.system("ls") in a comment
'''


def test_scan_catches_every_planted_call(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(PLANTED)
    findings = scan_tree(tmp_path)
    # One finding per offending line (lines 8-15 of PLANTED), nothing on the imports.
    assert [(f.line, f.what) for f in sorted(findings, key=lambda f: f.line)] == [
        (8, "shell= other than False"),
        (9, "shell= other than False"),
        (10, "os.system()"),
        (11, "os.popen()"),
        (12, "os.system()"),
        (13, "subprocess.getoutput()"),
        (14, "asyncio.create_subprocess_shell()"),
        (15, ".subprocess_shell()"),
    ], "\n".join(map(str, findings))


def test_scan_leaves_argv_calls_and_lookalikes_alone(tmp_path: Path) -> None:
    (tmp_path / "clean.py").write_text(CLEAN)
    assert scan_tree(tmp_path) == []
