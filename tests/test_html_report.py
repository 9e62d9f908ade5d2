"""The HTML report of a four-framework run (deepspeed, openrlhf 0.10.2 - a buggy release -, trl and verl against the
reference), rendered in real headless Chromium: the key elements are present and visible, the verdict and signature
are above the fold, every plot is drawn, nothing is loaded from the network, the console has no errors. A PNG
screenshot is left in the test artifacts folder ($STEPDIFF_TEST_ARTIFACTS, default ./test-artifacts)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from stepdiff.reports import html

DATA = Path(__file__).parent / "data"
BUGGY = DATA / "sft-four-frameworks.json"


class _Resources(HTMLParser):
    """Every src/href of the page (a self-contained report has none pointing off the page)."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [v for k, v in attrs if k in ("src", "href") and v]


def open_page(browser: Any, path: Path) -> list[dict[str, Any]]:
    """Load a report; returns the browser console entries the load produced."""
    browser.get_log("browser")  # drop anything earlier
    browser.get(path.resolve().as_uri())
    return list(browser.get_log("browser"))


def visible(browser: Any, css: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    found = browser.find_elements(By.CSS_SELECTOR, css)
    return [e for e in found if e.is_displayed()]


def test_four_framework_report_renders_in_headless_chromium(tmp_path: Path, browser: Any,
                                                              artifacts_dir: Path) -> None:
    from selenium.webdriver.common.by import By

    doc = json.loads(BUGGY.read_text())
    page = tmp_path / "report.html"
    html.write_document(doc, page)
    text = page.read_text()
    parser = _Resources()
    parser.feed(text)
    assert all(link.startswith("#") for link in parser.links), parser.links  # offline: nothing off the page

    console = open_page(browser, page)
    errors = [e for e in console if e.get("level") == "SEVERE"]
    assert errors == [], errors

    # above the fold: the overall verdict, the verdict matrix and the buggy release's signature
    fold = browser.execute_script("return window.innerHeight")
    badge = visible(browser, "#verdict")
    assert badge and badge[0].text == "DIVERGE"
    matrix = visible(browser, "#verdict-matrix")[0]
    assert all(lab in matrix.text for lab in ("deepspeed==0.19.8", "openrlhf==0.10.2", "trl==1.16.0", "verl==0.9.1"))
    cells = browser.find_elements(By.CSS_SELECTOR, "#verdict-matrix td.cell")
    assert [c.get_attribute("data-verdict") for c in cells] == ["agree", "diverge", "agree", "agree"]
    sig = visible(browser, ".finding .signature")
    assert [s.text for s in sig] == ["microbatch-token-mean"]
    assert sig[0].rect["y"] + sig[0].rect["height"] < fold, "the signature must be above the fold"
    assert matrix.rect["y"] < fold
    odd = visible(browser, "#summary .odd")
    assert odd and "odd one out: openrlhf==0.10.2" in odd[0].text

    # every plot is drawn by plotly: pairwise matrix, per-step curves, and per run a heatmap and weight bars
    n_runs = len(doc["runs"])
    drawn = browser.execute_script("return document.querySelectorAll('.js-plotly-plot .main-svg').length")
    figures = browser.execute_script("return document.querySelectorAll('.plotly-graph-div').length")
    assert figures == 2 + 2 * n_runs + sum(1 for r in doc["runs"] if r["token_weights"]), figures
    assert drawn >= figures  # plotly draws at least one svg layer per figure
    assert len(visible(browser, ".fig.heatmap .js-plotly-plot")) == n_runs
    pairwise = visible(browser, ".fig.pairwise")[0]
    assert "odd one out" in pairwise.text and "reference" in pairwise.text
    heat = visible(browser, "#run-0-0 .fig.heatmap")[0]
    assert "layer 0" in heat.text and "layer 1" in heat.text and "attn.q_proj" in heat.text
    steps = visible(browser, ".fig.steps")[0]
    assert all(t in steps.text for t in ("reported loss", "relative gradient error", "relative update error"))

    # details: the bound and its source, code path, patches, versions, knobs of each run
    assert "float32 floor" in visible(browser, ".bound")[0].text
    code_paths = [e.text for e in visible(browser, ".code-path")]
    assert len(code_paths) == n_runs and any("deepspeed.initialize" in c for c in code_paths)
    ds = visible(browser, "#run-0-0")[0].text
    assert "zero_stage=2" in ds and "deepspeed==0.19.8" in ds and "patches" in ds
    odd_run = visible(browser, "#run-0-1")[0].text
    assert "openrlhf==0.10.2" in odd_run and "signature microbatch-token-mean" in odd_run
    assert re.search(r"same numbers", visible(browser, ".same-numbers")[0].text)

    shot = artifacts_dir / "report-sft-four-frameworks.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_report_html_is_identical_when_rebuilt(tmp_path: Path) -> None:
    doc = json.loads(BUGGY.read_text())
    a, b = tmp_path / "a.html", tmp_path / "b.html"
    html.write_document(doc, a)
    html.write_document(json.loads(BUGGY.read_text()), b)
    assert a.read_bytes() == b.read_bytes()
