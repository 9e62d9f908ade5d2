"""Reports from the JSON document: schema, terminal/Markdown/JUnit/HTML rebuilt identically by `stepdiff report`,
JUnit read by a real consumer (junitparser), Markdown sized for a PR comment, stored results and the baseline gate,
progress records.

The four-framework documents under tests/data were written by real runs of cases/sft-four-frameworks.toml (see
tests/data/README.md): deepspeed 0.19.8 + openrlhf 0.10.2 (a buggy release: mean of means) + trl 1.16.0 + verl 0.9.1,
and the same case with openrlhf 0.11.2 (the baseline from a different framework release)."""

from __future__ import annotations

import copy
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stepdiff.harness import baseline as B
from stepdiff.harness.errors import UsageError
from stepdiff.reports import json_report, junit, markdown, schema, terminal

DATA = Path(__file__).parent / "data"
BUGGY = DATA / "sft-four-frameworks.json"
FIXED = DATA / "sft-four-frameworks-fixed.json"
ODD, ODD_FIXED, SIGNATURE = "openrlhf==0.10.2", "openrlhf==0.11.2", "microbatch-token-mean"
OTHERS = ("deepspeed==0.19.8", "trl==1.16.0", "verl==0.9.1")


def stepdiff(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stepdiff", *args], capture_output=True, text=True, timeout=timeout)


def load(p: Path) -> dict[str, Any]:
    return dict(json.loads(p.read_text()))


# ------------------------------------------------------------------------------------------------ schema
def test_schema_is_shipped_versioned_and_the_four_framework_results_match_it() -> None:
    s = schema.load()
    assert Path(schema.path()).is_file() and s["$id"].endswith(f":{json_report.SCHEMA}")
    assert s["$defs"]["case"]["properties"]["schema"]["const"] == json_report.SCHEMA
    for p in (BUGGY, FIXED):
        doc = load(p)
        assert schema.problems(doc) == [], p
        assert [r["framework"] for r in doc["runs"]] == ["deepspeed", "openrlhf", "trl", "verl"]
    assert json_report.load(BUGGY)["case"] == "sft-four-frameworks"


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda d: d.update(verdict="maybe"), "verdict"),
        (lambda d: d["runs"][0].pop("signature"), "runs/0"),
        (lambda d: d["runs"][1]["steps"][0].update(grad_rel="small"), "runs/1/steps/0/grad_rel"),
        (lambda d: d.update(spec_hash="xyz"), "spec_hash"),
        (lambda d: d.update(schema=1), "schema"),
    ],
)
def test_schema_rejects_broken_documents(mutate: Any, where: str) -> None:
    doc = load(BUGGY)
    mutate(doc)
    bad = schema.problems(doc)
    assert bad and any(b.startswith(where) for b in bad), bad


def test_schema_allows_additive_fields() -> None:
    doc = load(BUGGY)
    doc["runs"][0]["optimizer_state_rel"] = 1e-7  # a field a newer stepdiff adds
    doc["runs"][0]["steps"][0]["update_per_param"] = []
    doc["new_top_level"] = {"x": 1}
    assert schema.problems(doc) == []


def test_report_loader_refuses_other_schema_versions(tmp_path: Path) -> None:
    doc = load(BUGGY)
    doc["schema"] = 99
    p = tmp_path / "future.txt"
    p.write_text(json.dumps(doc))
    with pytest.raises(UsageError, match="schema 99"):
        json_report.load(p)
    p.write_text("{not json")
    with pytest.raises(UsageError, match="not a JSON report"):
        json_report.load(p)


# ------------------------------------------------------------------------------------------------ renderers
def test_terminal_report_of_the_four_framework_run_names_the_odd_one_out() -> None:
    text = terminal.render(load(BUGGY))
    assert f"{ODD}   DIVERGE" in text
    assert f"signature: {SIGNATURE}" in text
    assert f"odd one out: {ODD}" in text
    assert f"{' and '.join(OTHERS)} produce the same numbers" in text, text
    fixed = terminal.render(load(FIXED))
    assert "DIVERGE" not in fixed and "odd one out" not in fixed


def test_junit_read_by_junitparser_one_case_per_framework(tmp_path: Path) -> None:
    from junitparser import Failure, JUnitXml

    p = tmp_path / "four.xml"
    junit.write_document(load(BUGGY), p)
    xml = JUnitXml.fromfile(str(p))
    suites = list(xml)
    assert [s.name for s in suites] == ["sft-four-frameworks"]
    cases = {c.name: c for c in suites[0]}
    assert sorted(cases) == sorted([ODD, *OTHERS])
    odd = cases[ODD].result
    assert len(odd) == 1 and isinstance(odd[0], Failure)
    worst = next(r for r in load(BUGGY)["runs"] if r["label"] == ODD)["worst_parameter"]["name"]
    assert SIGNATURE in odd[0].message and worst in odd[0].message
    assert all(cases[n].is_passed for n in OTHERS)
    assert suites[0].tests == 4 and suites[0].failures == 1 and suites[0].errors == 0


def test_markdown_puts_the_verdict_table_first_and_folds_details() -> None:
    md = markdown.render_document(load(BUGGY))
    lines = [ln for ln in md.splitlines() if ln.strip()]
    assert lines[0].startswith("### stepdiff: **diverge** (exit 1)")
    assert lines[1].startswith("| verdict | case | framework |")
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 2 + 4  # header, rule, one row per framework run
    assert f"❌ **DIVERGE** | `sft-four-frameworks` | `{ODD}`" in md and SIGNATURE in md
    first_details = md.index("<details>")
    assert md.index("| verdict |") < first_details and md.count("<details>") == md.count("</details>") == 1
    assert len(md) < markdown.MAX_CHARS


def test_markdown_stays_under_a_pr_comment_with_many_cases() -> None:
    one = load(BUGGY)
    cases = []
    for i in range(60):
        c = copy.deepcopy(one)
        c["case"] = f"case-{i}"
        cases.append(c)
    md = markdown.render_document(json_report.document(cases))
    assert len(md) <= markdown.MAX_CHARS + 200
    assert md.count("| ❌ **DIVERGE** |") == 60  # the verdict table is never cut
    assert "cut to fit a comment" in md


# ------------------------------------------------------------------------------------------------ baseline gate
def test_threshold_expression_parses_every_documented_term() -> None:
    terms = B.parse_fail("grad_rel>10x, grad_rel>50%,update_rel>1e-5,weights>0.05,verdict!=same,signature!=same,"
                         "verdict!=agree,token_signature==token-mask")
    assert [(t.metric, t.kind) for t in terms] == [
        ("grad_rel", "ratio"), ("grad_rel", "percent"), ("update_rel", "absolute"), ("weights", "absolute"),
        ("verdict", "same"), ("signature", "same"), ("verdict", "value"), ("token_signature", "value")]
    t = terms[0]
    assert t.crossed(1e-7, 1.1e-6) and not t.crossed(1e-7, 9e-7)
    assert terms[1].crossed(1e-7, 1.6e-7) and not terms[1].crossed(1e-7, 1.4e-7)
    assert terms[2].crossed(None, 2e-5) and not terms[2].crossed(None, 1e-6)
    assert not t.crossed(0.0, 5e-9)  # a bitwise-exact baseline: ratios are taken against RATIO_FLOOR


@pytest.mark.parametrize(("expr", "needle"), [
    ("grad_rel>>10x", "'>10x' is not a number"), ("grad_rel", "expected METRIC>LIMIT"),
    ("gradrel>10x", "unknown metric 'gradrel'"),
    ("grad_rel>tenx", "not a number"), ("verdict>1", "not a number"), ("weights>2x", "absolute"),
    ("grad_rel!=same", "take '>'"), ("", "no terms"), ("grad_rel>0x", "above 0"),
])
def test_threshold_expression_errors_name_the_term(expr: str, needle: str) -> None:
    with pytest.raises(UsageError, match=re.escape(needle)):
        B.parse_fail(expr)


def test_gate_fails_against_a_baseline_from_another_release_and_passes_against_its_own() -> None:
    fixed, buggy = load(FIXED), load(BUGGY)
    terms = B.parse_fail(B.DEFAULT_FAIL)
    cmp = B.compare_documents(fixed, buggy, terms)
    assert cmp.exit_code == B.EXIT_REGRESSION
    odd = next(r for r in cmp.cases[0].runs if r.current == ODD)
    assert odd.baseline == ODD_FIXED  # matched by framework: the baseline is another release
    moved = {m.metric: m for m in odd.moves}
    assert moved["verdict"].baseline == "agree" and moved["verdict"].current == "diverge"
    assert moved["signature"].baseline == "correct" and moved["signature"].current == SIGNATURE
    assert moved["grad_rel"].current > 1e4 * moved["grad_rel"].baseline and moved["grad_rel"].crossed
    assert moved["weights"].current > 1.0  # the short micro-batch is over-weighted
    others = [r for r in cmp.cases[0].runs if r.current != ODD]
    assert [r.current for r in others] == list(OTHERS) and not any(r.crossed for r in others)
    text = B.render(cmp)
    assert f"{ODD_FIXED} -> {ODD}: FAIL" in text and "crosses grad_rel>10x" in text
    own = B.compare_documents(buggy, buggy, terms)
    assert own.exit_code == 0 and not own.crossed
    assert B.compare_documents(fixed, fixed, terms).exit_code == 0


def test_gate_refuses_a_baseline_of_a_different_spec() -> None:
    fixed, buggy = load(FIXED), load(BUGGY)
    buggy["spec"]["batch"]["grad_accum"] = 3
    buggy["spec_hash"] = json_report.spec_hash(buggy["spec"])
    with pytest.raises(UsageError, match=r"different specs \(batch.grad_accum: 2 -> 3\)"):
        B.compare_documents(fixed, buggy, B.parse_fail(B.DEFAULT_FAIL))


def test_compare_cli_exit_codes_and_output(tmp_path: Path) -> None:
    out = stepdiff("compare", str(FIXED), str(BUGGY), timeout=120)
    assert out.returncode == B.EXIT_REGRESSION, out.stderr
    assert f"{ODD_FIXED} -> {ODD}: FAIL" in out.stdout
    assert re.search(r"grad_rel\s+\S+e-0[78] -> \S+ \(x\S+e\+0\d\)\s+<- crosses grad_rel>10x", out.stdout), out.stdout
    out = stepdiff("compare", str(BUGGY), str(BUGGY), "--fail", "grad_rel>10x,signature!=same", timeout=120)
    assert out.returncode == 0 and "result: no threshold crossed (exit 0)" in out.stdout
    out = stepdiff("compare", str(FIXED), str(BUGGY), "--fail", "grad_rel>>1", timeout=120)
    assert out.returncode == 3 and "stepdiff: error: --fail term 'grad_rel>>1'" in out.stderr
    other = load(BUGGY)
    other["spec"]["optimizer"]["lr"] = 0.01
    other["spec_hash"] = json_report.spec_hash(other["spec"])
    (tmp_path / "other.json").write_text(json.dumps(other))
    out = stepdiff("compare", str(FIXED), str(tmp_path / "other.json"), timeout=120)
    assert out.returncode == 3 and "optimizer.lr: 0.001 -> 0.01" in out.stderr, out.stderr
    out = stepdiff("compare", str(FIXED), str(BUGGY), "--json", "-", timeout=120)
    assert json.loads(out.stdout)["exit_code"] == B.EXIT_REGRESSION


def test_saved_results_are_keyed_and_found_by_case_and_spec_hash(tmp_path: Path) -> None:
    fixed, buggy = load(FIXED), load(BUGGY)
    [p] = B.save(fixed, tmp_path / "results")
    rel = p.relative_to(tmp_path / "results").parts
    assert rel[0] == "sft-four-frameworks" and rel[1] == fixed["spec_hash"][:12]
    assert rel[2] == "deepspeed-0.19.8+openrlhf-0.11.2+trl-1.16.0+verl-0.9.1"
    assert rel[3] == f"stepdiff-{fixed['stepdiff_version']}.json"
    base, where = B.load_baseline(tmp_path / "results", buggy)
    assert base == fixed and where == str(p)
    changed = copy.deepcopy(buggy)
    changed["spec_hash"] = "0" * 64
    with pytest.raises(UsageError, match="the spec changed"):
        B.load_baseline(tmp_path / "results", changed)


# ------------------------------------------------------------------------------------------------ progress
def test_progress_plain_records_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from stepdiff.harness import progress

    with progress.display(quiet=True):
        with progress.task("deepspeed==0.18.9", "running") as t:
            t.done("diverge (1.0 s)")
        with progress.task("trl==1.16.0", "environment", announce=False) as t:
            t.done("cached", record=False)
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"stepdiff: \[\s*\d+\.\ds\] deepspeed==0\.18\.9: running", lines[0])
    assert re.fullmatch(r"stepdiff: \[\s*\d+\.\ds\] deepspeed==0\.18\.9: diverge \(1\.0 s\)", lines[1])


def test_progress_live_display_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from stepdiff.harness import progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err, out = Tty(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert progress.wants_live() and not progress.wants_live(quiet=True)
    with progress.display() as d:
        assert isinstance(d, progress.Live)
        with progress.task("verl==0.9.1", "running") as t:
            t.update("step 1")
            t.done("agree (2.0 s)")
    shown = err.getvalue()
    assert "verl==0.9.1" in shown and "agree (2.0 s)" in shown and re.search(r"\d:\d\d:\d\d", shown), shown
    assert "\x1b[" in shown  # drawn as a live terminal display, not plain records
    assert out.getvalue() == ""
