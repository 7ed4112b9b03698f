"""Run the PHD suite once per regression switch and once with none; tabulate the failures."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from sut.server.regressions import ALL_REGRESSIONS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def failed_tests(junit: Path) -> list[str]:
    failed = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return sorted(failed)


def run(switch: str | None, extra: list[str]) -> list[str]:
    junit = RESULTS / f"junit-regression-{switch or 'none'}.xml"
    argv = [sys.executable, "-m", "pytest", "tests/suite", "-q", "-p", "no:cacheprovider",
            f"--junitxml={junit}", *extra]
    if switch:
        argv.append(f"--phd-regression={switch}")
    print(f"== {switch or 'none'}: {' '.join(argv[3:])}", flush=True)
    proc = subprocess.run(argv, cwd=ROOT, stdin=subprocess.DEVNULL, check=False)  # noqa: S603
    if not junit.exists():
        raise SystemExit(f"pytest wrote no report for {switch or 'none'} (exit {proc.returncode})")
    return failed_tests(junit)


def main() -> int:
    RESULTS.mkdir(exist_ok=True)
    extra = sys.argv[1:]
    table: dict[str, list[str]] = {"none": run(None, extra)}
    for switch in sorted(ALL_REGRESSIONS):
        table[switch] = run(switch, extra)
    (RESULTS / "regressions.json").write_text(json.dumps(table, indent=2) + "\n")
    width = max(len(k) for k in table)
    print(f"\n{'regression':<{width}}  tests that failed")
    for switch, failed in table.items():
        shown = ", ".join(t.rsplit("::", 1)[-1] for t in failed) or "-"
        print(f"{switch:<{width}}  {shown}")
    uncaught = [s for s, f in table.items() if s != "none" and not f]
    if table["none"]:
        print(f"\nFAIL: the suite is not green without a regression: {table['none']}")
        return 1
    if uncaught:
        print(f"\nnot caught by any test yet: {', '.join(uncaught)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
