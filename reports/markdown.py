"""Markdown report, sized for a pull-request comment or a CI step summary (`$GITHUB_STEP_SUMMARY`).

The verdict table comes first (one row per case x framework, verdict in the first columns); everything else is folded
in <details> blocks. GitHub caps a comment at 65,536 characters: when the details would push the report past
MAX_CHARS they are cut (the table never is), with a line saying where the full report is.
"""

from __future__ import annotations

from typing import Any

from .json_report import cases_of
from .terminal import MARK, as_case, detail, header, num, odd_one_out_line, same_number_lines, weights_text

MAX_CHARS = 60_000
"""Below GitHub's 65,536-character comment limit, with room for a caller's own heading."""

ICON = {"agree": "✅", "diverge": "❌", "error": "💥", "unsupported": "⚠️"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def verdict_table(cases: list[dict[str, Any]]) -> list[str]:
    lines = ["| verdict | case | framework | max rel grad err | worst parameter | micro-batch weights | signature |",
             "|---|---|---|---|---|---|---|"]
    for c in cases:
        for r in c["runs"]:
            worst = r["worst_parameter"]
            sig = r["signature"] or "-"
            if r["token_signature"] and r["token_signature"] != "correct":
                sig += f" / tokens: {r['token_signature']}"
            if r["verdict"] in ("error", "unsupported"):
                sig = _cell(r["reason"][:120])
            worst_text = f"`{worst['name']}` ({num(worst['rel'])})" if worst else "-"
            lines.append(f"| {ICON[r['verdict']]} **{MARK[r['verdict']]}** | `{c['case']}` | `{r['label']}` | "
                         f"{num(r['max_rel_grad_error'])} | {worst_text} | "
                         f"`{weights_text(r['microbatch_weights'])}` | {_cell(sig)} |")
    return lines


def _case_details(c: dict[str, Any]) -> list[str]:
    notes = same_number_lines(c)
    odd = odd_one_out_line(c)
    body = [f"<details><summary><code>{c['case']}</code>: {c['verdict']} (exit {c['exit_code']}); "
            f"{len(c['runs'])} framework run(s)</summary>", "",
            f"{header(c)}; bound: {c['bound_source']}", ""]
    if odd:
        body += [f"**{odd}**", ""]
    body += [f"- {n}" for n in notes] + ([""] if notes else [])
    body.append("```")
    for r in c["runs"]:
        body += detail(r) + [""]
    body += ["```", "</details>", ""]
    return body


def render(result: Any) -> str:
    """The Markdown of one case (a CaseResult or a case document)."""
    return render_document(as_case(result))


def render_many(results: list[Any]) -> str:
    from .json_report import document

    return render_document(document(results))


def render_document(doc: dict[str, Any]) -> str:
    cases = cases_of(doc)
    names = ", ".join(f"`{c['case']}`" for c in cases)
    lines = [f"### stepdiff: **{doc['verdict']}** (exit {doc['exit_code']}) - {names}", ""]
    lines += verdict_table(cases)
    lines.append("")
    for c in cases:
        odd = odd_one_out_line(c)
        if odd:
            lines += [f"`{c['case']}`: {odd}", ""]
    head = "\n".join(lines)
    details: list[str] = []
    for c in cases:
        block = "\n".join(_case_details(c))
        if len(head) + sum(map(len, details)) + len(block) > MAX_CHARS:
            details.append(f"_details of `{c['case']}` and later cases cut to fit a comment: see the JSON or HTML "
                           "report_\n")
            break
        details.append(block)
    return head + "\n" + "\n".join(details)
