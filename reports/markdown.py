"""Markdown report: the same table as the terminal, for PR comments and issue reports."""

from __future__ import annotations

from stepdiff.harness.runner import CaseResult

from .terminal import MARK, _w, detail


def render(res: CaseResult) -> str:
    b = res.spec.batch
    lines = [f"### stepdiff: `{res.case}` - **{res.verdict}**", "",
             f"micro_batch_size={b.micro_batch_size}, grad_accum={b.grad_accum}, world_size={b.world_size}, "
             f"steps={b.steps}, dtype={res.spec.model.dtype}; bound: {res.bound.source}", "",
             "| framework | verdict | max rel grad err | micro-batch weights | signature |", "|---|---|---|---|---|"]
    for r in res.runs:
        err = f"{r.max_rel_grad_error:.2e}" if r.max_rel_grad_error is not None else "-"
        sig = r.signature.name if r.signature else "-"
        lines.append(f"| `{r.label}` | {MARK[r.verdict]} | {err} | `{_w(r.fit.weights if r.fit else None)}` | {sig} |")
    lines += ["", "<details><summary>details</summary>", "", "```"]
    for r in res.runs:
        lines += detail(r) + [""]
    lines += ["```", "</details>", ""]
    return "\n".join(lines)


def render_many(results: list[CaseResult]) -> str:
    return "\n".join(render(r) for r in results)
