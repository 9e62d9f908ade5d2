"""`stepdiff run` writing every report, `stepdiff report` rebuilding them byte for byte from the JSON alone, errors as
<error> and unsupported runs as <skipped> in JUnit, `--json -` piping clean JSON, and `--save` / `--compare` end to
end. Uses the `faults` self-test adapter (host python, seconds) and a verl run the spec makes unsupported (no
environment is built for it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CASE = """[case]
name = "{name}"
frameworks = {frameworks}
[batch]
grad_accum = 2
[run]
timeout_s = 120
[faults]
mode = "{mode}"
[verl]
path = "actor"
"""


def stepdiff(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stepdiff", *args], capture_output=True, text=True, timeout=900,
                          cwd=cwd)


def write_case(d: Path, name: str, mode: str, frameworks: list[str]) -> Path:
    p = d / f"{name}.toml"
    p.write_text(CASE.format(name=name, mode=mode, frameworks=json.dumps(frameworks)))
    return p


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run: the faults adapter crashes (error), verl cannot honour the spec (unsupported). JSON to stdout."""
    d = tmp_path_factory.mktemp("crashed")
    case = write_case(d, "crash-and-unsupported", "crash", ["faults", "verl==0.9.1"])
    out = stepdiff("run", str(case), "--json", "-", "--junit", str(d / "r.xml"), "--markdown", str(d / "r.md"),
                   "--html", str(d / "r.html"), "--quiet", cwd=d)
    return {"dir": d, "out": out}


def test_json_to_stdout_is_clean_and_matches_the_schema(crashed: dict[str, Any]) -> None:
    from stepdiff.reports.schema import problems

    out = crashed["out"]
    assert out.returncode == 2, out.stderr
    doc = json.loads(out.stdout)  # nothing but the JSON document on stdout
    assert problems(doc) == []
    assert [r["verdict"] for r in doc["runs"]] == ["error", "unsupported"]
    assert "faults: simulated crash" in doc["runs"][0]["log_tail"]
    assert "verl.path = 'actor'" in doc["runs"][1]["reason"]
    # the terminal report and the plain progress records went to stderr
    assert "faults: ERROR" in out.stderr and "stepdiff: [" in out.stderr
    (crashed["dir"] / "r.json").write_text(out.stdout)


def test_reports_rebuilt_from_json_alone_are_identical(crashed: dict[str, Any]) -> None:
    d = crashed["dir"]
    (d / "r.json").write_text(crashed["out"].stdout)
    rebuilt = stepdiff("report", str(d / "r.json"), "--junit", str(d / "r2.xml"), "--markdown", str(d / "r2.md"),
                       "--html", str(d / "r2.html"))
    assert rebuilt.returncode == 0, rebuilt.stderr
    for a, b in (("r.xml", "r2.xml"), ("r.md", "r2.md"), ("r.html", "r2.html")):
        assert (d / a).read_bytes() == (d / b).read_bytes(), a
    assert rebuilt.stdout.strip() and rebuilt.stdout in crashed["out"].stderr  # the terminal report, as printed


def test_junit_errors_and_unsupported_runs(crashed: dict[str, Any]) -> None:
    from junitparser import Error, JUnitXml, Skipped

    suites = list(JUnitXml.fromfile(str(crashed["dir"] / "r.xml")))
    cases = {c.name: c for c in suites[0]}
    [err] = cases["faults"].result
    assert isinstance(err, Error) and "exited with code 3" in err.message
    assert "faults: simulated crash" in (err.text or "")  # the framework's own output
    [skip] = cases["verl==0.9.1"].result
    assert isinstance(skip, Skipped) and "verl.path = 'actor'" in skip.message


def test_error_report_shows_the_log_tail_in_chromium(crashed: dict[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get_log("browser")
    browser.get((crashed["dir"] / "r.html").resolve().as_uri())
    assert [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"] == []
    tails = [e for e in browser.find_elements(By.CSS_SELECTOR, ".log-tail") if e.is_displayed()]
    assert len(tails) == 1 and "faults: simulated crash" in tails[0].text
    assert browser.find_element(By.ID, "verdict").text == "ERROR"
    cells = browser.find_elements(By.CSS_SELECTOR, "#verdict-matrix td.cell")
    assert [c.get_attribute("data-verdict") for c in cells] == ["error", "unsupported"]


def test_save_then_compare_end_to_end(tmp_path: Path) -> None:
    case = write_case(tmp_path, "faults-clean", "none", ["faults"])
    first = stepdiff("run", str(case), "--save", "-q", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    [stored] = (tmp_path / ".stepdiff" / "results" / "faults-clean").glob("*/faults/stepdiff-*.json")
    assert "saved" in first.stderr and str(stored.relative_to(tmp_path)) in first.stderr
    again = stepdiff("run", str(case), "--compare", ".stepdiff/results", "--json", "again.json", "-q", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "faults: ok" in again.stdout and "result: no threshold crossed (exit 0)" in again.stdout
    # the same numbers crossing a threshold that says they must not: the gate's own exit code
    gate = stepdiff("compare", str(stored), "again.json", "--fail", "verdict==agree", cwd=tmp_path)
    assert gate.returncode == 6, gate.stdout + gate.stderr
    assert "crosses verdict==agree" in gate.stdout
    # a changed spec is a usage error before anything runs
    changed = tmp_path / "changed.toml"
    changed.write_text(case.read_text().replace("grad_accum = 2", "grad_accum = 3"))
    bad = stepdiff("run", str(changed), "--compare", str(stored), cwd=tmp_path)
    assert bad.returncode == 3 and "batch.grad_accum: 2 -> 3" in bad.stderr, bad.stderr
    assert "reference: running" not in bad.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (["--json", "-", "--markdown", "-"], "only one report can go to stdout"),
    (["--fail", "grad_rel>10x"], "--fail without --compare"),
    (["--compare", "no-such-baseline.json"], "no such file or folder"),
    (["--compare", ".", "--fail", "grad_rel>>2"], "--fail term 'grad_rel>>2'"),
])
def test_run_report_flags_usage_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    case = write_case(tmp_path, "flags", "none", ["faults"])
    out = stepdiff("run", str(case), *args, cwd=tmp_path)
    assert out.returncode == 3 and needle in out.stderr, out.stderr
