"""What a session shows while it builds (phd.core.progress through the plugin), seen from a user's
project: a slow fake recipe, built by one of two xdist workers while the other waits."""

from __future__ import annotations

import re

import pytest

from ci.pipeline import LEAN  # nested sessions start without plugins they do not use

pytest_plugins = ["pytester"]

# Counts its steps ("[1/2]") like the image build's "Step 1/6", so the lines carry a percentage;
# takes 2 x 2.5 s, longer than a cache hit (phd.core.progress.SHOW_AFTER_S), so the terminal shows it.
RECIPE = r"""#!/usr/bin/env python3
import json, os, sys, time
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--out") + 1])
if (out / "guest.json").is_file():
    print(f"slow: {out} is up to date", file=sys.stderr)
    print(out)
    sys.exit(0)
out.mkdir(parents=True, exist_ok=True)
print("slow: [1/2] fetching the kernel", file=sys.stderr, flush=True)
time.sleep(2.5)
# Under xdist, hold the build until the other worker says it waits (bounded): on a loaded
# machine that worker may start later than a build of fixed length takes.
if os.environ.get("SLOW_RECIPE_AWAIT_WAITER"):
    deadline = time.monotonic() + 60
    logs = Path(os.environ["SLOW_RECIPE_AWAIT_WAITER"])
    while time.monotonic() < deadline and not any(
        "waiting for gw" in log.read_text() for log in logs.glob("*/progress.log")
    ):
        time.sleep(0.1)
print("slow: [2/2] writing the initramfs", file=sys.stderr, flush=True)
time.sleep(2.5)
for name in ("vmlinuz", "initrd.img", "cmdline"):
    (out / name).write_text("x\n")
(out / "guest.json").write_text(json.dumps({"recipe": "slow", "schema": 1}))
print(out)
"""

TESTS = """
import pytest

@pytest.mark.parametrize("i", range(2))
def test_needs_the_guest(i, phd_framework):
    assert phd_framework.artifacts.ensure("slow").is_dir()
"""


def project(pytester: pytest.Pytester) -> list[str]:
    """A project whose `guests` package (found first: the inner pytest runs in its folder)
    holds the slow recipe; the options of a run on it."""
    build = pytester.path / "guests" / "slow" / "build"
    build.parent.mkdir(parents=True)
    (pytester.path / "guests" / "__init__.py").write_text("")
    build.write_text(RECIPE)
    build.chmod(0o755)
    manifest = pytester.path / "artifacts.toml"
    manifest.write_text('[artifacts.slow]\nkind = { guest_os = "tiny" }\n'
                        'source = { recipe = "guests/slow" }\n')
    pytester.makepyfile(test_slow=TESTS)
    return ["-p", "no:cacheprovider", f"--phd-manifest={manifest}",
            f"--phd-artifact-dir={pytester.path / 'cache'}", f"--phd-tmp-dir={pytester.path / 'results'}"]


def run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, list[str]]:
    # --dist each: both workers need the guest (with load scheduling xdist may give both tests
    # to one worker, and nobody would wait); the recipe holds its build until one waits.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLOW_RECIPE_AWAIT_WAITER", str(pytester.path / "results"))
        result = pytester.runpytest_subprocess(*LEAN, *project(pytester), "-n", "2", "--dist", "each", *args,
                                               timeout=180)
    logs = list((pytester.path / "results").glob("*/progress.log"))
    assert len(logs) == 1, logs  # one log for the session, shared by its workers
    return result, logs[0].read_text().splitlines()


def phd_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("phd: ")]


def test_one_worker_builds_the_other_says_it_waits_each_line_once(pytester: pytest.Pytester) -> None:
    result, log = run(pytester)
    result.assert_outcomes(passed=4)
    shown = phd_lines(result.stdout.str())
    started = [m.group(1) for line in shown
               if (m := re.match(r"phd: build slow \[(gw\d)\] 0\.0 s: started", line))]
    assert sorted(started) == ["gw0", "gw1"], shown  # one to build, one to wait
    steps = [line for line in shown if "slow: [" in line]
    assert len(steps) == 2, shown
    builder = steps[0].split("[")[1].split("]")[0]
    waiter = "gw1" if builder == "gw0" else "gw0"
    prefix = rf"phd: build slow \[{builder}\] [\d.]+ s"
    assert re.fullmatch(rf"{prefix} 0%: slow: \[1/2\] fetching the kernel", steps[0])
    assert re.fullmatch(rf"{prefix} 50%: slow: \[2/2\] writing the initramfs", steps[1])
    assert len([line for line in shown if re.match(rf"{prefix}: finished in ", line)]) == 1
    waiting = [line for line in shown if line.startswith(f"phd: build slow [{waiter}]") and "waiting" in line]
    assert len(waiting) == 1 and f"waiting for {builder} (building since" in waiting[0], shown
    # The waiter's own pass over the recipe afterwards is a cache hit: logged, not shown.
    assert not [line for line in shown if "is up to date" in line]
    assert any(line.endswith("is up to date") for line in log if line.split(" ")[1] == ".")
    # Every shown line is in the session's log, marked as shown.
    assert sorted(shown) == sorted(line.split(" ", 2)[2] for line in log if line.split(" ")[1] == "+")


def test_quiet_keeps_the_terminal_clear_and_the_log_full(pytester: pytest.Pytester) -> None:
    result, log = run(pytester, "-q")
    result.assert_outcomes(passed=4)
    assert phd_lines(result.stdout.str()) == []
    assert any("[2/2] writing the initramfs" in line for line in log)
    assert any("waiting for gw" in line for line in log)


def test_without_xdist_the_build_shows_between_the_file_name_and_its_results(
        pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(*LEAN, *project(pytester), "-p", "no:xdist", timeout=120)
    result.assert_outcomes(passed=2)
    result.stdout.re_match_lines([
        r"test_slow\.py $",
        r"phd: build slow 0\.0 s: started$",
        r"phd: build slow [\d.]+ s 0%: slow: \[1/2\] fetching the kernel$",
        r"phd: build slow [\d.]+ s 50%: slow: \[2/2\] writing the initramfs$",
        r"phd: build slow [\d.]+ s 50%: .*/cache/guests/slow$",
        r"phd: build slow [\d.]+ s: finished in [\d.]+ s$",
        r"test_slow\.py \.\. +\[100%\]$",
    ], consecutive=True)
