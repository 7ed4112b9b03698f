"""The HTML report (ci/report.py) as a real headless Chromium renders it.

Chromium loads the page of a small synthetic results directory from a file:// URL (no network;
background networking and component updates off), dumps the DOM after load (scripts run) and
takes a screenshot to results/report-screenshot.png. Skips when chromium is not installed
(ci/bootstrap installs Debian's `chromium` when it can: apt-get install chromium).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from ci.pipeline import ROOT
from ci.report import main
from tests.unit.test_report import make_results

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = ROOT / "results" / "report-screenshot.png"


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed: apt-get install chromium (ci/bootstrap tries to)")
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-extensions", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True,
                          env={**os.environ, "HOME": str(profile)})


class Dom(HTMLParser):
    """The title, the script elements, and each row's cells (data-state) by column."""

    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.scripts = 0
        self.columns: list[str] = []
        self.rows: dict[str, list[str]] = {}
        self.pre_text: list[str] = []
        self._in: str | None = None
        self._row: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        elif tag in ("title", "pre"):
            self._in = tag
        elif tag == "th" and a.get("data-col") is not None:
            self.columns.append(a["data-col"] or "")
        elif tag == "tr" and a.get("data-test"):
            self._row = a["data-test"]
            self.rows[self._row] = []
        elif tag == "td" and self._row and "cell" in (a.get("class") or "").split():
            classes = (a.get("class") or "").split()
            self.rows[self._row].append(next(c for c in classes if c != "cell"))

    def handle_endtag(self, tag: str) -> None:
        if tag == self._in:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "title":
            self.title += data
        elif self._in == "pre":
            self.pre_text.append(data)

    def cell(self, test: str, column: str) -> str:
        return self.rows[test][self.columns.index(column)]


def test_the_report_renders_in_chromium(tmp_path: Path) -> None:
    results = make_results(tmp_path / "results")
    page = results / "report.html"
    assert main(["--results", str(results), "--out", str(page)]) == 0
    profile = tmp_path / "profile"

    # Control: Chromium's dumped DOM is the DOM after scripts ran, so "no script ran" means something.
    control = tmp_path / "control.html"
    control.write_text("<title>before</title><script>document.title='ran'</script>")
    assert "<title>ran</title>" in _chromium(profile, "--dump-dom", control.as_uri()).stdout

    dom = Dom()
    dom.feed(_chromium(profile, "--dump-dom", page.as_uri()).stdout)
    assert dom.title == "phd CI report"  # the failure message's <script> did not run
    assert dom.scripts == 0
    assert any("<script>document.title='pwned'</script> \"quoted\"" in t for t in dom.pre_text)

    t = "tests/suite/test_smoke.py::"
    assert dom.columns == ["alpine", "debian", "tiny", "blocking-start", "no-replay"]
    assert dom.cell(t + "test_passes", "tiny") == "pass"
    assert dom.cell(t + "test_passes", "alpine") == "pass"
    assert dom.cell(t + "test_fails", "tiny") == "fail"
    assert dom.cell(t + "test_skips", "alpine") == "skip"
    assert dom.cell(t + "test_flaky", "tiny") == "flaky"
    assert dom.cell(t + "test_catches", "no-replay") == "caught"
    assert dom.cell(t + "test_passes", "no-replay") == "notcaught"
    assert dom.cell(t + "test_fails", "debian") == "none"

    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    _chromium(profile, "--hide-scrollbars", "--window-size=1400,1000", f"--screenshot={SCREENSHOT}",
              page.as_uri())
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
