"""Mutation check of the seed-critical modules: do their unit tests bite?

Usage: ci/mutation [--modules a.py,b.py] [--threshold 0.95] [--keep]

mutmut (3.x, pinned in the `test` extra) mutates the request queue, the VCR rules and the
state driver (driver.py and the state monitor of states.py) one change at a time and runs
only their fast unit tests (TESTS below, named file by file) against each mutant: of those,
the tests that reach the mutated function. A mutant is killed when a test fails, survives
when they all pass.

It never touches this checkout: the modules' package, the selected tests and pyproject.toml
are copied to a temporary directory and mutmut runs there (with one worker, niced, so the
other tests on the machine keep their cores); the copy is removed afterwards (--keep leaves it
for `mutmut browse`).

Writes results/mutation.json:
  {"threshold": 0.95, "ok": bool, "wall_s": ..., "tests": [test files], "modules": {path: {
      "total", "killed", "survived", "timeout", "no_tests", "suspicious", "excluded",
      "score", "ok", "surviving": [{"name", "status", "line", "diff"}],
      "excluded_mutants": [{"name", "status", "line", "diff", "reason"}]}}}
("surviving" lists every mutant not detected, "no tests" ones included) and exits 1 when a
module scores below the threshold. mutmut's own output goes to results/mutation-mutmut.log.

score = detected / (total - excluded), detected = killed + timeout (a mutant that made a test
hang until mutmut's CPU limit was noticed too; the tests' own deadlines turn most hangs into
failures, i.e. kills). "no tests" (no selected test reaches the function) and "suspicious"
count as not detected.

Excluded: a surviving mutant whose diff changes nothing but string literals, each of them
message text - the message (last positional) argument of an exception's constructor (a call
of a name ending in Error or Exception), or any argument of a logging call (.debug, .info,
.warning, .error, .exception, .critical, .log). A rule code passed to an exception before
its message (ReplaceRuleError("no-change", "...")) is logic, not text, and is never
excluded. The rule is applied to the diff, not by pragmas in the source, and every excluded
mutant is listed with its reason.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
OUT = RESULTS / "mutation.json"
LOG = RESULTS / "mutation-mutmut.log"
THRESHOLD = 0.95
NICE = 10

# module -> its unit test files (globs under the repo root). Only these tests run against the
# module's mutants (mutmut runs, per mutant, the selected tests that reach the mutated
# function), so each mutant costs seconds, not the minutes of the whole tests/ tree.
TESTS: dict[str, list[str]] = {
    "sut/server/request_queue.py": ["tests/unit/server/test_request_queue*.py",
                                    "tests/unit/server/test_queue_*.py"],
    "sut/storage/vcr.py": ["tests/unit/storage/test_vcr*.py"],
    "sut/server/driver.py": ["tests/unit/server/test_driver*.py"],
    "sut/server/states.py": ["tests/unit/server/test_states*.py", "tests/unit/server/test_driver*.py"],
}
# What the tests import besides the modules under test: the package (copied whole; only
# the modules above are mutated), the test packages' __init__ and the driver's fakes.
SUPPORT = ["sut", "pyproject.toml", "tests/__init__.py", "tests/unit/__init__.py",
           "tests/unit/server/__init__.py", "tests/unit/server/fakes.py",
           "tests/unit/storage/__init__.py"]
# Per test run: hypothesis explores the same examples every time (a mutant's verdict must
# not depend on the draw), and a mutant that makes a test wait forever fails by timeout.
PYTEST_ARGS = ["-p", "no:cacheprovider", "--hypothesis-seed=0", "--timeout=60"]

LOG_METHODS = frozenset({"debug", "info", "warning", "error", "exception", "critical", "log"})
DETECTED = frozenset({"killed", "timeout"})


# --- running mutmut in a copy -------------------------------------------------------------------
def test_files(modules: list[str]) -> list[str]:
    files = sorted({p.relative_to(ROOT).as_posix() for m in modules for g in TESTS[m] for p in ROOT.glob(g)})
    if not files:
        raise SystemExit(f"no unit test files match {[TESTS[m] for m in modules]}")
    return files


def setup_cfg(modules: list[str], tests: list[str]) -> str:
    def listed(values: list[str]) -> str:
        return "".join(f"\n    {v}" for v in values)

    # Lists as mutmut's setup.cfg reader wants them (one value per line). The copy is not a
    # git checkout: no git change detection.
    return ("[mutmut]\nsource_paths = sut\n"
            f"only_mutate ={listed(modules)}\n"
            f"pytest_add_cli_args_test_selection ={listed(tests)}\n"
            f"pytest_add_cli_args ={listed(PYTEST_ARGS)}\n"
            "use_git_change_detection = false\n")


def copy_tree(work: Path, tests: list[str]) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for rel in [*SUPPORT, *tests]:
        src, dst = ROOT / rel, work / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dst)


def mutmut(work: Path, *args: str) -> str:
    """Run a quick mutmut command (results, show) in ``work``; returns its output."""
    argv = [sys.executable, "-m", "mutmut", *args]
    proc = subprocess.run(argv, cwd=work, stdin=subprocess.DEVNULL, check=False,  # noqa: S603 - argv list
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"mutmut {' '.join(args)} exited {proc.returncode} (in {work}):\n"
                         f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def run_mutants(work: Path) -> None:
    """`mutmut run` with one worker, niced, its output in LOG. Ctrl-C / SIGINT reaches it as
    SIGINT too (mutmut stops its workers on KeyboardInterrupt); we wait for it to finish."""
    argv = ["nice", "-n", str(NICE), sys.executable, "-m", "mutmut", "run", "--max-children", "1"]
    with LOG.open("w") as log:
        proc = subprocess.Popen(argv, cwd=work, stdin=subprocess.DEVNULL,  # noqa: S603 - argv list
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if rc != 0:
        tail = "\n".join(LOG.read_text(errors="replace").replace("\r", "\n").splitlines()[-30:])
        raise SystemExit(f"mutmut run exited {rc} (in {work}; whole log {LOG}):\n{tail}")


def statuses(work: Path) -> dict[str, str]:
    """mutant name -> status, from `mutmut results --all true` ("    name: status")."""
    out = {}
    for line in mutmut(work, "results", "--all", "true").splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and name.startswith("sut."):
            out[name] = status
    return out


def diff_of(work: Path, name: str) -> str:
    text = mutmut(work, "show", name)
    return "\n".join(line for line in text.splitlines() if not line.startswith("# "))


# --- where a mutant is, and whether it only changes message text -------------------------------
def function_of(name: str, module: str) -> tuple[str | None, str]:
    """(class, function) of a mutant name: `sut.server.driver.xǁStateDriverǁ_run__mutmut_3` ->
    ("StateDriver", "_run"); `sut.storage.vcr.x_parse_target__mutmut_1` -> (None, "parse_target")."""
    local = name.removeprefix(module_name(module) + ".").rsplit("__mutmut_", 1)[0]
    if local.startswith("xǁ"):
        cls, func = local[2:].split("ǁ", 1)
        return cls, func
    return None, local.removeprefix("x_")


def module_name(module: str) -> str:
    return module.removesuffix(".py").replace("/", ".")


Function = ast.FunctionDef | ast.AsyncFunctionDef


def find_function(tree: ast.Module, cls: str | None, func: str) -> Function | None:
    body = tree.body
    if cls is not None:
        owner = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == cls), None)
        body = owner.body if owner is not None else []
    return next((n for n in body if isinstance(n, Function) and n.name == func), None)


def changed_pairs(diff: str) -> tuple[list[tuple[str, str]], bool]:
    """The (removed, added) line pairs of a diff; False when its lines do not pair up."""
    removed = [line[1:] for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return list(zip(removed, added, strict=False)), len(removed) == len(added) and bool(removed)


def locate(lines: list[str], node: ast.AST | None, removed: str) -> int | None:
    """The line number of ``removed`` (a line of the mutated function) in the original file."""
    if node is None or not removed.strip():
        return None
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    last = getattr(node, "end_lineno", None) or len(lines)
    for number in range(first, last + 1):
        if lines[number - 1].strip() == removed.strip():
            return number
    return None


def tokens(line: str) -> list[tuple[int, str, int]]:
    """(type, text, column) of a line of code, which may be a fragment of a statement."""
    out = []
    skip = {tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT,
            tokenize.COMMENT}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(line.strip()).readline):
            if tok.type not in skip:
                out.append((tok.type, tok.string, tok.start[1]))
    except (tokenize.TokenError, SyntaxError):
        pass  # an open bracket at the end of the fragment: the tokens so far are what we need
    return out


def message_spans(tree: ast.Module) -> list[tuple[tuple[int, int], tuple[int, int], str]]:
    """(start, end, why) of every expression that is message text by the rule in the docstring."""
    spans = []

    def span(node: ast.expr, why: str) -> None:
        spans.append(((node.lineno, node.col_offset), (node.end_lineno or node.lineno,
                                                       node.end_col_offset or 0), why))

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        callee = (func.attr if isinstance(func, ast.Attribute)
                  else func.id if isinstance(func, ast.Name) else "")
        if isinstance(func, ast.Attribute) and callee in LOG_METHODS:
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                span(arg, f"log text (argument of .{callee}())")
        elif callee.endswith(("Error", "Exception")) and node.args:
            span(node.args[-1], f"exception message (last argument of {callee}())")
    return spans


def message_only(source: str, tree: ast.Module, diff: str, cls: str | None, func: str) -> str | None:
    """The reason when the mutant changes only message text, else None."""
    pairs, paired = changed_pairs(diff)
    if not paired:
        return None
    lines = source.splitlines()
    node = find_function(tree, cls, func)
    spans = message_spans(tree)
    reasons = set()
    for old, new in pairs:
        number = locate(lines, node, old)
        a, b = tokens(old), tokens(new)
        if number is None or len(a) != len(b) or not a:
            return None
        indent = len(lines[number - 1]) - len(lines[number - 1].lstrip())
        for (ta, sa, col), (tb, sb, _) in zip(a, b, strict=True):
            if ta != tb or (sa != sb and ta != tokenize.STRING):
                return None  # code changed, not only a literal
            if sa == sb:
                continue
            where = (number, indent + col)
            why = next((w for start, end, w in spans if start <= where < end), None)
            if why is None:
                return None  # a literal that is not message text (a rule code, a key, a name)
            reasons.add(why)
    return "; ".join(sorted(reasons)) or None


# --- report ---------------------------------------------------------------------------------------
@dataclass
class ModuleReport:
    module: str
    counts: dict[str, int] = field(default_factory=dict)
    surviving: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def score(self) -> float | None:
        counted = self.total - len(self.excluded)
        detected = sum(n for status, n in self.counts.items() if status in DETECTED)
        return round(detected / counted, 4) if counted else None

    def as_json(self, threshold: float) -> dict[str, Any]:
        score = self.score
        survived = self.counts.get("survived", 0) - len(self.excluded)
        return {"total": self.total, "killed": self.counts.get("killed", 0), "survived": survived,
                "timeout": self.counts.get("timeout", 0), "no_tests": self.counts.get("no tests", 0),
                "suspicious": self.counts.get("suspicious", 0), "excluded": len(self.excluded),
                "score": score, "ok": score is not None and score >= threshold,
                "surviving": self.surviving, "excluded_mutants": self.excluded}


def report(work: Path, modules: list[str]) -> list[ModuleReport]:
    found = statuses(work)
    out = []
    for module in modules:
        rep = ModuleReport(module)
        source = (ROOT / module).read_text()
        tree = ast.parse(source)
        lines = source.splitlines()
        prefix = module_name(module) + "."
        for name, status in sorted(found.items(), key=lambda kv: _natural(kv[0])):
            if not name.startswith(prefix):
                continue
            rep.counts[status] = rep.counts.get(status, 0) + 1
            if status in DETECTED:
                continue
            diff = diff_of(work, name)
            cls, func = function_of(name, module)
            pairs, _ = changed_pairs(diff)
            line = locate(lines, find_function(tree, cls, func), pairs[0][0]) if pairs else None
            entry = {"name": name, "status": status, "line": line, "diff": diff}
            reason = message_only(source, tree, diff, cls, func) if status == "survived" else None
            if reason is not None:
                rep.excluded.append({**entry, "reason": f"message-only: {reason}"})
            else:
                rep.surviving.append(entry)
        out.append(rep)
    return out


def _natural(name: str) -> tuple[str, int]:
    base, _, number = name.rpartition("__mutmut_")
    return (base, int(number)) if number.isdigit() else (name, 0)


def print_table(reports: list[ModuleReport], threshold: float) -> None:
    width = max(len(r.module) for r in reports)
    print(f"\n{'module':<{width}}  total  killed  survived  timeout  no tests  excluded  score")
    for r in reports:
        j = r.as_json(threshold)
        score = "-" if j["score"] is None else f"{100 * j['score']:.1f}%"
        flag = "" if j["ok"] else f"  BELOW {100 * threshold:.0f}%"
        print(f"{r.module:<{width}}  {j['total']:>5}  {j['killed']:>6}  {j['survived']:>8}  {j['timeout']:>7}"
              f"  {j['no_tests']:>8}  {j['excluded']:>8}  {score:>6}{flag}")
        for s in r.surviving:
            changed = [ln for ln in s["diff"].splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]
            print(f"  {s['status']}: {r.module}:{s['line']}  {' | '.join(c.strip() for c in changed)[:150]}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ci/mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", default=",".join(TESTS),
                        help=f"comma-separated modules (default: all of {', '.join(TESTS)})")
    parser.add_argument("--threshold", type=float, default=THRESHOLD)
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (prints where)")
    args = parser.parse_args(argv)
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = [m for m in modules if m not in TESTS]
    if unknown:
        raise SystemExit(f"unknown module(s) {unknown}; known: {list(TESTS)}")

    t0 = time.monotonic()
    RESULTS.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="phd-mutation-"))
    try:
        tests = test_files(modules)
        copy_tree(work, tests)
        (work / "setup.cfg").write_text(setup_cfg(modules, tests))
        print(f"mutmut on {', '.join(modules)} against {len(tests)} test files in {work} (log: {LOG})",
              flush=True)
        run_mutants(work)
        reports = report(work, modules)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    wall = round(time.monotonic() - t0, 1)
    ok = all(r.as_json(args.threshold)["ok"] for r in reports)
    OUT.write_text(json.dumps({"threshold": args.threshold, "ok": ok, "wall_s": wall,
                               "tests": tests, "modules": {r.module: r.as_json(args.threshold)
                                                           for r in reports}}, indent=2) + "\n")
    print_table(reports, args.threshold)
    print(f"\nwrote {OUT.relative_to(ROOT)} in {wall:.0f}s: {'pass' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
