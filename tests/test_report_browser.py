"""The demo's HTML report opened in headless Chromium: every plot loads, the page renders, no report text shows.

Needs Debian's ``chromium`` on PATH (``make test-deps`` installs it). The
browser runs offline: host resolution is disabled and background
networking is off, so a reference to an external asset cannot load.
"""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
import re
import shutil
import subprocess

import pandas as pd
import pytest
from PIL import Image

from linkrisk.report import rebuild_report

DATA_URL = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")
CHECK_ID = "linkrisk-image-check"
# Appended to a copy of the report, never to the report itself: it records, once the page has loaded, which
# images failed to decode and which resources the page fetched.
CHECK_SCRIPT = """<img alt="check-self-test" src="data:image/png;base64,AAAA">
<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var result = {
    count: images.length,
    broken: images.filter(function (img) { return !(img.complete && img.naturalWidth > 0); })
                  .map(function (img) { return img.alt; }),
    resources: performance.getEntriesByType("resource").map(function (entry) { return entry.name; })
  };
  var pre = document.createElement("pre");
  pre.id = "%s";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>
""" % CHECK_ID
CHROMIUM_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium not found on PATH: run `make test-deps` to install Debian's chromium package")
    return path


def _run_chromium(chromium: str, profile, *arguments: str) -> subprocess.CompletedProcess:
    command = [
        chromium, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
        "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}", *arguments,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=False)
    assert result.returncode == 0, f"chromium failed ({result.returncode}): {result.stderr[-2000:]}"
    return result


def _visible(text: str) -> str:
    return DATA_URL.sub("data:image/png;base64,", text)


def _report_sentences(*cohorts) -> set[str]:
    """Every distinct sentence of at least 30 characters in the cohorts' report texts."""
    texts = pd.concat([cohort.reports["text"] for cohort in cohorts]).dropna().astype(str)
    sentences = set()
    for text in texts:
        for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
            sentence = " ".join(sentence.split())
            if len(sentence) >= 30:
                sentences.add(sentence)
    return sentences


def _expected_sections(results: dict) -> set[str]:
    runs = results.get("runs") or []
    main = [r for r in runs if r.get("view") != "extra" and r.get("direction", "image_to_report") == "image_to_report"
            and r.get("level", "study") == "study" and r.get("image_level", "image") == "image"]
    expected = {"plain-words", "summary", "recall-by-pool", "methods"} if main else {"methods"}
    if any(r.get("negatives") == "label_matched" for r in main):
        expected.add("negatives")
    if len(main) < len(runs):
        expected.add("views")
    if any(r.get("assignment") for r in main):
        expected.add("assignment")
    if (results.get("sweep") or {}).get("original"):
        expected.add("frontier")
    if results.get("refit"):
        expected.add("refit")
    if results.get("probe"):
        expected.add("probes")
    if any(r.get("rank_histogram") for r in main):
        expected.add("risk")
    if any(r.get("permutation_test") or r.get("upper_bounds") or r.get("attribute_oracle") for r in main):
        expected.add("evidence")
    if any(isinstance(entry, dict) and entry.get("splits") for entry in results.get("split_audit") or []):
        expected.add("splits")
    return expected


@pytest.fixture(scope="module")
def report(demo_run, tmp_path_factory):
    """The demo's report.html, checked to equal a rebuild from a folder holding only its results.json."""
    out, _ = demo_run
    rebuilt = tmp_path_factory.mktemp("rebuilt")
    shutil.copy(out / "results.json", rebuilt / "results.json")
    path = rebuild_report(rebuilt)
    text = path.read_text(encoding="utf-8")
    assert text == (out / "report.html").read_text(encoding="utf-8")
    return path, text


def test_report_sections_match_results(report, demo_run):
    _, html = report
    _, results = demo_run
    sections = set(re.findall(r'<section id="([a-z-]+)">', html))
    assert sections == _expected_sections(results)


def test_embedded_plots_decode_and_are_not_blank(report):
    _, html = report
    payloads = DATA_URL.findall(html)
    assert len(payloads) == len(re.findall(r"<img\s", html))
    assert len(payloads) >= 10
    for index, payload in enumerate(payloads):
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        assert image.format == "PNG", index
        assert image.width > 200, (index, image.size)
        assert image.height > 150, (index, image.size)
        gray = image.convert("L")
        low, high = gray.getextrema()
        assert high - low > 100, index
        dark = sum(gray.histogram()[:200])
        assert dark > 0.005 * image.width * image.height, index


def test_chromium_loads_every_plot_offline(report, chromium, tmp_path):
    path, html = report
    page = tmp_path / "check.html"
    page.write_text(html.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    result = _run_chromium(chromium, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom",
                           page.as_uri())
    found = re.search(f'<pre id="{CHECK_ID}">(.*?)</pre>', result.stdout, flags=re.S)
    assert found, "the load check did not run; chromium output ends: " + result.stdout[-500:]
    check = json.loads(html_lib.unescape(found.group(1)))
    # The self-test image is broken on purpose, so the check is known to detect a failed image.
    assert check["broken"] == ["check-self-test"]
    assert check["count"] == len(DATA_URL.findall(html)) + 1
    assert [name for name in check["resources"] if not name.startswith("data:")] == []


def test_chromium_screenshot_is_not_blank(report, chromium, tmp_path):
    path, _ = report
    screenshot = tmp_path / "report.png"
    _run_chromium(chromium, tmp_path / "profile", "--hide-scrollbars", f"--screenshot={screenshot}",
                  "--window-size=1280,4000", path.as_uri())
    assert screenshot.is_file()
    image = Image.open(screenshot)
    assert image.size == (1280, 4000)
    gray = image.convert("L")
    low, high = gray.getextrema()
    assert high - low > 150
    # Text, tables and figures: well over 2% of the pixels are not background.
    histogram = gray.histogram()
    assert sum(histogram[:230]) > 0.02 * image.width * image.height


def test_report_and_dom_hold_no_report_text(report, chromium, covid, openi, tmp_path):
    path, html = report
    result = _run_chromium(chromium, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom",
                           path.as_uri())
    sentences = _report_sentences(covid, openi)
    assert len(sentences) > 1000
    for name, text in (("report.html", html), ("dumped DOM", result.stdout)):
        text = " ".join(_visible(html_lib.unescape(text)).split())
        leaked = [sentence for sentence in sentences if sentence in text]
        assert not leaked, f"{len(leaked)} report sentences appear in the {name}"
